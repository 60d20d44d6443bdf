"""Shared by `herd run` and `herd chat`: sampling flags, model loading with a progress line, streamed output."""

from __future__ import annotations

import argparse
import difflib
import itertools
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from ..errors import ModelNotFoundError

# flag -> SamplingParams field (or num_ctx), with the Ollama / llama.cpp spelling users already know.
SAMPLING_FLAGS: list[tuple[str, str, type, str]] = [
    ("--temperature", "temperature", float, "0 = greedy"),
    ("--top-k", "top_k", int, "keep the k most likely tokens (0 = off)"),
    ("--top-p", "top_p", float, "nucleus sampling mass (1 = off)"),
    ("--min-p", "min_p", float, "drop tokens below min_p x the top probability"),
    ("--typical-p", "typical_p", float, "locally typical sampling mass (1 = off)"),
    ("--repeat-penalty", "repetition_penalty", float, "penalise tokens already in the context (1 = off)"),
    ("--repeat-last-n", "penalty_last_n", int, "window of the repeat penalty (-1 = whole context)"),
    ("--presence-penalty", "presence_penalty", float, "OpenAI presence penalty"),
    ("--frequency-penalty", "frequency_penalty", float, "OpenAI frequency penalty"),
    ("--seed", "seed", int, "random seed: same seed, same output"),
    ("--max-tokens", "max_tokens", int, "most tokens to generate (default -1: until the model stops)"),
    ("--num-ctx", "num_ctx", int, "context window in tokens (at most the model's max_seq_len)"),
]


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the checkpoint's generation config)")
    for flag, dest, typ, help_ in SAMPLING_FLAGS:
        g.add_argument(flag, dest=dest, type=typ, default=None, help=help_, metavar=flag[2:].upper())
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--verbose", action="store_true", help="print timings and token rates after each reply")
    add_dtype_flag(p)
    add_memory_flag(p)


def add_memory_flag(p: argparse.ArgumentParser) -> None:
    """--max-memory SIZE: refuse, before loading, a model whose memory plan (llamaherd/memory.py) exceeds it."""
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget, like 8G or 512M: a model whose weights + KV cache for --num-ctx + working "
                        "buffers need more is refused before loading, with the numbers (`herd show MODEL --memory`)")


def add_dtype_flag(p: argparse.ArgumentParser, default_help: str = "as stored") -> None:
    """--dtype, spelled and parsed the same in every verb (checkpoint.save.DTYPES: f32/float32, bf16/bfloat16,
    f16/float16)."""
    from ..checkpoint.save import DTYPES

    p.add_argument("--dtype", default=None, choices=list(DTYPES), metavar="DTYPE",
                   help=f"load weights as {', '.join(DTYPES)} (default: {default_help})")


def add_adapter_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="apply a PEFT-format LoRA adapter (herd finetune's output) on top of the model")


def add_chat_format_flag(p: argparse.ArgumentParser) -> None:
    from ..chat import FORMAT_HELP

    p.add_argument("--chat-format", default=None, choices=list(FORMAT_HELP), metavar="NAME",
                   help="chat format to use instead of the checkpoint's own or built-in one: "
                        + "; ".join(f"{k} ({v})" for k, v in FORMAT_HELP.items()))


def apply_chat_format(model, name: str | None) -> None:
    """Make `model` speak the chat format `name` (the --chat-format flag): explicit metadata wins over detection."""
    if name:
        model.checkpoint.metadata["chat_format"] = name
        # An unusable choice ('hf' without a template, a format whose special tokens this vocabulary lacks)
        # fails now, with the reason, rather than at the first message.
        model.chat_format().encode_dialog([{"role": "user", "content": "x"}])


def sampling_from_args(args: argparse.Namespace) -> dict[str, Any]:
    out = {dest: getattr(args, dest) for _, dest, _, _ in SAMPLING_FLAGS if getattr(args, dest, None) is not None}
    if getattr(args, "stop", None):
        out["stop"] = tuple(args.stop)
    if out.get("max_tokens") == -1:
        out["max_tokens"] = None
    return out


