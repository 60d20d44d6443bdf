"""A checkpoint's own Hugging Face `chat_template` (Jinja), rendered in a bounded sandbox the way transformers does.

Behaviour follows transformers `utils/chat_template_utils.py` (`_cached_compile_jinja_template`,
`render_jinja_template`): `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the
loop-controls extension, `raise_exception`, `strftime_now`, a `tojson` filter that is plain `json.dumps`
(ensure_ascii=False, no HTML escaping), and the variables `messages`, `tools`, `documents`,
`add_generation_prompt`, `bos_token`, `eos_token` (plus any extra template variables).

Templates are untrusted code. Beyond Jinja's sandbox (no `__class__` and friends), every render has a
budget: a cap on operations (attribute/item access, calls, range items), a wall-clock deadline, a cap on
the size of any value and of the output, and size checks on `*`, `**`, `%` and padding filters. Any
breach or template error becomes `ChatFormatError`.

Special-token literals a user typed stay plain text: before rendering they are swapped for private-use
sentinels, and swapped back only inside the text pieces after the output is split on special tokens.
"""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ChatFormatError
from .base import ChatFormat, Segment, S, T
from .tools import LLAMA3_SYNTAX, LLAMA4_SYNTAX, ToolSyntax

MAX_OPS = 2_000_000  # attribute/item lookups, calls and range items per render
MAX_SECONDS = 5.0  # wall-clock budget per render
MAX_VALUE = 4_000_000  # longest string/list any expression may produce
MAX_OUTPUT = 8_000_000  # characters of rendered prompt
MAX_WIDTH = 10_000  # padding widths in %-formats, str.format, center, indent
_SENTINEL_BASE = 0xF0000  # Supplementary Private Use Area-A: one sentinel character per special token
_WIDTH = re.compile(r"(\d{5,})")


class _Budget(threading.local):
    ops = 0
    deadline = 0.0
    active = False


