"""`herd export BASE OUT --adapter DIR --merge --to hf|meta|gguf`: fold a LoRA adapter into its base and write it."""

from __future__ import annotations

import argparse
import dataclasses

from .quantize import TYPES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="merge a LoRA adapter into its base model and write Meta, Hugging Face or GGUF",
        description="Load BASE, apply the PEFT adapter in --adapter, fold it into the weights (W + alpha/r * B A) "
                    "and write OUT in the chosen format. Packed GGUF bases are decoded to float first.")
    p.add_argument("base", help="checkpoint folder, .gguf file or store name the adapter was trained on")
    p.add_argument("out", help="output folder (meta, hf) or .gguf file")
    p.add_argument("--adapter", required=True, help="PEFT adapter folder (adapter_config.json + safetensors)")
    p.add_argument("--merge", action="store_true", required=True, help="fold the adapter into the weights")
    p.add_argument("--to", dest="fmt", required=True, choices=("hf", "meta", "gguf"))
    p.add_argument("--type", dest="qtype", default="f16", choices=TYPES, help="gguf: file type (default f16)")
    p.add_argument("--dtype", default=None, help="meta/hf: cast the merged weights (f32, f16, bf16)")
    p.set_defaults(func=run)


def merged_checkpoint(base: str, adapter: str):
    """The base checkpoint with the adapter folded in: float tensors in canonical names, no quantized parts."""
    import torch

    from ..api import load
    from ..quant.ggml import GGMLWeight
    from ..lora.peft import load_adapter
    from ..lora.layer import merge_lora

    model = load(base)
    load_adapter(model.net, model.config, adapter)
    merge_lora(model.net)
    state = {}
    for name, t in model.net.state_dict().items():
        t = t.dequantize(torch.float32) if isinstance(t, GGMLWeight) else t
        state[name] = t.detach().contiguous()
    return dataclasses.replace(model.checkpoint, state_dict=state, prepare=None)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint.save import save

    ckpt = merged_checkpoint(args.base, args.adapter)
    options = {"qtype": args.qtype} if args.fmt == "gguf" else {"dtype": args.dtype}
    out = save(ckpt, args.out, args.fmt, **options)
    print(f"wrote merged {args.fmt} checkpoint to {out}")
    return 0
