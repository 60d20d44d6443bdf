"""Tool calls in model output: parse Llama's JSON, <function=...>, built-in and pythonic calls, whole or streamed.

Formats recognised (see llama-models `llama3_1/prompt_format.md`, `llama3_2/text_prompt_format.md`,
`llama3/tool_utils.py`, `llama3/chat_format.py::decode_assistant_message_from_content`):

* JSON: `{"name": "f", "parameters": {...}}` (also `"type": "function"`, `"arguments"`), several may
  follow each other separated by `;` or whitespace.
* function tag: `<function=f>{"a": 1}</function>`, anywhere in the text; the arguments may also be a Python
  literal dict (`{'tz': 'UTC'}`), which llama-models' decoder accepts too.
* built-in: `brave_search.call(query="...")` (also `wolfram_alpha`, `photogen`, or any name after the
  python tag).
* pythonic list (Llama 3.2, Llama 4): `[f(a=1), g(b="x")]`, parsed with `ast.parse` and a strict walk that
  accepts literal arguments only (never `eval`).
* code interpreter: any other text after the python tag is code.

Everything here runs in time linear in the output length, never raises on malformed or partial output
(malformed calls stay plain content), and builds OpenAI-shaped `tool_calls`.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass, field

# Built-in tools of Llama 3.1 (llama_models.datatypes.BuiltinTool); code_interpreter takes raw code.
BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")
_QUERY_TOOLS = ("brave_search", "wolfram_alpha", "photogen")
_FUNCTION_OPEN = "<function="
_FUNCTION_CLOSE = "</function>"
# A function name longer than this is not a function name; bounds the scan after each `<function=`.
_MAX_NAME = 256
# Nesting deeper than this is not a tool call (bounds recursion in the literal walk and the parser).
_MAX_DEPTH = 64
# `<function=f>{'a': 1}</function>` arguments that are not JSON are read as a Python literal up to this size.
_MAX_LITERAL_ARGS = 1 << 16
_json = json.JSONDecoder()


@dataclass(frozen=True)
class ToolSyntax:
    """The special-token literals one chat format uses around tool calls, as they appear in decoded text."""

    python_start: str | None = "<|python_tag|>"  # Llama 3: `<|python_tag|>`; Llama 4: `<|python_start|>`
    python_end: str | None = None  # Llama 4: `<|python_end|>`
    end_of_turn: tuple[str, ...] = ("<|eot_id|>",)
    end_of_message: tuple[str, ...] = ("<|eom_id|>",)
    header: str | None = None  # an assistant header the text may start with (decoded prompt echo)
    calls: bool = True  # False: the family has no tool calling (Llama 2); output is plain content


LLAMA3_SYNTAX = ToolSyntax(header="<|start_header_id|>assistant<|end_header_id|>\n\n")
LLAMA4_SYNTAX = ToolSyntax(
    python_start="<|python_start|>",
    python_end="<|python_end|>",
    end_of_turn=("<|eot|>",),
    end_of_message=("<|eom|>",),
    header="<|header_start|>assistant<|header_end|>\n\n",
)
NO_TOOLS = ToolSyntax(python_start=None, end_of_turn=(), end_of_message=(), calls=False)
LLAMA2_SYNTAX = ToolSyntax(python_start=None, end_of_turn=("</s>",), end_of_message=(), calls=False)


def make_tool_call(name: str, arguments: dict, call_id: str | None = None) -> dict:
    """An OpenAI-shaped tool call; `arguments` is a JSON string as the OpenAI API carries it."""
    return {
        "id": call_id or f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


# ---------------------------------------------------------------------------------------------------------
# Strict literal walk for pythonic calls
# ---------------------------------------------------------------------------------------------------------


class _NotLiteral(Exception):
    pass


_JSON_NAMES = {"true": True, "false": False, "null": None}


def _literal(node: ast.AST, depth: int = 0, json_names: bool = False):
    """The value of a literal AST node; anything else (names, calls, operators) is rejected.

    `json_names` also reads the bare names `true`, `false` and `null` as JSON's constants.
    """
    if depth > _MAX_DEPTH:
        raise _NotLiteral("too deep")
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool, type(None))):
        return node.value
    if json_names and isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        if isinstance(node.operand, ast.Constant) and type(node.operand.value) in (int, float):
            return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
        raise _NotLiteral("unary operator on a non-number")
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e, depth + 1, json_names) for e in node.elts]
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values):
            if k is None:  # `**spread`
                raise _NotLiteral("dict spread")
            key = _literal(k, depth + 1, json_names)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise _NotLiteral("unhashable key")
            out[key] = _literal(v, depth + 1, json_names)
        return out
    raise _NotLiteral(type(node).__name__)


def _call_name(func: ast.AST) -> str | None:
    """`f` or a dotted `pkg.f` made only of names."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    parts.append(func.id)
    return ".".join(reversed(parts))


