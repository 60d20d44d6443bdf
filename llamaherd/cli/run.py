"""`herd run MODEL [PROMPT]`: stream one reply to a prompt (argument or piped stdin), or chat when none is given."""

from __future__ import annotations

import argparse
import sys

from ..errors import LlamaherdError
from ._generation import (add_adapter_flag, add_chat_format_flag, add_sampling_flags,
                          apply_chat_format, load_model, looks_like_model, model_not_found, sampling_from_args,
                          write_stream)


def default_model() -> str:
    """The model `herd run` uses when none is named: the store's default model (Gemma 3 270M, assembled from
    its installed package on first use, with progress shown)."""
    from ..store import DEFAULT_MODEL

    return DEFAULT_MODEL


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a model on a prompt, or chat with it when no prompt is given")
    p.add_argument("words", nargs="*", metavar="[MODEL] [PROMPT]",
                   help="checkpoint folder, .gguf file or store name (default: the default model), then the "
                        "prompt (or pipe it on stdin); a first word that looks like a model but names none is an "
                        "error, never prompt text")
    p.add_argument("--system", default=None, help="system message for chat models")
    p.add_argument("--raw", action="store_true", help="complete the prompt as plain text, without the chat format")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image for a vision model (repeatable), placed before the prompt's text")
    add_chat_format_flag(p)
    add_adapter_flag(p)
    add_quantize_flag(p)
    add_sampling_flags(p)
    add_speculative_flags(p)
    add_tp_flag(p)
    p.set_defaults(func=run)


def add_tp_flag(p: argparse.ArgumentParser) -> None:
    """--tp N: tensor parallelism over N local processes (or torchrun's), for run, chat and serve."""
    p.add_argument("--tp", type=int, default=None, metavar="N",
                   help="split the model over N processes (tensor parallelism; gloo on CPU, NCCL on GPUs); "
                        "under torchrun, N is its number of processes")


def load_tp(source: str, args: argparse.Namespace):
    """(model, seconds): this process's slice of the model as rank 0 of `args.tp` (llamaherd/parallel/)."""
    import time

    from ..checkpoint.save import parse_dtype
    from ..parallel.launch import load_as_leader
    from ._generation import resolve_model

    refused = [flag for flag, on in (("--adapter", getattr(args, "adapter", None)),
                                     ("--draft", getattr(args, "draft", None)),
                                     ("--speculative", getattr(args, "speculative", None))) if on]
    if refused:
        raise LlamaherdError(f"--tp splits the float model; it does not combine with {', '.join(refused)} yet: "
                             "drop one of them")
    t0 = time.perf_counter()
    model = load_as_leader(resolve_model(source), parse_dtype(args.dtype), args.tp, getattr(args, "threads", None),
                           getattr(args, "quantize", None))
    return model, time.perf_counter() - t0


def add_quantize_flag(p: argparse.ArgumentParser) -> None:
    """--quantize int8|int4[-gN]|fp8: quantization at load (quant/weight_only.py, quant/fp8_mm.py), run and serve."""
    p.add_argument("--quantize", default=None, metavar="SCHEME",
                   help="quantize the projections at load: int8 (weight-only, per channel), int4 (weight-only, "
                        "groups of 128; int4-g32 / int4-g64 for smaller groups), or fp8 (e4m3 weights and "
                        "activations through torch._scaled_mm: fast on GPUs with FP8 tensor cores, a slow "
                        "reference on the CPU; an FP8 checkpoint keeps its own codes)")


def add_speculative_flags(p: argparse.ArgumentParser) -> None:
    """--draft / --speculative / --num-speculative-tokens (engine/speculative.py), for run and serve."""
    g = p.add_argument_group("speculative decoding (same output distribution, fewer target forwards)")
    g.add_argument("--draft", default=None, metavar="MODEL",
                   help="a smaller model with the same tokenizer proposes tokens the model verifies")
    g.add_argument("--speculative", default=None, choices=["ngram"],
                   help="ngram: propose the continuation of an earlier match in the prompt and output (no draft)")
    g.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help="tokens proposed per step (default 5; a draft adapts it to its acceptance rate)")


