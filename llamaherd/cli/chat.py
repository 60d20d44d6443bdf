"""`herd chat MODEL`: an interactive conversation in the terminal, with Ollama's commands and keys."""

from __future__ import annotations

import argparse

from ._generation import add_sampling_flags, load_model, sampling_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal (/? inside for commands)")
    p.add_argument("model", help="checkpoint folder, .gguf file or store name")
    p.add_argument("--system", default=None, help="system message")
    add_sampling_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ._repl import ChatSession

    model, load_seconds = load_model(args.model, args.dtype)
    model.chat_format_name  # fail now, with the reason, if this model cannot chat
    return ChatSession(model, sampling_from_args(args), system=args.system, verbose=args.verbose,
                       load_seconds=load_seconds, name=args.model).run()
