"""`herd guard`: Llama Guard's verdict on a text or a conversation, or Prompt Guard's label scores on a text."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import LlamaherdError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("guard", help="check a prompt or conversation with Llama Guard or Prompt Guard")
    p.add_argument("model", help="a Llama Guard checkpoint (folder, .gguf or store name) or a Prompt Guard folder")
    p.add_argument("text", nargs="?", help="the user message to check (default: read stdin)")
    p.add_argument("--file", help="a JSON conversation: a list of {role, content} messages or {\"messages\": [...]}")
    p.add_argument("--image", help="an image file shown with the user message (Llama Guard 3 11B Vision)")
    p.add_argument("--role", choices=("user", "assistant"), help="assess the last message of this role")
    p.add_argument("--release", help="Llama Guard release when the checkpoint carries no template: "
                                     "llama-guard-3-8b, llama-guard-3-1b, llama-guard-3-11b-vision, llama-guard-4-12b")
    p.add_argument("--categories", help="a JSON file mapping category codes to names/descriptions (replaces the list)")
    p.add_argument("--exclude", default="", help="comma-separated category codes to leave out, e.g. S6,S7")
    p.add_argument("--threshold", type=float, help="flag when P(unsafe) >= this, instead of the generated answer")
    p.add_argument("--show-prompt", action="store_true", help="print the Llama Guard prompt and exit")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


class GuardUsageError(LlamaherdError):
    """A `herd guard` argument that cannot be used."""


def _read_json(path: str, what: str):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise GuardUsageError(f"{path}: cannot read the {what} ({exc})") from None
    except json.JSONDecodeError as exc:
        raise GuardUsageError(f"{path}: the {what} is not valid JSON ({exc})") from None


def _messages(args) -> list[dict]:
    if args.file:
        data = _read_json(args.file, "conversation")
        messages = data.get("messages") if isinstance(data, dict) else data
        if not isinstance(messages, list):
            raise GuardUsageError(f"{args.file}: give a JSON list of messages or an object with a 'messages' list")
        return messages
    text = args.text if args.text is not None else sys.stdin.read()
    if args.image:
        return [{"role": "user", "content": [{"type": "image", "image": args.image}, {"type": "text", "text": text}]}]
    return [{"role": "user", "content": text}]


def _is_prompt_guard(model: str) -> bool:
    """A Hugging Face folder whose config.json names a DeBERTa-v2 model (explicit metadata, not the name)."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "deberta-v2"
    except (OSError, ValueError, AttributeError):
        return False


def run(args) -> int:
    if _is_prompt_guard(args.model):
        from ..guard import load_prompt_guard

        if args.file or args.image:
            raise GuardUsageError("Prompt Guard classifies one text (no image); give it as the argument or on stdin")
        result = load_prompt_guard(args.model).classify(_messages(args)[0]["content"])
        if args.json:
            print(json.dumps({"label": result.label, "scores": result.scores, "windows": result.windows}))
        else:
            print(result.label)
            for label, p in result.scores.items():
                print(f"  {label:<12} {p:.4f}")
        return 0

    from ..guard import load_llama_guard
    from ..guard.prompt import render_text

    categories = _read_json(args.categories, "category list") if args.categories else None
    if categories is not None and not isinstance(categories, dict):
        raise GuardUsageError(f"{args.categories}: give a JSON object mapping codes to names, e.g. {{\"S1\": \"...\"}}")
    excluded = [c.strip() for c in args.exclude.split(",") if c.strip()]
    guard = load_llama_guard(args.model, args.release, categories=categories, excluded=excluded,
                             threshold=args.threshold)
    messages = _messages(args)
    if args.show_prompt:
        from ..guard.llama_guard import restrict_to_role

        print(render_text(guard.release, restrict_to_role(messages, args.role), categories, excluded))
        return 0
    verdict = guard.moderate(messages, args.role)
    if args.json:
        print(json.dumps(verdict.as_dict()))
        return 0
    line = "unsafe" if verdict.flagged else "safe"
    if verdict.status == "unparsed":
        line = f"unparsed (flagged): the model answered {verdict.raw.strip()!r}"
    print(line)
    for code in verdict.categories:
        print(f"  {code}: {verdict.names.get(code, '')}")
    if verdict.score is not None:
        print(f"  P(unsafe) = {verdict.score:.4f}" + (f" (threshold {verdict.threshold})" if verdict.threshold
                                                       is not None else ""))
    return 0


