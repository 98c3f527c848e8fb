"""Chat templates (``tokenizer.chat_template``) rendered as transformers' ``apply_chat_template`` does.

The template is compiled in a sandboxed jinja2 environment (:class:`ImmutableSandboxedEnvironment`)
with trim_blocks and lstrip_blocks, the ``loopcontrols`` extension, a ``{% generation %}`` block tag,
the globals ``raise_exception`` and ``strftime_now`` and a ``tojson`` filter that does not HTML-escape.
:class:`apr_numba.model.tokenizer.Tokenizer` compiles its template once (:func:`compile_chat_template`) and
renders it with :func:`render_chat_template`.

A template comes from the model file, so rendering is bounded (:class:`_BoundedEnvironment`):

* time: a deadline (:data:`RENDER_SECONDS`) checked on every call, attribute / item access, operator and
  loop iteration (every ``{% for %}`` iterable is wrapped), so nested loops end instead of hanging;
* size: an operator, call or filter whose result would exceed the output limit (:data:`MAX_OUTPUT` chars,
  plus twice the conversation's size) is refused *before* it runs (``'x' * 10**11``, ``2 ** 10**9``,
  ``'x'.center(10**9)``, ``'%09999999999d' % 1``, a growing ``replace``), and the output is checked while it
  streams (``Template.generate``);
* ``range`` is jinja's sandboxed one (at most ``jinja2.sandbox.MAX_RANGE`` items) made lazy;
* every failure (ZeroDivisionError, OverflowError, MemoryError, RecursionError, TemplateError ...) becomes
  one :class:`~apr_numba.errors.AprError` naming the file.
"""

from __future__ import annotations

import json
import numbers
import re
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment

from apr_numba.errors import ArgumentError, ModelFormatError

__all__ = ["MAX_OUTPUT", "RENDER_SECONDS", "compile_chat_template", "render_chat_template"]

RENDER_SECONDS = 2.0  # wall-clock budget of one render (a real template takes milliseconds)
MAX_OUTPUT = 1 << 22  # characters of output (and of any string or list built on the way), before the conversation's


class TemplateLimit(jinja2.TemplateError):
    """A chat template exceeded the render time or size limit."""


_FMT_WIDTH = re.compile(r"\d+")


