"""`herd serve`: run the OpenAI- and Ollama-compatible server on one model."""

from __future__ import annotations

import argparse
import logging
import os
import signal

from ..errors import LlamaherdError
from ._generation import add_chat_format_flag, add_dtype_flag, add_memory_flag, apply_chat_format, resolve_model
from .guard import add_serve_flags, install_serve_shields
from .run import add_speculative_flags
from .run import add_quantize_flag, add_tp_flag, load_tp


def chat_note(model) -> str:
    """What the start line says about chat: the built-in format in use, or that the model cannot chat."""
    try:
        choice = model.chat_format_choice
    except LlamaherdError:
        return "; this model has no chat format: the chat routes answer 400 (--chat-format NAME gives it one)"
    return f"; {choice.reason}" if choice.builtin else ""


def kv_note(served) -> str:
    """What the KV cache budget allows: tokens in the pool, the context, full-context sequences at once."""
    from ..memory import human

    cache = served.engine.cache
    tokens = cache.num_blocks * cache.block_size
    storage = cache.storage.k.nbytes + cache.storage.v.nbytes
    return (f"KV cache: {human(storage)} = {tokens} tokens ({cache.num_blocks} blocks of "
            f"{cache.block_size}); context {served.context_length} tokens; {tokens // served.context_length} "
            f"full-context sequence(s) at once, more when shorter")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over OpenAI- and Ollama-compatible HTTP APIs")
    p.add_argument("model", nargs="?", default=None, help="checkpoint folder, .gguf file or store name "
                                                          "(default: the default model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=11434, help="port (default 11434, Ollama's)")
    p.add_argument("--api-key", default=os.environ.get("LLAMAHERD_API_KEY"),
                   help="require this key (Authorization: Bearer) on every route but /health")
    p.add_argument("--name", default=None, help="the model name clients use (default: from the source)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together per step")
    p.add_argument("--max-waiting", type=int, default=64, help="queued requests before answering 429")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="memory for the paged KV cache, in GiB")
    p.add_argument("--kv-cache-memory", default=None, metavar="SIZE",
                   help="memory for the paged KV cache, like 2G or 512M (overrides --kv-cache-gb); the start line "
                        "says what context and concurrency it allows")
    add_memory_flag(p)
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (like https://example.com) call this server (repeatable; "
                        "default: none, CORS off)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens processed per step and sequence")
    p.add_argument("--num-ctx", type=int, default=None,
                   help="context window in tokens (at most the model's max_seq_len; default: the model's)")
    add_dtype_flag(p)
    add_chat_format_flag(p)
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="apply a PEFT-format LoRA adapter (herd finetune's output) on top of the model")
    add_quantize_flag(p)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the model's math (default: torch's choice); 1 is fastest on a busy machine")
    add_speculative_flags(p)
    add_tp_flag(p)
    add_serve_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from ..api import load
    from ..checkpoint import read
    from ..checkpoint.save import parse_dtype
    from ..memory import check_fits, parse_size
    from ..server import ServedModel, create_app
    from ..server.http import KEEP_ALIVE_S

    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("herd serve: --threads must be at least 1")
        torch.set_num_threads(args.threads)
    source = args.model
    if source is None:
        from ..store import DEFAULT_MODEL

        source = DEFAULT_MODEL
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kv_bytes = parse_size(args.kv_cache_memory) if args.kv_cache_memory else int(args.kv_cache_gb * (1 << 30))
    path = resolve_model(source)
    if args.max_memory is not None:  # the plan with the paged pool in place of one context's cache
        check_fits(read(path), args.max_memory, num_ctx=args.num_ctx, dtype=parse_dtype(args.dtype),
                   quantize=args.quantize, kv_pool_bytes=kv_bytes)
    if args.tp:  # rank 0 of a tensor-parallel group: HTTP and the scheduler here, the other ranks follow
        model = load_tp(str(path), args)[0]
    else:
        model = load(path, dtype=parse_dtype(args.dtype), quantize=args.quantize, adapter=args.adapter)
    apply_chat_format(model, args.chat_format)
    name = args.name or os.path.basename(str(source).rstrip("/")).removesuffix(".gguf")
    draft = load(resolve_model(args.draft), dtype=parse_dtype(args.dtype)) if args.draft else None
    served = ServedModel(model, name, kv_cache_bytes=kv_bytes, max_batch=args.max_batch,
                         prefill_chunk=args.prefill_chunk, max_waiting=args.max_waiting, max_context=args.num_ctx,
                         speculative=args.speculative, draft=draft,
                         num_speculative_tokens=args.num_speculative_tokens or 5)
    app = create_app(served, api_key=args.api_key, cors_origins=tuple(args.cors_origin))
    guarded = install_serve_shields(app, args)
    print(f"serving {name} on http://{args.host}:{args.port} (OpenAI: /v1, Ollama: /api, "
          f"web chat: http://{args.host}:{args.port}/ui){chat_note(model)}{guarded}", flush=True)
    print(kv_note(served), flush=True)
    # uvicorn catches SIGTERM, lets in-flight requests finish (up to 30 s), then re-raises the signal once it is
    # done; a no-op handler for that re-raise makes a graceful stop exit 0, as process supervisors expect.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30,
                timeout_keep_alive=KEEP_ALIVE_S)
    return 0
