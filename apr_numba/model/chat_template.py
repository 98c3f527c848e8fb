"""Chat templates (``tokenizer.chat_template``) rendered as transformers' ``apply_chat_template`` does.

The template is compiled in a sandboxed jinja2 environment (:class:`ImmutableSandboxedEnvironment`)
with trim_blocks and lstrip_blocks, the ``loopcontrols`` extension, a ``{% generation %}`` block tag,
the globals ``raise_exception`` and ``strftime_now`` and a ``tojson`` filter that does not HTML-escape.
:class:`apr_numba.model.tokenizer.Tokenizer` compiles its template once (:func:`compile_chat_template`) and
renders it with :func:`render_chat_template`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from apr_numba.errors import ArgumentError, ModelFormatError

__all__ = ["compile_chat_template", "render_chat_template"]


def compile_chat_template(template: str, source: str) -> jinja2.Template:
    """Compile a chat template in the sandboxed environment.

    Args:
        template: the jinja2 source (``tokenizer.chat_template``).
        source: file name used in error messages.

    Raises:
        ModelFormatError: the template does not compile.
    """
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateError as exc:
        raise ModelFormatError(f"{source}: invalid tokenizer.chat_template: {exc}") from exc


def render_chat_template(
    template: jinja2.Template,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool,
    variables: Mapping[str, Any],
    source: str,
) -> str:
    """Render ``messages`` with a template from :func:`compile_chat_template`.

    Args:
        template: the compiled template.
        messages: ``[{"role": ..., "content": ...}, ...]``.
        add_generation_prompt: passed to the template as is.
        variables: further template variables (special token strings, caller keyword arguments);
            ``tools`` and ``documents`` are None unless given here.
        source: file name used in error messages.

    Raises:
        ArgumentError: ``messages`` is not a list of dicts, or the template rejected the conversation
            (``raise_exception``) or failed while rendering.
    """
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, Mapping) for m in messages):
        raise ArgumentError("chat messages must be a list of dicts with 'role' and 'content'")
    env_vars: dict[str, Any] = {"tools": None, "documents": None, **variables}
    try:
        return template.render(
            messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **env_vars
        )
    except jinja2.TemplateError as exc:
        raise ArgumentError(f"{source}: chat template error: {exc}") from exc


# ---------------------------------------------------------------------- jinja helpers (as transformers)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson HTML-escapes; chat templates expect plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' AssistantTracker): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()
