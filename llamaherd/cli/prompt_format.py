"""`herd prompt-format FORMAT|MODEL [--tools]`: show how a sample dialog renders in a chat format."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import ChatFormatError


def register(subparsers) -> None:
    from ..chat import FORMAT_HELP

    formats = "; ".join(f"{k}: {v}" for k, v in FORMAT_HELP.items() if k != "hf")
    p = subparsers.add_parser("prompt-format", help="show how a sample dialog renders in a chat format",
                              description=f"Render a sample dialog in a chat format ({formats}) or with a model "
                                          "folder's own chat_template (the 'hf' format).")
    p.add_argument("target", help="format name (" + ", ".join(k for k in FORMAT_HELP if k != "hf") +
                                  ") or a model folder with tokenizer_config.json (its template: 'hf')")
    p.add_argument("--tools", action="store_true", help="include a tool definition, a tool call and its result")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="highlight special tokens (default: when stdout is a terminal)")
    p.set_defaults(func=run)


def _format_for(target: str):
    from ..chat import FORMATS, get_format

    if target in FORMATS and target != "hf":
        tokenizer = None
        if target != "llama2":  # Llama 2's tokenizer is not bundled; rendering text needs none
            from ..tokenizer import Tokenizer

            tokenizer = Tokenizer.llama4() if target == "llama4" else Tokenizer.llama3()
        return get_format(target, tokenizer)
    folder = Path(target)
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        raise ChatFormatError(f"{target}: not a chat format ({', '.join(f for f in FORMATS if f != 'hf')}) "
                              "nor a folder holding tokenizer_config.json")
    try:
        cfg = json.loads(config.read_text())
    except ValueError as exc:
        raise ChatFormatError(f"{config}: not valid JSON ({exc})") from None
    template = cfg.get("chat_template")
    if isinstance(template, list):  # several named templates: use "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str):
        raise ChatFormatError(f"{config}: has no chat_template string; pass a format name instead")
    from ..tokenizer import Tokenizer

    def _token(v):
        return v.get("content") if isinstance(v, dict) else v

    return get_format("hf", Tokenizer.from_file(folder), template=template,
                      bos_token=_token(cfg.get("bos_token")), eos_token=_token(cfg.get("eos_token")))


def run(args) -> int:
    from ..chat.preview import preview

    fmt = _format_for(args.target)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    sys.stdout.write(preview(fmt, tools=args.tools, color=color))
    if not color:
        sys.stdout.write("\n")
    return 0
