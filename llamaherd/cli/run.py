"""`herd run MODEL [PROMPT]`: stream one reply to a prompt (argument or piped stdin), or chat when none is given."""

from __future__ import annotations

import argparse
import sys

from ..errors import LlamaherdError, ModelNotFoundError
from ._generation import add_sampling_flags, allow_intermixed, load_model, sampling_from_args, write_stream


def default_model() -> str | None:
    """The model `herd run` uses when none is named.

    The store's default model (Gemma 3 270M, assembled from its installed package on first use, with
    progress shown); `split_model_and_prompt` treats every word as the prompt when the first is not a model.
    """
    from ..store import DEFAULT_MODEL

    return DEFAULT_MODEL


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a model on a prompt, or chat with it when no prompt is given")
    p.add_argument("words", nargs="*", metavar="MODEL [PROMPT]",
                   help="checkpoint folder, .gguf file or store name, then the prompt (or pipe it on stdin)")
    p.add_argument("--system", default=None, help="system message for chat models")
    p.add_argument("--raw", action="store_true", help="complete the prompt as plain text, without the chat format")
    add_sampling_flags(p)
    allow_intermixed(p)
    p.set_defaults(func=run)


def _is_model(word: str) -> bool:
    from ..api import resolve

    try:
        resolve(word)
        return True
    except (ModelNotFoundError, LlamaherdError, OSError):
        return False


def split_model_and_prompt(words: list[str]) -> tuple[str, str | None]:
    """(model, prompt): the first word is the model, unless it is not one and a default model exists."""
    default = default_model()
    if words and (default is None or _is_model(words[0])):
        return words[0], " ".join(words[1:]) or None
    if default is None:
        raise ModelNotFoundError("no model given: herd run MODEL [PROMPT] (a checkpoint folder, .gguf file or a "
                                 "name from `herd list`)")
    return default, " ".join(words) or None


def run(args: argparse.Namespace) -> int:
    model_name, prompt = split_model_and_prompt(list(args.words))
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    model, load_seconds = load_model(model_name, args.dtype)
    sampling = sampling_from_args(args)
    if prompt is None:
        from ._repl import ChatSession

        return ChatSession(model, sampling, system=args.system, verbose=args.verbose,
                           load_seconds=load_seconds, name=model_name).run()

    from ..engine.stats import GenerationStats

    stats = GenerationStats(load_seconds=load_seconds)
    sampling = {"max_tokens": None, **sampling}  # until the model stops (Ollama's num_predict -1)
    chat = not args.raw and model.has_chat_format
    if chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        pieces = model.chat(messages, stream=True, stats=stats, **sampling)
    else:
        pieces = model.generate(prompt, stream=True, stats=stats, skip_special_tokens=True, **sampling)
    write_stream(pieces, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.verbose:
        print("\n" + stats.format(), file=sys.stderr)
    return 0
