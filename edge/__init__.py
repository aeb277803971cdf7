"""MiniCPM-o Edge: on-device runtime for MiniCPM-o 2.6. The public face: `from edge import Omni`."""

__version__ = "0.1.0"
__all__ = ["Omni", "OmniOptions", "__version__"]


def __getattr__(name: str):
    """`edge.Omni` and `edge.OmniOptions`, imported on first use: `import edge` (the CLI's start) stays light."""
    if name == "Omni":
        from edge.omni import Omni

        return Omni
    if name == "OmniOptions":
        from edge.options import OmniOptions

        return OmniOptions
    raise AttributeError(f"module 'edge' has no attribute {name!r}")
