"""All exceptions of the runtime. Each subclasses a builtin and says what to change."""

from __future__ import annotations


class EdgeError(Exception):
    """Base class of MiniCPM-o Edge errors."""


class ModelFilesNotFoundError(EdgeError, FileNotFoundError):
    """A bundle or checkpoint file is missing."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


class CorruptModelFileError(EdgeError, ValueError):
    """A model file exists but is truncated, corrupt or of the wrong format."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


class BundleVersionError(EdgeError, ValueError):
    """The bundle was written for another manifest schema version."""


class MissingTensorsError(EdgeError, KeyError):
    """A checkpoint lacks tensors that the converter needs."""

    def __init__(self, missing: list[str], source: str):
        self.missing = list(missing)
        shown = ", ".join(self.missing[:10]) + (f" (+{len(self.missing) - 10} more)" if len(self.missing) > 10 else "")
        super().__init__(
            f"checkpoint {source} is missing {len(self.missing)} tensor(s): {shown}. "
            "Re-download it (`minicpmo-edge pull`) or check that it is an openbmb/MiniCPM-o-2_6 checkpoint."
        )

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return self.args[0]


class ContextLengthExceededError(EdgeError, ValueError):
    """A prompt (or prompt + generation) does not fit the LLM context."""

    def __init__(self, n_tokens: int, n_ctx: int, message: str | None = None):
        self.n_tokens = n_tokens
        self.n_ctx = n_ctx
        super().__init__(
            message
            or f"the prompt needs {n_tokens} tokens but the context holds {n_ctx}. Shorten the conversation, "
            "use fewer image slices (max_slice_nums) or shorter audio, or load with a larger n_ctx."
        )


class InvalidInputError(EdgeError, ValueError):
    """User input (image, audio, video, message) cannot be used."""


class OfflineError(EdgeError, ConnectionError):
    """A download was needed but the network (or the hub) cannot be reached."""


class GGUFFormatError(CorruptModelFileError):
    """A GGUF file whose header or size does not hold up (truncated, foreign, corrupt)."""


class InsufficientMemoryError(EdgeError, MemoryError):
    """A load whose memory estimate exceeds what the device has available; the advice names what to change."""

    def __init__(self, need: int, have: int, advice: str):
        self.need, self.have = need, have
        super().__init__(f"the bundle needs about {need / 2**30:.1f} GiB but {have / 2**30:.1f} GiB is available. "
                         f"{advice}")


class DeviceError(EdgeError, RuntimeError):
    """A microphone, speaker or camera cannot be opened or stopped working; the message names the device fix."""

class ChatTemplateError(EdgeError, ValueError):
    """The bundle's chat template is missing, does not compile, or refuses the messages."""


class InputLimitError(InvalidInputError):
    """An input is over a cost limit (duration, pixels, patches, count, bytes): refused before it is decoded."""


class CancelledError(EdgeError):
    """Work was stopped because its requester went away (e.g. media decoding for a disconnected client)."""
