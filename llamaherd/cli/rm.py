"""`herd rm NAME`: delete a model from llamaherd's store (Ollama's store is left to `ollama rm`)."""

from __future__ import annotations

import argparse

from .. import store


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rm", help="remove a model from the local store")
    p.add_argument("models", nargs="+", metavar="MODEL", help="store name(s), as `herd list` shows them")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ModelNotFoundError
    from ._generation import did_you_mean

    for name in args.models:
        try:
            folder = store.remove(name)
        except ModelNotFoundError as exc:
            stored = [m.name for m in store.list_models() if m.store == "herd"]
            raise ModelNotFoundError(f"{exc}{did_you_mean(name, stored)}") from None
        print(f"deleted '{name}' ({folder})")
    return 0
