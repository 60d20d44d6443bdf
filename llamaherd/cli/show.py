"""`herd show`: a preset's or a checkpoint's configuration and parameter counts."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from .. import presets
from ..config import ModelConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="show a model's configuration and size (a preset name or a checkpoint)")
    p.add_argument("model", help="preset name (see `herd presets`), checkpoint folder, .gguf file or store name")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--template", action="store_true", help="print how a dialog is rendered for this model")
    p.add_argument("--memory", action="store_true",
                   help="print the memory plan: weights, KV cache for --num-ctx, working buffers, runtime")
    p.add_argument("--num-ctx", type=int, default=None, help="context of the memory plan (default: max_seq_len)")
    p.add_argument("--dtype", default=None, help="runtime dtype of the memory plan (default: as stored; "
                                                 "bf16 for a preset)")
    p.add_argument("--quantize", default=None, metavar="SCHEME", help="plan int8/int4 weight-only or fp8 projections at load")
    p.set_defaults(func=run)
    q = sub.add_parser("presets", help="list every known model preset with its size")
    q.set_defaults(func=run_list)


# Fields before this index apply to every family; later ones are printed only when set.
_FIRST_FAMILY_FIELD = [f.name for f in dataclasses.fields(ModelConfig)].index("moe")


def human(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def describe(name: str) -> tuple[ModelConfig, dict]:
    """The configuration of a preset or a checkpoint, and facts about where it came from."""
    if name.lower() in presets.PRESETS:
        p = presets.get(name)
        facts = {"preset": p.name, "source": p.source, "published parameters": p.published_params}
        if p.published_active_params:
            facts["published active parameters"] = p.published_active_params
        if p.chat_format:
            facts["chat format"] = p.chat_format
        if p.notes:
            facts["notes"] = p.notes
        return p.config, facts
    import difflib

    from ..checkpoint import read
    from ..errors import LlamaherdError, ModelNotFoundError
    from ._generation import resolve_model

    try:
        path = resolve_model(name)
    except ModelNotFoundError as exc:
        close = difflib.get_close_matches(name.lower(), list(presets.PRESETS), n=3, cutoff=0.6)
        hint = f" Presets close to it: {', '.join(close)}." if close else " `herd presets` lists the presets."
        raise ModelNotFoundError(f"{exc}.{hint}") from None
    ckpt = read(path)
    facts = {"checkpoint": str(Path(path).resolve())}
    from ..api import chat_format_choice

    try:
        choice = chat_format_choice(ckpt)
        facts["chat format"] = choice.name + (f" ({choice.reason})" if choice.builtin else "")
    except LlamaherdError:
        facts["chat format"] = "none (completion only; --chat-format NAME gives it one)"
    return ckpt.config, facts


def run(args: argparse.Namespace) -> int:
    config, facts = describe(args.model)
    if args.template:
        return show_template(args.model, facts)
    if args.memory:
        return show_memory(args, config, facts)
    total, active = presets.count_parameters(config)
    if args.json:
        print(json.dumps({**facts, "parameters": total, "active_parameters": active,
                          "config": dataclasses.asdict(config)}, indent=2, default=str))
        return 0
    for key, value in facts.items():
        print(f"  {key:<28} {value}")
    print(f"  {'parameters':<28} {human(total)} ({total:,})")
    if active != total:
        print(f"  {'active parameters':<28} {human(active)} ({active:,})")
    print("  configuration")
    common = {f.name for f in dataclasses.fields(ModelConfig)[: _FIRST_FAMILY_FIELD]}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in common or (value is not None and value != f.default):
            print(f"    {f.name:<26} {value}")
    return 0


def show_memory(args: argparse.Namespace, config: ModelConfig, facts: dict) -> int:
    """Print the memory plan (llamaherd/memory.py) of loading this model with a --num-ctx context."""
    import torch

    from ..checkpoint import Checkpoint, read
    from ..checkpoint.save import parse_dtype
    from ..memory import plan
    from ..model import build

    dtype = parse_dtype(args.dtype) if args.dtype else None
    if "preset" in facts:  # no file: the preset's parameters on the meta device, bf16 unless told
        weights = build(config, device="meta").to(dtype or torch.bfloat16).state_dict()
        ckpt = Checkpoint(config=config, state_dict=weights, source=Path(facts["preset"]))
    else:
        ckpt = read(Path(facts["checkpoint"]))
    p = plan(ckpt, num_ctx=args.num_ctx, dtype=dtype, quantize=args.quantize)
    if args.json:
        print(json.dumps({**facts, "memory": {name: n for name, n, _ in p.rows()} | {"total": p.total},
                          "num_ctx": p.num_ctx}, indent=2, default=str))
        return 0
    for key, value in facts.items():
        print(f"  {key:<28} {value}")
    print(f"  memory plan for a {p.num_ctx}-token context (--num-ctx), "
          f"KV {p.kv_per_token / 1024:.1f} KiB per token")
    print(p.table())
    return 0


def show_template(name: str, facts: dict) -> int:
    """Print how a sample dialog (with a tool call) renders for this model, special tokens highlighted."""
    import sys

    from ..chat.preview import preview
    from ..errors import ChatFormatError

    if "preset" in facts:
        fmt_name = facts.get("chat format")
        if fmt_name is None:
            raise ChatFormatError(f"{name} is a base model without a chat format; try its -instruct/-chat variant")
        from .prompt_format import _format_for

        fmt = _format_for(fmt_name)
    else:
        from ..api import resolve
        from ..checkpoint import read
        from ..api import chat_format_name
        from ..chat import get_format

        ckpt = read(resolve(name))
        fmt = get_format(chat_format_name(ckpt), ckpt.tokenizer, template=ckpt.chat_template)
    color = sys.stdout.isatty()
    try:
        shown = preview(fmt, tools=True, color=color)
    except ChatFormatError:  # a format without tool calls (gemma3, llama2): the dialog without them
        shown = preview(fmt, tools=False, color=color)
    sys.stdout.write(shown + ("" if color else "\n"))
    return 0


def run_list(args: argparse.Namespace) -> int:
    rows = [("NAME", "PARAMETERS", "ARCH", "CHAT FORMAT")]
    rows += [(name, p.published_params, p.config.arch, p.chat_format or "-") for name, p in sorted(presets.PRESETS.items())]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for name, params, arch, fmt in rows:
        print(f"{name:<{widths[0]}}  {params:>{widths[1]}}  {arch:<{widths[2]}}  {fmt}")
    return 0