def _size(x: Any) -> int:
    return len(x) if isinstance(x, (str, bytes, list, tuple, dict)) else 0


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox with a deadline and size limits (see the module docstring)."""

    intercepted_binops = frozenset({"*", "**", "+", "%", "//", "/"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deadline = float("inf")
        self.limit = MAX_OUTPUT

    # -- limits ------------------------------------------------------------------------------
    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimit(f"rendering took longer than {RENDER_SECONDS:g} s")

    def check_size(self, n: int, what: str) -> None:
        if n > self.limit:
            raise TemplateLimit(f"{what} would be {n} items long (limit {self.limit})")

    def check_args(self, args: Sequence[Any], kwargs: Mapping[str, Any], what: str) -> None:
        for a in (*args, *kwargs.values()):
            if isinstance(a, numbers.Integral) and not isinstance(a, bool) and abs(a) > self.limit:
                raise TemplateLimit(f"{what}: argument {a} is larger than the limit {self.limit}")
            if isinstance(a, str):
                self.check_size(len(a), what)

    def check_format(self, fmt: str) -> None:
        """Refuse a format string (``%`` or ``str.format``) with a width or precision over the limit."""
        if any(len(w) > 7 or int(w) > self.limit for w in _FMT_WIDTH.findall(fmt)):
            raise TemplateLimit("a format width or precision is larger than the limit")

    def bounded_loop(self, seq: Any) -> Any:
        """Iterate ``seq`` (a ``{% for %}`` iterable), checking the deadline on every item."""
        for x in seq:
            self.tick()
            yield x

    def bounded_range(self, *args: Any) -> Any:
        rng = range(*args)
        if len(rng) > MAX_RANGE:
            raise TemplateLimit(f"range of {len(rng)} items (limit {MAX_RANGE})")
        return self.bounded_loop(rng)

    # -- sandbox hooks -----------------------------------------------------------------------
    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        self.tick()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, numbers.Integral):
                    self.check_size(len(seq) * max(int(n), 0), "a repeated sequence")
        elif operator == "**" and isinstance(left, numbers.Integral) and isinstance(right, numbers.Integral):
            if right > 0 and abs(int(left)) > 1 and int(right) * abs(int(left)).bit_length() > 1 << 16:
                raise TemplateLimit(f"{left} ** {right} is too large")
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            self.check_size(len(left) + len(right), "a concatenation")
        elif operator == "%" and isinstance(left, str):
            self.check_format(left)
        out = super().call_binop(context, operator, left, right)
        self.check_size(_size(out), f"the result of {operator!r}")
        return out

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        __self.tick()
        __self.check_args(args, kwargs, f"call of {getattr(__obj, '__name__', type(__obj).__name__)}")
        base = getattr(__obj, "__self__", None)
        if getattr(__obj, "__name__", None) == "replace" and isinstance(base, str):
            if len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
                grow = max(len(args[1]) - len(args[0]), 0) * (base.count(args[0]) if args[0] else len(base) + 1)
                __self.check_size(len(base) + grow, "a replace")
        out = super().call(__context, __obj, *args, **kwargs)
        __self.check_size(_size(out), "a call result")
        return out

    def getattr(self, obj: Any, attribute: str) -> Any:
        self.tick()
        if isinstance(obj, str) and attribute in ("format", "format_map"):
            self.check_format(obj)  # jinja returns a wrapper (no __self__), so check the string here
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        self.tick()
        return super().getitem(obj, argument)

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):  # for x in SEQ -> for x in __apr_loop(SEQ)
            loop.iter = nodes.Call(nodes.Name("__apr_loop", "load"), [loop.iter], [], None, None,
                                   lineno=loop.lineno)
        return tree


def _bounded_filter(env: _BoundedEnvironment, name: str, f: Any) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        env.tick()
        if name == "replace" and len(args) >= 3 and all(isinstance(a, str) for a in args[:3]):
            s_, old, new = args[:3]
            env.check_size(len(s_) + max(len(new) - len(old), 0) * (s_.count(old) if old else len(s_) + 1),
                           "a replace")
        if name == "format" and args and isinstance(args[0], str):
            env.check_format(args[0])
        env.check_args(args[1:], kwargs, f"filter {name}")
        out = f(*args, **kwargs)
        env.check_size(_size(out), f"filter {name}'s result")
        return out

    for attr in ("jinja_pass_arg",):  # pass_context / pass_environment markers
        if hasattr(f, attr):
            setattr(run, attr, getattr(f, attr))
    return run


def compile_chat_template(template: str, source: str) -> jinja2.Template:
    """Compile a chat template in the sandboxed environment.

    Args:
        template: the jinja2 source (``tokenizer.chat_template``).
        source: file name used in error messages.

    Raises:
        ModelFormatError: the template does not compile.
    """
    env = _BoundedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = _tojson
    env.filters = {k: _bounded_filter(env, k, f) for k, f in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["range"] = env.bounded_range
    env.globals["__apr_loop"] = env.bounded_loop
    try:
        return env.from_string(template)
    except (jinja2.TemplateError, RecursionError, MemoryError, ValueError, OverflowError) as exc:
        raise ModelFormatError(f"{source}: invalid tokenizer.chat_template: {type(exc).__name__}: "
                               f"{str(exc)[:200]}") from None


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
            (``raise_exception``).
        ModelFormatError: the template failed while rendering (any exception: ZeroDivisionError,
            OverflowError, an undefined name ...) or exceeded the time or size limit; the message names
            ``source``.
    """
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, Mapping) for m in messages):
        raise ArgumentError("chat messages must be a list of dicts with 'role' and 'content'")
    env_vars: dict[str, Any] = {"tools": None, "documents": None, **variables}
    env = template.environment
    conv = sum(len(str(v)) for m in messages for v in m.values())
    env.limit = MAX_OUTPUT + 2 * conv
    env.deadline = time.monotonic() + RENDER_SECONDS
    parts: list[str] = []
    n = 0
    try:
        for piece in template.generate(
            messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **env_vars
        ):
            n += len(piece)
            env.check_size(n, "the rendered prompt")
            env.tick()
            parts.append(piece)
    except _Rejected as exc:
        raise ArgumentError(f"{source}: chat template rejected the conversation: {exc}") from None
    except TemplateLimit as exc:
        raise ModelFormatError(f"{source}: tokenizer.chat_template exceeds a render limit: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the template is data from the file: any failure is the file's
        raise ModelFormatError(f"{source}: tokenizer.chat_template failed while rendering: "
                               f"{type(exc).__name__}: {str(exc)[:200]}") from None
    finally:
        env.deadline = float("inf")
    return "".join(parts)


# ---------------------------------------------------------------------- jinja helpers (as transformers)


class _Rejected(jinja2.TemplateError):
    """``raise_exception(message)`` from the template: it rejects the conversation."""


def _raise_exception(message: str) -> None:
    raise _Rejected(message)


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