# -- `herd serve` flags (serve.py calls these) ------------------------------------------------------------------


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("shields (Llama Guard / Prompt Guard)")
    g.add_argument("--guard", metavar="GUARD_MODEL", help="check requests and replies with this Llama Guard model; "
                                                          "also serves /v1/moderations")
    g.add_argument("--guard-release", help="the guard's release when its checkpoint carries no chat template")
    g.add_argument("--prompt-guard", metavar="PG_FOLDER", help="also screen the last user message with Prompt Guard")
    g.add_argument("--prompt-guard-threshold", type=float, default=0.9,
                   help="refuse when Prompt Guard's score is above this (default 0.9, as Meta's shield)")
    g.add_argument("--prompt-guard-mode", choices=("injection", "jailbreak"), default="injection",
                   help="the score Prompt Guard 1 is judged by: injection = P(INJECTION) + P(JAILBREAK) "
                        "(default), jailbreak = P(JAILBREAK) alone, as in Meta's llama-stack shield")
    g.add_argument("--guard-refusal", choices=("content_filter", "error"), default="content_filter",
                   help="an unsafe request gets an empty answer with finish_reason content_filter, or a 400")
    g.add_argument("--guard-checks", default="input,output", help="which shields run: input, output or both")
    g.add_argument("--guard-every", type=int, default=16, help="streamed replies are checked every N tokens")
    g.add_argument("--guard-opt-out", action="store_true", help="let a request skip the shields (header X-Guard: off)")
    g.add_argument("--guard-batch", type=int, default=16, help="guard checks decoded together at most (the guard "
                                                                "model runs on its own continuous-batching engine)")


def install_serve_shields(app, args) -> str:
    """Attach the shields `herd serve`'s flags ask for; returns a note for the start line ("" when none)."""
    if not getattr(args, "guard", None) and not getattr(args, "prompt_guard", None):
        return ""
    from ..guard import load_llama_guard, load_prompt_guard
    from ..guard.shield import Shields
    from ..server.moderations import install

    checks = {c.strip() for c in args.guard_checks.split(",") if c.strip()}
    if not checks or checks - {"input", "output"}:
        raise GuardUsageError(f"--guard-checks {args.guard_checks!r}: give input, output or input,output")
    if args.guard_every < 1:
        raise GuardUsageError("--guard-every must be at least 1")
    if args.guard_batch < 1:
        raise GuardUsageError("--guard-batch must be at least 1")
    guard = None
    if args.guard:  # on its own continuous-batching engine: concurrent checks share forward passes
        from ..guard.batched import BatchedLlamaGuard

        guard = BatchedLlamaGuard(load_llama_guard(args.guard, args.guard_release), max_batch=args.guard_batch)
    pg = load_prompt_guard(args.prompt_guard) if args.prompt_guard else None
    if not 0.0 <= args.prompt_guard_threshold < 1.0:
        raise GuardUsageError("--prompt-guard-threshold: give a probability in [0, 1)")
    shields = Shields(guard=guard, prompt_guard=pg, prompt_threshold=args.prompt_guard_threshold,
                      prompt_mode=args.prompt_guard_mode,
                      on_input=args.guard_refusal, screen_input="input" in checks, screen_output="output" in checks,
                      stream_every=args.guard_every, allow_opt_out=args.guard_opt_out)
    name = Path(str(args.guard or args.prompt_guard).rstrip("/")).name.removesuffix(".gguf")
    install(app, shields, name)
    return f"; guarded by {name} ({', '.join(sorted(checks))}), /v1/moderations"
