"""OpenAI-shaped error bodies, `{"error": {"message", "type", "param", "code"}}`, mapped from typed exceptions.

The mapping is by exception class (edge.errors + the server's own), never by matching message text, so a
reworded message cannot change a status code. Every message says what to change.
"""

from __future__ import annotations

import hmac
import logging
from typing import TYPE_CHECKING

from edge.errors import (
    ContextLengthExceededError,
    CorruptModelFileError,
    EdgeError,
    InvalidInputError,
    ModelFilesNotFoundError,
)

if TYPE_CHECKING:  # the web stack stays optional for importers of this module (engine, chat REPL)
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError

log = logging.getLogger("edge.server")


class APIError(Exception):
    """An HTTP error with an OpenAI-style body. `param` names the offending request field (e.g. `messages[0]`)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class QueueFullError(APIError):
    """Every slot is busy and the wait queue is full."""

    def __init__(self, running: int, queued: int):
        super().__init__(
            429, f"the server is busy ({running} request(s) running, {queued} waiting, the queue is full); retry "
            "shortly, or start the server with a larger --max-queue / --concurrency.",
            type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})


class BodyTooLargeError(APIError):
    def __init__(self, limit: int, size: int | None = None):
        got = f" ({size} bytes)" if size is not None else ""
        super().__init__(
            413, f"request body is too large{got}; the limit is {limit} bytes. Send smaller media (downscale "
            "images, shorter audio) or start the server with a larger --max-body-bytes.",
            code="request_too_large")


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def from_exception(e: BaseException, param: str | None = None) -> APIError:
    """The APIError for any exception raised while serving a request (unknown ones become a logged 500)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ContextLengthExceededError):
        return APIError(400, str(e), param=param or "messages", code="context_length_exceeded")
    if isinstance(e, InvalidInputError):
        return APIError(400, str(e), param=param, code="invalid_input")
    if isinstance(e, (ModelFilesNotFoundError, CorruptModelFileError)):  # the server's files, not the request
        return APIError(503, f"the model bundle is broken: {e}", type="server_error", code="model_files")
    if isinstance(e, EdgeError):
        return APIError(400, str(e), param=param, code=type(e).__name__)
    log.exception("internal error while serving a request", exc_info=e)
    return APIError(500, f"internal server error ({type(e).__name__}: {e}); see the server log.",
                    type="server_error", code="internal_error")


def key_matches(given: str | None, key: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), key.encode())


# pydantic puts the names of union members into error locations; they are not request fields.
_UNION_MEMBERS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-plain"}


def _fields(loc) -> list[str]:
    return [str(x) for x in loc if x != "body" and not (isinstance(x, str) and ("[" in x or x in _UNION_MEMBERS))]


def format_validation(e: ValidationError | RequestValidationError) -> APIError:
    """The most specific problem (deepest field; for a union, the member that got furthest) as a 400."""
    errs = e.errors() or [{"loc": (), "msg": "invalid request"}]
    best = max(errs, key=lambda x: len(_fields(x.get("loc", ()))))
    param = "".join(f"[{x}]" if x.isdigit() else f".{x}" for x in _fields(best.get("loc", ()))).lstrip(".") or None
    return bad_request(f"invalid request: {param or 'body'}: {best['msg']}.", param, "invalid_request")