def parse_pythonic(text: str) -> list[tuple[str, dict]] | None:
    """`[f(a=1), g(b="x")]` -> [("f", {"a": 1}), ("g", {"b": "x"})]; None if the text is anything else."""
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return None
    calls = []
    for node in tree.body.elts:
        if not isinstance(node, ast.Call) or node.args:
            return None
        name = _call_name(node.func)
        if name is None or any(kw.arg is None for kw in node.keywords):
            return None
        try:
            calls.append((name, {kw.arg: _literal(kw.value) for kw in node.keywords}))
        except (_NotLiteral, RecursionError):
            return None
    return calls


def parse_builtin(text: str, any_name: bool) -> tuple[str, dict] | None:
    """`brave_search.call(query="...")` -> ("brave_search", {"query": ...}).

    Only Llama's query tools are accepted unless `any_name` (the text followed the python tag).
    """
    text = text.strip()
    if not text.endswith(")") or ".call(" not in text[:_MAX_NAME + 6]:
        return None
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    node = tree.body
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "call"
            and isinstance(node.func.value, ast.Name) and not node.args):
        return None
    name = node.func.value.id
    if not any_name and name not in _QUERY_TOOLS:
        return None
    if any(kw.arg is None for kw in node.keywords):
        return None
    try:
        return name, {kw.arg: _literal(kw.value) for kw in node.keywords}
    except (_NotLiteral, RecursionError):
        return None


def _json_call(obj) -> tuple[str, dict] | None:
    """A decoded JSON object that is a tool call: {"name", "parameters"|"arguments"} (optionally "type")."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if obj.get("type", "function") != "function":
        return None
    args = obj.get("parameters", obj.get("arguments", {}))
    if isinstance(args, str):  # some fine-tunes emit arguments as a JSON string
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], args


def parse_json_calls(text: str) -> list[tuple[str, dict]] | None:
    """One or more JSON tool-call objects making up the whole text (separated by `;` or whitespace)."""
    calls, i, n = [], 0, len(text)
    while True:
        while i < n and text[i] in " \t\r\n;":
            i += 1
        if i == n:
            break
        try:
            obj, i = _json.raw_decode(text, i)
        except (ValueError, RecursionError):
            return None
        call = _json_call(obj)
        if call is None:
            return None
        calls.append(call)
    return calls or None


# One token of a Python-literal dict: a quoted string (either quote, backslash escapes, one line), a bracket,
# or a run of anything else. Alternatives are disjoint, so matching is linear.
_LITERAL_TOKEN = re.compile(r"""'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*"|[{}\[\]()]|[^'"{}\[\]()]+""")


def _literal_object(segment: str) -> tuple[dict, int] | None:
    """A Python-literal dict at the start of `segment` (`{'tz': 'UTC'}`, JSON's true/false/null allowed).

    llama-models' `maybe_extract_custom_tool_call` accepts these arguments by swapping every `'` for `"` and
    decoding JSON; here the dict is delimited by a bracket scan that skips quoted strings, parsed with
    `ast.parse` and read by the strict literal walk (never `eval`). Returns (dict, characters used) or None.
    Bounded: at most _MAX_LITERAL_ARGS characters and _MAX_DEPTH brackets deep.
    """
    depth, pos, limit = 0, 0, min(len(segment), _MAX_LITERAL_ARGS)
    while pos < limit:
        m = _LITERAL_TOKEN.match(segment, pos, limit)
        if m is None:  # an unterminated string
            return None
        tok, pos = m.group(), m.end()
        if tok in "{[(":
            depth += 1
            if depth > _MAX_DEPTH:
                return None
        elif tok in "}])":
            depth -= 1
            if depth == 0:
                break
    else:
        return None
    try:
        tree = ast.parse(segment[:pos], mode="eval")
        value = _literal(tree.body, json_names=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError, _NotLiteral):
        return None
    return (value, pos) if isinstance(value, dict) else None


