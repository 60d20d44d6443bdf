"""Tool definitions and tool calls as prompt text, in the wordings Meta documents for Llama 3.1, 3.2 and 4.

Sources: llama-models `llama3_1/prompt_format.md` (built-in tools, JSON and `<function>` custom tools),
`llama3_2/text_prompt_format.md` (pythonic calls), `llama3/tool_utils.py::ToolUtils.encode_tool_call`
(how a past call is written back into the dialog).
"""

from __future__ import annotations

import datetime as _dt
import json
import math

from ..errors import ChatFormatError
from .tools import BUILTIN_TOOLS

TOOL_FORMATS = ("json", "function_tag", "python_list")
KNOWLEDGE_CUTOFF = "December 2023"  # Llama 3.1 / 3.2 prompt_format.md: "Cutting Knowledge Date: December 2023"


def split_tools(tools) -> tuple[list[str], list[dict]]:
    """(built-in tool names, custom function definitions) from OpenAI-shaped `tools`.

    A built-in tool is written `{"type": "brave_search"}` (also `wolfram_alpha`, `code_interpreter`,
    `photogen`) or as the bare string; a custom tool is `{"type": "function", "function": {...}}`.
    """
    if tools is None:
        return [], []
    if not isinstance(tools, (list, tuple)):
        raise ChatFormatError(f"tools must be a list of tool definitions, got {type(tools).__name__}")
    builtins, custom = [], []
    for i, tool in enumerate(tools):
        kind = tool if isinstance(tool, str) else tool.get("type") if isinstance(tool, dict) else None
        if kind in BUILTIN_TOOLS:
            builtins.append(kind)
        elif kind == "function" and isinstance(tool.get("function"), dict) and isinstance(tool["function"].get("name"), str):
            custom.append(tool)
        else:
            raise ChatFormatError(
                f"tools[{i}]: expected {{'type': 'function', 'function': {{'name': ..., 'description': ..., "
                f"'parameters': ...}}}} or a built-in tool type ({', '.join(BUILTIN_TOOLS)})"
            )
    return builtins, custom


def today_string(today: str | _dt.date | None) -> str:
    """'21 September 2024', the date style of Meta's prompt_format.md."""
    if isinstance(today, str):
        return today
    d = today or _dt.date.today()
    return f"{d.day:02d} {d.strftime('%B %Y')}"


def ipython_system(builtins: list[str], today: str, system_text: str) -> str:
    """The Llama 3.1 system message that turns tools on ("Environment: ipython", dates, then the user's text)."""
    listed = [b for b in builtins if b != "code_interpreter"]  # ipython alone enables code_interpreter
    env = "Environment: ipython\nTools: " + ", ".join(listed) if listed else "Environment: ipython\n"
    text = f"{env}\nCutting Knowledge Date: {KNOWLEDGE_CUTOFF}\nToday Date: {today}\n"
    if system_text:
        text += f"\n{system_text}\n"
    return text


def json_tools_user(custom: list[dict]) -> str:
    """Llama 3.1 zero-shot JSON tool calling: the instructions sent as a user message before the question."""
    defs = "\n\n".join(json.dumps(t, indent=4) for t in custom)
    return (
        "Answer the user's question by making use of the following functions if needed.\n"
        "If none of the function can be used, please say so.\n"
        "Here is a list of functions in JSON format:\n"
        f"{defs}\n\nReturn function calls in JSON format."
    )


def function_tag_user(custom: list[dict]) -> str:
    """Llama 3.1 `<function=...>` tool calling: the instructions sent as a user message."""
    lines = ["You have access to the following functions:\n"]
    for t in custom:
        f = t["function"]
        lines.append(f"Use the function '{f['name']}' to '{f.get('description', '')}':\n{json.dumps(f)}\n")
    lines.append(
        "Think very carefully before calling functions.\n"
        "If you choose to call a function ONLY reply in the following format with no prefix or suffix:\n\n"
        '<function=example_function_name>{"example_name": "example_value"}</function>\n\n'
        "Reminder:\n"
        "- Function calls MUST follow the specified format, start with <function= and end with </function>\n"
        "- Required parameters MUST be specified\n"
        "- Only call one function at a time\n"
        "- Put the entire function call reply on one line"
    )
    return "\n".join(lines)


