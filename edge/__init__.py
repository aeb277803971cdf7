"""MiniCPM-o Edge: on-device runtime for MiniCPM-o 2.6."""

__version__ = "0.1.0"
__all__ = ["__version__"]