def speculative_from_args(args: argparse.Namespace) -> dict:
    """The speculative keywords for `Model.generate` / `Model.chat` ({} when neither flag is given)."""
    if args.draft is None and args.speculative is None:
        if args.num_speculative_tokens is not None:
            raise LlamaherdError("--num-speculative-tokens needs --draft MODEL or --speculative ngram")
        return {}
    out: dict = {"speculative": args.speculative}
    if args.draft is not None:
        out["draft"] = load_model(args.draft, args.dtype)[0]
    if args.num_speculative_tokens is not None:
        out["num_speculative_tokens"] = args.num_speculative_tokens
    return out


def _is_model(word: str) -> bool:
    from ..api import resolve

    if not word.strip():
        return False  # Path("") is the current folder: an empty word is never a model
    try:
        resolve(word)
        return True
    except (LlamaherdError, OSError):
        return False


def split_model_and_prompt(words: list[str]) -> tuple[str, str | None]:
    """(model, prompt): the first word is the model when it names one; a first word that looks like a model
    (a path, a file name, a store or Ollama name, or close to a known name) but names none is an error;
    otherwise every word is the prompt for the default model. The prompt is None when no words follow."""
    if not words:
        return default_model(), None
    first = words[0]
    if _is_model(first):
        return first, " ".join(words[1:]) if len(words) > 1 else None
    if looks_like_model(first):
        raise model_not_found(first)
    return default_model(), " ".join(words)


def run(args: argparse.Namespace) -> int:
    model_name, prompt = split_model_and_prompt(list(args.words))
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
        if not prompt.strip():
            raise LlamaherdError("no prompt: stdin was empty; give the prompt as an argument or pipe text in")
    if prompt is not None and not prompt.strip():
        # The same rule as the HTTP APIs: an empty prompt is refused, not completed from nothing (README).
        raise LlamaherdError("the prompt is empty; give text to complete, or no prompt at all to chat")
    if args.tp:
        model, load_seconds = load_tp(model_name, args)
    else:
        model, load_seconds = load_model(model_name, args.dtype, args.adapter, args.quantize, args.max_memory,
                                         args.num_ctx)
    apply_chat_format(model, args.chat_format)
    sampling = sampling_from_args(args)
    if prompt is None:
        from ._repl import ChatSession

        return ChatSession(model, sampling, system=args.system, verbose=args.verbose,
                           load_seconds=load_seconds, name=model_name).run()

    from ..engine.stats import GenerationStats

    stats = GenerationStats(load_seconds=load_seconds)
    sampling = {"max_tokens": None, **sampling, **speculative_from_args(args)}  # until the model stops (num_predict -1)
    chat = not args.raw and _chats(model)
    images = list(args.image)
    if chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        content = [{"type": "image", "image": path} for path in images] + [{"type": "text", "text": prompt}]
        messages.append({"role": "user", "content": content if images else prompt})
        pieces = model.chat(messages, stream=True, stats=stats, **sampling)
    else:
        text = _with_image_tokens(model, prompt, len(images)) if images else prompt
        pieces = model.generate(text, stream=True, stats=stats, skip_special_tokens=True, images=images or None,
                                **sampling)
    write_stream(pieces, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.verbose:
        print("\n" + stats.format(), file=sys.stderr)
    return 0


def _with_image_tokens(model, prompt: str, n: int) -> list[int]:
    """A base vision model's prompt: BOS, one <|image|> per image, then the text (transformers' mllama
    examples write "<|image|>" ahead of the text)."""
    from ..errors import ImageError
    from ..vision_inputs import IMAGE_LITERAL, image_token_id

    token = image_token_id(model.tokenizer)
    if token is None:
        raise ImageError(f"this model's tokenizer has no {IMAGE_LITERAL} token: it reads no images")
    ids = model.encode_prompt(prompt)
    head = 1 if ids and ids[0] == model.tokenizer.bos_id else 0
    return ids[:head] + [token] * n + ids[head:]


def _chats(model) -> bool:
    """Whether a one-shot prompt is a chat turn: not for a base model (no format, or a built-in one chosen for
    a checkpoint whose instruction-tuned releases carry their template), which completes it as text."""
    try:
        return not model.chat_format_choice.completes
    except LlamaherdError:
        return False
