"""`herd list`: the models in llamaherd's store and in Ollama's, and the packaged ones ready to install."""

from __future__ import annotations

import argparse
import json
import time

from .. import store


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", aliases=["ls"], help="list models in the local store (and Ollama's)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _age(t: float) -> str:
    s = max(0, time.time() - t)
    for unit, span in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if s >= span:
            return f"{int(s // span)} {unit} ago"
    return "just now"


def run(args: argparse.Namespace) -> int:
    models = store.list_models()
    installed = {m.name for m in models if m.store == "herd"}
    available = [name for name in sorted(store.PACKAGED) if name not in installed]
    if args.json:
        rows = [{"name": m.name, "path": str(m.path), "store": m.store, "size": m.size,
                 "modified": m.modified, "digest": m.digest} for m in models]
        rows += [{"name": n, "store": "packaged", "installed": False} for n in available]
        print(json.dumps(rows, indent=2))
        return 0
    width = max([len("NAME"), *(len(m.name) for m in models), *(len(n) for n in available)]) + 2
    print(f"{'NAME':<{width}}{'ID':<14}{'SIZE':<10}{'STORE':<8}MODIFIED")
    for m in models:
        default = "  (default)" if m.name == store.DEFAULT_MODEL else ""
        print(f"{m.name:<{width}}{(m.digest or '')[:12]:<14}{_size(m.size):<10}{m.store:<8}{_age(m.modified)}{default}")
    for name in available:
        print(f"{name:<{width}}{'':<14}{'-':<10}{'-':<8}not installed: `herd pull {name}` (no download)")
    return 0