def extract_function_tags(text: str) -> tuple[list[tuple[str, dict]], str] | None:
    """`<function=f>{...}</function>` anywhere; returns (calls, text outside them) or None if there are none.

    A malformed tag stays in the text. Linear time: the arguments of each tag are decoded from the segment
    that ends at the next `</function>` or `<function=`, so no character is decoded twice (a JSON error on
    the whole text would also cost O(position) just to compute its line number).
    """
    calls, kept, i, n = [], [], 0, len(text)
    close_at = -1  # next `</function>` at or after the current position (n if none); found once per tag
    while True:
        j = text.find(_FUNCTION_OPEN, i)
        if j < 0:
            break
        name_start = j + len(_FUNCTION_OPEN)
        close = text.find(">", name_start, name_start + _MAX_NAME)
        name = text[name_start:close].strip() if close > 0 else ""
        ok = False
        if name and "<" not in name and "{" not in name:
            k = close + 1
            while k < n and text[k] in " \t\r\n":
                k += 1
            if k < n and text[k] == "{":
                if close_at < k:
                    close_at = text.find(_FUNCTION_CLOSE, k)
                    close_at = n if close_at < 0 else close_at
                next_open = text.find(_FUNCTION_OPEN, k, close_at)
                stop = close_at if next_open < 0 else next_open
                segment = text[k:stop]
                try:
                    args, used = _json.raw_decode(segment)
                except (ValueError, RecursionError):
                    args = None
                if not isinstance(args, dict):  # single-quoted arguments, as the reference also accepts
                    args, used = _literal_object(segment) or (None, 0)
                if isinstance(args, dict):
                    end = k + used
                    if text.startswith(_FUNCTION_CLOSE, end):
                        end += len(_FUNCTION_CLOSE)
                    kept.append(text[i:j])
                    calls.append((name, args))
                    i, ok = end, True
        if not ok:
            kept.append(text[i:name_start])
            i = name_start
    if not calls:
        return None
    kept.append(text[i:])
    return calls, "".join(kept)


# ---------------------------------------------------------------------------------------------------------
# Whole-message parser
# ---------------------------------------------------------------------------------------------------------


def _builtin_args(name: str, args: dict) -> tuple[str, dict]:
    """Custom-shaped call to a built-in tool: keep only its query (as llama-models' decoder does)."""
    if name in _QUERY_TOOLS and list(args) != ["query"] and args:
        return name, {"query": next(iter(args.values()))}
    return name, args


def parse_tool_output(text: str, syntax: ToolSyntax = LLAMA3_SYNTAX) -> dict:
    """Parse a complete assistant output into an OpenAI-shaped message.

    Returns {"role": "assistant", "content": str | None, "tool_calls": [...], "stop_reason": ...} where
    `stop_reason` is "end_of_turn", "end_of_message" or None (no end token in the text).
    """
    content = text.strip(" ")
    if syntax.header and content.startswith(syntax.header):
        content = content[len(syntax.header):]
    ipython = bool(syntax.python_start) and content.startswith(syntax.python_start)
    if ipython:
        content = content[len(syntax.python_start):]
        if syntax.python_end:
            content = content.replace(syntax.python_end, "")
    stop_reason = None
    for lit in syntax.end_of_turn:
        if content.endswith(lit):
            content, stop_reason = content[: -len(lit)], "end_of_turn"
            break
    else:
        for lit in syntax.end_of_message:
            if content.endswith(lit):
                content, stop_reason = content[: -len(lit)], "end_of_message"
                break

    calls: list[tuple[str, dict]] | None = None
    rest = ""
    if not syntax.calls:
        return {"role": "assistant", "content": content, "tool_calls": [], "stop_reason": stop_reason}
    tagged = extract_function_tags(content)
    if tagged is not None:
        calls, rest = tagged
        rest = rest.strip()
    else:
        stripped = content.strip()
        if stripped.startswith("{"):
            calls = parse_json_calls(stripped)
        elif stripped.startswith("["):
            calls = parse_pythonic(stripped)
        else:
            one = parse_builtin(stripped, any_name=ipython)
            calls = [one] if one else None
        if calls is None and ipython:
            calls = [("code_interpreter", {"code": content})]
    if calls:
        tool_calls = [make_tool_call(*_builtin_args(n, a)) for n, a in calls]
        return {"role": "assistant", "content": rest or None, "tool_calls": tool_calls, "stop_reason": stop_reason}
    return {"role": "assistant", "content": content, "tool_calls": [], "stop_reason": stop_reason}


