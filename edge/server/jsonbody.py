"""Parsing untrusted JSON (HTTP bodies and socket messages) into plain values, or a 400 that says what is wrong.

Why not bare `json.loads`: it raises RecursionError (not a JSONDecodeError) on deeply nested input, accepts the
non-standard constants NaN / Infinity, and returns lone UTF-16 surrogates ("\\ud800") as str values that fail
later, deep in a tokenizer, as a UnicodeEncodeError. Each of those became a 500; here they are 400s up front.
"""

from __future__ import annotations

import json

from edge.server.errors import APIError, bad_request

# Far deeper than any OpenAI request (messages -> content -> part -> image_url -> url is 5 levels), far below
# the interpreter's recursion limit, so nothing downstream (pydantic, json.dumps) can recurse out of stack.
MAX_JSON_DEPTH = 32


def _reject_constant(name: str):
    raise bad_request(f"the JSON contains {name}, which is not valid JSON; send finite numbers.", None,
                      "invalid_json")


def _check(value, max_depth: int) -> None:
    """Iterative walk: nesting depth and lone surrogates in every string (keys included)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            _check_text(v)
        elif isinstance(v, (list, dict)):
            if depth > max_depth:
                raise bad_request(f"the JSON is nested more than {max_depth} levels deep; no request of this API "
                                  "needs that.", None, "invalid_json")
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for k, x in items:
                if isinstance(k, str):
                    _check_text(k)
                if isinstance(x, (str, list, dict)):
                    stack.append((x, depth + 1))


def _check_text(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_request(f"a string in the JSON contains a lone UTF-16 surrogate ({s[e.start]!r} at index "
                          f"{e.start}), which is not valid Unicode; send well-formed text (pair surrogates as "
                          "\\ud83d\\ude00, or send the character itself as UTF-8).", None, "invalid_unicode") from None


def parse_json(raw: bytes | str, *, max_depth: int = MAX_JSON_DEPTH):
    """The parsed value of `raw`, or an APIError 400 (invalid JSON, NaN/Infinity, too deep, lone surrogates)."""
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except APIError:
        raise
    except RecursionError:
        raise bad_request(f"the JSON is nested too deeply to parse; no request of this API needs more than "
                          f"{max_depth} levels.", None, "invalid_json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the body is not valid JSON ({e}); check quoting and commas.", None,
                          "invalid_json") from None
    _check(data, max_depth)
    return data
