"""The checkpoint's own chat template, rendered the way transformers' `apply_chat_template` renders it.

Why not a hard-coded ChatML copy: the real MiniCPM-o 2.6 template (Qwen2.5's, with tools) inserts "You are Qwen,
created by Alibaba Cloud. You are a helpful assistant." when there is no system message, the golden fixture's
inserts "You are a helpful assistant.": only the checkpoint's own text gives the official prompt for both.

The Jinja setup mirrors transformers (`utils/chat_template_utils.py`, `_compile_jinja_template` and
`render_jinja_template`, 4.5x): an `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the
`loopcontrols` extension and a pass-through `{% generation %}` block, `tojson` replaced by a plain `json.dumps`
(no HTML escaping, `ensure_ascii=False`), globals `raise_exception` and `strftime_now`, and render variables
`messages`, `tools`, `documents`, `add_generation_prompt` plus the tokenizer's special-token map (`bos_token`,
`eos_token`, ...).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

from edge.errors import ChatTemplateError

# The special-token attributes transformers passes to every template (`SpecialTokensMixin.SPECIAL_TOKENS_ATTRIBUTES`).
TEMPLATE_TOKEN_VARS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
                       "additional_special_tokens")


def _raise_exception(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers overrides Jinja's filter: Jinja's escapes <, >, & and ' for HTML, which a prompt must not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` renders its body (transformers uses it for assistant masks)."""

        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@dataclass
class ChatTemplate:
    """One compiled template plus the special-token variables of its tokenizer.

    Attributes:
        source: the Jinja text (tokenizer_config.json `chat_template`, or the official TTS template).
        variables: `bos_token`, `eos_token`, ... as the tokenizer's `special_tokens_map` gives them.
    """

    source: str
    variables: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        import jinja2

        try:
            self._compiled = _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"the chat template does not compile (line {e.lineno}: {e.message}); convert "
                                    "the checkpoint again or fix `chat_template` in its tokenizer_config.json.") from e

    def render(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
               documents: Sequence[Mapping[str, Any]] | None = None, add_generation_prompt: bool = False,
               **kwargs) -> str:
        """The prompt string, as `tokenizer.apply_chat_template(messages, tools=..., tokenize=False, ...)`."""
        import jinja2

        values = {**self.variables, **kwargs}
        try:
            return self._compiled.render(messages=list(messages), tools=None if tools is None else list(tools),
                                         documents=None if documents is None else list(documents),
                                         add_generation_prompt=add_generation_prompt, **values)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template refused these messages: {e}. Check the message roles "
                                    "and their order (e.g. the first message must be user or system).") from e


def template_variables(tokenizer_config: Mapping[str, Any]) -> dict[str, Any]:
    """The special-token variables transformers hands the template, read from tokenizer_config.json (added-token
    dicts reduced to their text, as `special_tokens_map` does)."""

    def text(v):
        return v.get("content") if isinstance(v, dict) else v

    out: dict[str, Any] = {}
    for name in TEMPLATE_TOKEN_VARS:
        v = tokenizer_config.get(name)
        if v is None:
            continue
        out[name] = [text(x) for x in v] if isinstance(v, list) else text(v)
    return out