class Spinner:
    """A progress line on a terminal while something runs ("loading model ⠙"); one plain line otherwise."""

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Spinner:
        if self.stream.isatty():
            self._thread = threading.Thread(target=self._spin, daemon=True)
            self._thread.start()
        else:
            print(f"{self.label} ...", file=self.stream, flush=True)
        return self

    def _spin(self) -> None:
        for frame in itertools.cycle(self.FRAMES):
            self.stream.write(f"\r{self.label} {frame} ")
            self.stream.flush()
            if self._stop.wait(0.1):
                break

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.stream.write("\r\033[K")  # erase the progress line
            self.stream.flush()


# ---- the model argument -------------------------------------------------------------------------------

_MODEL_SUFFIXES = (".gguf", ".pth", ".safetensors", ".bin", ".pt")
# A store-like name with a digit and a letter in dot/dash/underscore-joined parts ("gemma-3-270m", "llama3.2").
_NAME_LIKE = re.compile(r"(?=.*[A-Za-z])(?=.*\d)[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)+")
_OLLAMA_LIKE = re.compile(r"[A-Za-z0-9][\w./-]*:[\w.-]+")  # model:tag


def known_model_names() -> list[str]:
    from ..store import PACKAGED, list_models

    return sorted({m.name for m in list_models()} | set(PACKAGED))


def looks_like_model(word: str) -> bool:
    """Whether a word is meant as a model (a path, a file name, a store or Ollama name) rather than prompt text."""
    if not word or any(c.isspace() for c in word):
        return False
    if "/" in word or "\\" in word or word.startswith(("~", "./")) or word.lower().endswith(_MODEL_SUFFIXES):
        return True
    if _OLLAMA_LIKE.fullmatch(word) or _NAME_LIKE.fullmatch(word):
        return True
    return bool(difflib.get_close_matches(word, known_model_names(), n=1, cutoff=0.75))


def did_you_mean(word: str, names, cutoff: float = 0.5) -> str:
    """"; did you mean X or Y?" for the names closest to `word` (difflib), or "" when none is close."""
    close = difflib.get_close_matches(word, list(names), n=3, cutoff=cutoff)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def model_not_found(word: str) -> ModelNotFoundError:
    """The error for a model argument that names nothing: what was looked for, and the closest known names."""
    path = Path(word).expanduser()
    if "/" in word or word.lower().endswith(_MODEL_SUFFIXES):
        parent = path.parent
        siblings = sorted(p.name for p in parent.iterdir()) if parent.is_dir() else []
        close = [str(parent / n) if str(parent) != "." else n
                 for n in difflib.get_close_matches(path.name, siblings, n=3, cutoff=0.6)]
        close += difflib.get_close_matches(word, known_model_names(), n=3, cutoff=0.6)
        what = f"no such file or folder: {word}"
    else:
        close = difflib.get_close_matches(word, known_model_names(), n=3, cutoff=0.5)
        what = f"no model named {word!r} in the store or Ollama's"
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return ModelNotFoundError(f"{what}{hint} (`herd list` shows the store; a model is a checkpoint folder, "
                              "a .gguf file or a store name; to complete text that starts with this word, quote the "
                              "whole prompt as one argument)")


def resolve_model(word: str) -> Path:
    """The file or folder a model argument names; a miss is a ModelNotFoundError with the closest names."""
    from ..api import resolve

    if not word.strip():
        raise ModelNotFoundError("the model argument is empty; give a checkpoint folder, .gguf file or store name")
    try:
        return resolve(word)
    except ModelNotFoundError:
        raise model_not_found(word) from None


def load_model(source: str, dtype: str | None = None, adapter: str | None = None, quantize: str | None = None,
               max_memory: str | None = None, num_ctx: int | None = None, device: str | None = None):
    """Load (weight-only `quantize`d, with a PEFT LoRA `adapter` folder on top, if given) with a progress line,
    refused first if it does not fit `max_memory` with a `num_ctx`-token context; returns (model, seconds)."""
    from ..api import load
    from ..checkpoint.save import parse_dtype

    t0 = time.perf_counter()
    path = resolve_model(source)  # a missing model is one error line, before any progress line
    with Spinner(f"loading {source}"):
        model = load(path, dtype=parse_dtype(dtype), quantize=quantize, adapter=adapter, max_memory=max_memory,
                     num_ctx=num_ctx, device=device)
    return model, time.perf_counter() - t0


def write_stream(pieces, out: TextIO) -> str:
    """Print text pieces as they come; return the whole text."""
    text = []
    for piece in pieces:
        out.write(piece)
        out.flush()
        text.append(piece)
    return "".join(text)