def pythonic_system(custom: list[dict], system_text: str) -> str:
    """Llama 3.2 / Llama 4 zero-shot pythonic function calling: the system message."""
    defs = json.dumps([t["function"] for t in custom], indent=4)
    text = (
        "You are an expert in composing functions. You are given a question and a set of possible functions.\n"
        "Based on the question, you will need to make one or more function/tool calls to achieve the purpose.\n"
        "If none of the function can be used, point it out. If the given question lacks the parameters required "
        "by the function,\nalso point it out. You should only return the function call in tools call sections.\n\n"
        "If you decide to invoke any of the function(s), you MUST put it in the format of "
        "[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]\n"
        "You SHOULD NOT include any other text in the response.\n\n"
        f"Here is a list of functions in JSON format that you can invoke.\n\n{defs}"
    )
    return f"{text}\n\n{system_text}" if system_text else text


# ---------------------------------------------------------------------------------------------------------
# Past tool calls written back into the dialog
# ---------------------------------------------------------------------------------------------------------


# llama-models writes past pythonic calls with `format_value` (`llama3/tool_utils.py::ToolUtils.encode_tool_call`):
# strings in double quotes exactly as they are, scalars with `str()`, lists as `[a, b]` and dicts as `{k=v}`.
# That is what Meta's own stack shows the model, so it is the default ("reference"). It is not always Python:
# `{k=v}`, and a string holding a double quote, a backslash or a newline, do not parse back (not even with
# llama-models' own `parse_python_list_for_function_calls`). `literals="python"` writes real Python literals
# (strings escaped, dicts as `{"k": v}`) for callers who need the dialog to read back as Python.
LITERAL_STYLES = ("reference", "python")


def _reference_value(v) -> str:
    """llama-models' `format_value`, type for type."""
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, (int, float, bool)) or v is None:
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_reference_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}={_reference_value(x)}" for k, x in v.items()) + "}"
    raise ChatFormatError(f"tool-call argument of type {type(v).__name__} cannot be written as a Python literal")


def _python_value(v) -> str:
    """A Python literal that `ast.literal_eval` reads back as `v` (JSON string escapes are Python's too)."""
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, bool) or v is None or isinstance(v, int):
        return repr(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ChatFormatError(f"tool-call argument {v} has no Python literal; use literals='reference'")
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_python_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_python_value(str(k))}: {_python_value(x)}" for k, x in v.items()) + "}"
    raise ChatFormatError(f"tool-call argument of type {type(v).__name__} cannot be written as a Python literal")


def _value_writer(literals: str):
    if literals == "reference":
        return _reference_value
    if literals == "python":
        return _python_value
    raise ChatFormatError(f"unknown literals style {literals!r}; expected one of {', '.join(LITERAL_STYLES)}")


def encode_call(name: str, args: dict, tool_format: str, literals: str = "reference") -> str:
    """One past call as the model writes it (llama-models `ToolUtils.encode_tool_call`).

    `literals` picks how values are written in built-in and pythonic calls (see LITERAL_STYLES above).
    """
    value = _value_writer(literals)
    if name in ("brave_search", "wolfram_alpha", "photogen"):
        q = args.get("query", "")
        # The reference writes `query="{q}"` whatever the value; the python style writes its literal.
        return f'{name}.call(query="{q}")' if literals == "reference" else f"{name}.call(query={value(q)})"
    if name == "code_interpreter":
        return str(args.get("code", ""))
    if tool_format == "json":
        return json.dumps({"type": "function", "name": name, "parameters": args})
    if tool_format == "function_tag":
        return f"<function={name}>{json.dumps(args)}</function>"
    if tool_format == "python_list":
        return "[" + pythonic_call(name, args, literals) + "]"
    raise ChatFormatError(f"unknown tool_format {tool_format!r}; expected one of {', '.join(TOOL_FORMATS)}")


def pythonic_call(name: str, args: dict, literals: str = "reference") -> str:
    """`name(k=v, ...)`, values written in the `literals` style."""
    value = _value_writer(literals)
    return f"{name}(" + ", ".join(f"{k}={value(v)}" for k, v in args.items()) + ")"