# ---------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------


def _is_prefix_of_any(s: str, literals: tuple[str, ...]) -> bool:
    return any(lit.startswith(s) for lit in literals)


@dataclass
class ToolCallParser:
    """Streaming parser: `feed(delta)` returns the text safe to show now; `finish()` the final message.

    Text that may be the start of a tool call is held back and released as soon as it cannot be one.
    Once a tool call has begun, the rest is held and parsed at `finish()`, which returns exactly
    `parse_tool_output(all fed text)`; for plain answers the released deltas join to its content.
    """

    syntax: ToolSyntax = LLAMA3_SYNTAX
    _buf: list[str] = field(default_factory=list)  # every character fed, for finish()
    _pending: str = ""  # held back, not yet released
    _mode: str = "start"  # "start" -> "content" | "tool"
    _released: int = 0

    def _starts(self) -> tuple[str, ...]:
        s = [_FUNCTION_OPEN] + [f"{name}.call(" for name in _QUERY_TOOLS]
        if self.syntax.python_start:
            s.append(self.syntax.python_start)
        if self.syntax.header:
            s.append(self.syntax.header)
        return tuple(s)

    def _watch(self) -> tuple[str, ...]:
        """Literals that matter inside plain content: a function tag and the end tokens (stripped at finish)."""
        tag = (_FUNCTION_OPEN,) if self.syntax.calls else ()
        return (*tag, *self.syntax.end_of_turn, *self.syntax.end_of_message)

    def feed(self, delta: str) -> str:
        if not delta:
            return ""
        self._buf.append(delta)
        if self._mode == "tool":
            return ""
        self._pending += delta
        if self._mode == "start":
            self._decide_start()
            if self._mode != "content":
                return ""
        return self._release_content()

    def _decide_start(self) -> None:
        head = self._pending.lstrip(" \t\r\n")
        if not head:
            return
        if not self.syntax.calls:
            self._mode = "content"
            return
        starts = self._starts()
        if any(head.startswith(s) for s in starts):
            self._mode = "tool"
        elif head[0] == "{":
            rest = head[1:].lstrip(" \t\r\n")
            if not rest:
                return
            self._mode = "tool" if rest[0] == '"' else "content"
        elif head[0] == "[":
            self._mode = self._pythonic_prefix(head)
        elif _is_prefix_of_any(head, starts):
            return  # still ambiguous, e.g. "<func" or "brave_se"
        else:
            self._mode = "content"

    @staticmethod
    def _pythonic_prefix(head: str) -> str:
        """'[ name(' opens a pythonic call list; decide as soon as the prefix rules it in or out."""
        i, n = 1, len(head)
        while i < n and head[i] in " \t\r\n":
            i += 1
        j = i
        while j < n and (head[j].isalnum() or head[j] in "_."):
            j += 1
        if j == n:
            return "start" if (j == i or head[i].isalpha() or head[i] == "_") else "content"
        if j == i or not (head[i].isalpha() or head[i] == "_"):
            return "content"
        return "tool" if head[j] == "(" else "content"

    def _release_content(self) -> str:
        p = self._pending
        k = p.find(_FUNCTION_OPEN) if self.syntax.calls else -1
        if k >= 0:  # a function tag mid-answer: release what came before, hold the rest
            self._mode = "tool"
            self._pending = ""
            return self._emit(p[:k])
        # Hold back the longest tail that could still grow into a watched literal.
        hold = 0
        for lit in self._watch():
            for m in range(min(len(lit), len(p)), 0, -1):
                if p.endswith(lit[:m]):
                    hold = max(hold, m)
                    break
        out, self._pending = (p[: len(p) - hold], p[len(p) - hold:]) if hold else (p, "")
        return self._emit(out)

    def _emit(self, s: str) -> str:
        if self._released == 0:
            s = s.lstrip(" ")  # parse_tool_output strips leading spaces
        self._released += len(s)
        return s

    def finish(self) -> dict:
        """The final message: exactly `parse_tool_output` of everything fed."""
        return parse_tool_output("".join(self._buf), self.syntax)

    def flush(self) -> str:
        """Text held back that turned out to be plain content (call at end of stream, before finish)."""
        msg = self.finish()
        if self._mode == "tool" and msg["tool_calls"]:
            return ""
        content = msg["content"] or ""
        # Plain answer: release whatever of the final content was not yet shown.
        return content[self._released:] if self._released <= len(content) else ""