def _size(value) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox plus per-render operation, time and size limits."""

    intercepted_binops = frozenset(["*", "**", "%", "+"])

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.budget = _Budget()

    # -- budget ------------------------------------------------------------------------------------------
    def tick(self, n: int = 1) -> None:
        b = self.budget
        if not b.active:
            return
        b.ops += n
        if b.ops > MAX_OPS:
            raise jinja2.exceptions.SecurityError(f"chat template exceeded {MAX_OPS} operations")
        if b.ops % 256 == 0 and time.monotonic() > b.deadline:
            raise jinja2.exceptions.SecurityError(f"chat template ran longer than {MAX_SECONDS} s")

    def checked(self, value):
        if _size(value) > MAX_VALUE:
            raise jinja2.exceptions.SecurityError(f"chat template built a value longer than {MAX_VALUE}")
        return value

    # -- hooks the compiled template goes through ---------------------------------------------------------
    def getattr(self, obj, attribute):
        self.tick()
        return self.checked(super().getattr(obj, attribute))

    def getitem(self, obj, argument):
        self.tick()
        return self.checked(super().getitem(obj, argument))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature)
        __self.tick()
        target = getattr(__obj, "__wrapped__", __obj)  # Jinja wraps str.format in a sandboxed formatter
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str) and getattr(target, "__name__", "") in ("format", "format_map", "center", "ljust",
                                                                          "rjust", "zfill", "expandtabs"):
            if _WIDTH.search(owner) or any(isinstance(a, int) and a > MAX_WIDTH for a in args):
                raise jinja2.exceptions.SecurityError("chat template used a format width past the limit")
        return __self.checked(super().call(__context, __obj, *args, **kwargs))

    def unsafe_undefined(self, obj, attribute):
        # Jinja returns an Undefined that fails only when used; a template probing internals is hostile: stop.
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def call_binop(self, context, operator, left, right):
        self.tick()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _size(seq) and isinstance(n, int) and _size(seq) * n > MAX_VALUE:
                    raise jinja2.exceptions.SecurityError("chat template repeated a value past the size limit")
        elif operator == "**" and isinstance(right, (int, float)) and abs(right) > 256 and left not in (0, 1, -1):
            raise jinja2.exceptions.SecurityError("chat template raised to a power past the limit")
        elif operator == "%" and isinstance(left, str) and _WIDTH.search(left):
            raise jinja2.exceptions.SecurityError("chat template used a format width past the limit")
        return self.checked(super().call_binop(context, operator, left, right))


def _bounded_range(env: BoundedSandbox):
    def brange(*args):
        r = range(*args)
        if len(r) > MAX_VALUE:
            raise jinja2.exceptions.SecurityError(f"range of {len(r)} items exceeds the limit {MAX_VALUE}")
        for i in r:
            env.tick()
            yield i

    return brange


def _width_checked(name, fn):
    def wrapper(value, width=80, *args, **kwargs):
        if isinstance(width, int) and width > MAX_WIDTH:
            raise jinja2.exceptions.SecurityError(f"chat template asked `{name}` for width {width}")
        return fn(value, width, *args, **kwargs)

    return wrapper


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers overrides Jinja's tojson: plain json.dumps, no HTML escaping.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def compile_template(source: str) -> jinja2.Template:
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    for name in ("center", "indent", "batch"):
        env.filters[name] = _width_checked(name, env.filters[name])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["range"] = _bounded_range(env)
    env.globals.pop("lipsum", None)  # lipsum(n) builds n paragraphs: no use in a chat template
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as exc:
        raise ChatFormatError(f"chat_template does not compile: {exc}; fix the template (tokenizer_config.json)") from None
    except RecursionError:  # jinja2's parser recurses once per nesting level: "{{{{{..." (found by fuzzing)
        raise ChatFormatError("chat_template nests too deeply to compile; fix the template (tokenizer_config.json)") \
            from None
    except ValueError as exc:  # the lexer's int() of a literal past Python's 4300 digits (found by fuzzing)
        raise ChatFormatError(f"chat_template does not compile: {exc}; fix the template (tokenizer_config.json)") \
            from None


class HFTemplateFormat(ChatFormat):
    """Renders with the checkpoint's `chat_template`; ids come from splitting the text on special tokens."""

    name = "hf"

    def __init__(self, tokenizer, template: str, bos_token: str | None = None, eos_token: str | None = None,
                 template_vars: dict | None = None) -> None:
        super().__init__(tokenizer)
        self.source = template
        self.template = compile_template(template)
        specials = dict(getattr(tokenizer, "special_tokens", {}) or {})
        by_id = {v: k for k, v in specials.items()}
        self.bos_token = bos_token if bos_token is not None else by_id.get(getattr(tokenizer, "bos_id", None), "")
        self.eos_token = eos_token if eos_token is not None else by_id.get(getattr(tokenizer, "eos_id", None), "")
        self.template_vars = dict(template_vars or {})
        self.literals = sorted(specials, key=len, reverse=True)
        self._split = re.compile("|".join(map(re.escape, self.literals))) if self.literals else None
        self._to_sentinel = {lit: chr(_SENTINEL_BASE + i) for i, lit in enumerate(self.literals)}
        self._from_sentinel = str.maketrans({v: k for k, v in self._to_sentinel.items()})
        if "<|python_tag|>" in specials:
            self.syntax = LLAMA3_SYNTAX
        elif "<|python_start|>" in specials:
            self.syntax = LLAMA4_SYNTAX
        else:
            self.syntax = ToolSyntax(python_start=None, end_of_turn=(self.eos_token,) if self.eos_token else (),
                                     end_of_message=())
        self.stop_literals = tuple(
            s for s in ("<|eot_id|>", "<|eom_id|>", "<|eot|>", "<|eom|>", "<|end_of_text|>", "<|im_end|>",
                        "<end_of_turn>", self.eos_token) if s and s in specials
        )

    # -- protecting user text ----------------------------------------------------------------------------
    def _protect(self, value):
        if isinstance(value, str):
            return self._split.sub(lambda m: self._to_sentinel[m.group()], value) if self._split else value
        if isinstance(value, dict):
            return {k: self._protect(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._protect(v) for v in value]
        if value is None or isinstance(value, (int, float, bool)):
            return value
        return f"<{type(value).__name__}>"  # like transformers: rich objects become inert placeholders

    def render_raw(self, messages, tools=None, add_generation_prompt=True) -> str:
        """The template's output with user-typed special literals still as sentinels."""
        ctx = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            **self.template_vars,
            "messages": self._protect(list(messages)),
            "tools": self._protect(tools) if tools is not None else None,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }
        env: BoundedSandbox = self.template.environment
        b = env.budget
        b.ops, b.deadline, b.active = 0, time.monotonic() + MAX_SECONDS, True
        out, n = [], 0
        try:
            for chunk in self.template.generate(**ctx):
                n += len(chunk)
                if n > MAX_OUTPUT:
                    raise jinja2.exceptions.SecurityError(f"chat template output exceeded {MAX_OUTPUT} characters")
                out.append(chunk)
        except jinja2.exceptions.TemplateError as exc:
            raise ChatFormatError(f"chat_template failed: {exc}") from None
        except (RecursionError, MemoryError, OverflowError, TypeError, ValueError, KeyError, IndexError,
                AttributeError, ZeroDivisionError) as exc:
            raise ChatFormatError(f"chat_template failed: {type(exc).__name__}: {exc}") from None
        finally:
            b.active = False
        return "".join(out)

    def pieces(self, messages, tools=None, add_generation_prompt=True) -> list[Segment]:
        text = self.render_raw(messages, tools, add_generation_prompt)
        out: list[Segment] = []
        pos = 0
        if self._split is not None:
            for m in self._split.finditer(text):
                if m.start() > pos:
                    out.append(T(text[pos:m.start()].translate(self._from_sentinel)))
                out.append(S(m.group()))
                pos = m.end()
        if pos < len(text):
            out.append(T(text[pos:].translate(self._from_sentinel)))
        return out
