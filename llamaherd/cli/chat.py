"""`herd chat [MODEL]`: an interactive conversation in the terminal, with Ollama's commands and keys."""

from __future__ import annotations

import argparse

from ._generation import (add_adapter_flag, add_chat_format_flag, add_sampling_flags, apply_chat_format, load_model,
                          sampling_from_args)
from .run import add_tp_flag, load_tp


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal (/? inside for commands)")
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint folder, .gguf file or store name (default: the default model)")
    p.add_argument("--system", default=None, help="system message")
    add_adapter_flag(p)
    add_chat_format_flag(p)
    add_sampling_flags(p)
    add_tp_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..store import DEFAULT_MODEL
    from ._repl import ChatSession

    name = args.model or DEFAULT_MODEL
    if args.tp:
        model, load_seconds = load_tp(name, args)
    else:
        model, load_seconds = load_model(name, args.dtype, args.adapter, max_memory=args.max_memory,
                                         num_ctx=args.num_ctx)
    apply_chat_format(model, args.chat_format)
    model.chat_format()  # fail now, with the reason, if this model cannot chat
    return ChatSession(model, sampling_from_args(args), system=args.system, verbose=args.verbose,
                       load_seconds=load_seconds, name=name).run()
