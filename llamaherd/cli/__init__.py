"""`herd`: the command line. Each verb lives in its own module here and registers itself.

A module `llamaherd/cli/<verb>.py` defines `register(subparsers)` that adds its parser and sets
`func(args) -> int`. New verbs need no edit here: every module of this package is discovered.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from ..errors import LlamaherdError


class IntermixedParser(argparse.ArgumentParser):
    """A verb's parser: positionals may come after options (`herd run MODEL --temperature 0 "a prompt"`), which
    plain argparse refuses once it has consumed the first positional chunk."""

    _busy = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._busy:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._busy = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._busy = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="herd", description="Run, chat with, serve and convert Llama models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=IntermixedParser)
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        sys.stderr.close()
        return 0
    except (LlamaherdError, OSError) as exc:
        if args.debug:
            raise
        print(f"herd: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
