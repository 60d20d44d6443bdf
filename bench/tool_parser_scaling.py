"""How the tool-call parser's time grows with adversarial input: for each repeated opener, the time for 0.5 MB
and 1 MB (best of three) and their ratio, which is ~2 for a linear parser and ~4 for a quadratic one.

    .venv/bin/python bench/tool_parser_scaling.py
"""

from __future__ import annotations

import os
import time

from llamaherd.chat.tools import LLAMA3_SYNTAX, ToolCallParser, parse_tool_output

UNITS = ["<function=f>{", "[f(", '{"name": ', "<|python_tag|>", "brave_search.call(", "<function=", "[[[[",
         '<function=f>{"a": "', "<function=f>{'a': ["]


def seconds(text: str) -> float:
    t0 = time.perf_counter()
    parse_tool_output(text)
    p = ToolCallParser(LLAMA3_SYNTAX)
    for i in range(0, len(text), 4096):
        p.feed(text[i:i + 4096])
    p.flush()
    return time.perf_counter() - t0


def main() -> None:
    print(f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'opener':<24}{'0.5 MB s':>10}{'1 MB s':>10}{'ratio':>8}")
    for unit in UNITS:
        half, full = ((unit * (n // len(unit))) for n in (1 << 19, 1 << 20))
        t1 = min(seconds(half) for _ in range(3))
        t2 = min(seconds(full) for _ in range(3))
        print(f"{unit!r:<24}{t1:>10.3f}{t2:>10.3f}{t2 / t1:>8.2f}")


if __name__ == "__main__":
    main()
