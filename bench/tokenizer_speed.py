"""Encoding speed of llamaherd's Llama 3/4 tokenizers against calling tiktoken directly (and Meta's wrapper).

Usage: .venv/bin/python bench/tokenizer_speed.py [--mb 4] [--repeat 5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import llama_models
from llama_models.llama3.tokenizer import Tokenizer as Meta3
from llama_models.llama4.tokenizer import Tokenizer as Meta4

from llamaherd.tokenizer import Tokenizer

MULTILINGUAL = (
    "我爱自然语言处理。日本語のテキスト。한국어 문장. مرحبا بالعالم! नमस्ते दुनिया। "
    "Emoji 👨‍👩‍👧‍👦 🦙 and accents: naïve café Zürich.\n"
)


def sample_text(megabytes: float) -> str:
    """Real source code and documentation (the installed llama_models package) plus multilingual lines."""
    root = Path(llama_models.__file__).parent
    files = sorted(p for p in root.rglob("*") if p.suffix in {".py", ".md", ".txt", ".json"} and p.is_file())
    parts, size, want = [], 0, int(megabytes * 1_000_000)
    while size < want:
        for p in files:
            text = p.read_text(encoding="utf-8", errors="replace") + MULTILINGUAL
            parts.append(text)
            size += len(text.encode("utf-8"))
            if size >= want:
                break
    return "".join(parts)


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=4.0, help="size of the text in MB of UTF-8")
    ap.add_argument("--repeat", type=int, default=5, help="runs per contender; the best is reported")
    args = ap.parse_args()
    text = sample_text(args.mb)
    print(f"text: {len(text.encode('utf-8')) / 1e6:.2f} MB, {len(text):,} characters; best of {args.repeat}")
    print(f"{'tokenizer':8} {'tiktoken direct':>16} {'llamaherd':>10} {'ratio':>6} {'llama-models':>13} {'tokens':>10}")
    for name, ours, meta in (("llama3", Tokenizer.llama3(), Meta3.get_instance()), ("llama4", Tokenizer.llama4(), Meta4.get_instance())):
        ids = ours.encode(text)
        assert ids == meta.encode(text, bos=False, eos=False), "ids differ from llama-models"
        direct = best_of(lambda: meta.model.encode_ordinary(text), args.repeat)  # one plain tiktoken call
        mine = best_of(lambda: ours.encode(text), args.repeat)
        ref = best_of(lambda: meta.encode(text, bos=False, eos=False), args.repeat)
        print(f"{name:8} {direct:15.3f}s {mine:9.3f}s {mine / direct:6.2f} {ref:12.3f}s {len(ids):10,}")


if __name__ == "__main__":
    main()
