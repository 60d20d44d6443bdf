"""Fine-tuning and distillation: LoRA / QLoRA (also over GGUF weights), full, DPO and knowledge distillation.

    import llamaherd.train as train
    summary = train.finetune("path/to/model", "data.jsonl", "out/", method="lora", lr=2e-4, max_steps=100)
    model = llamaherd.load("path/to/model", adapter="out/")

`herd finetune BASE DATA --method lora|qlora|full|dpo|distill --out DIR` runs the same; with `--nproc N`, or
started by torchrun, the same loop runs data-parallel over FSDP2 (train/distributed.py).
"""

from __future__ import annotations

from pathlib import Path

from ..lora import LoRAConfig, LoRALinear, apply_lora, load_adapter, merge_lora, save_adapter
from .data import Example, Preference, Renderer, load_examples, read_jsonl
from .loop import METHODS, TrainConfig, Trainer


def finetune(base, data: str | Path, out: str | Path, *, method: str = "lora", teacher=None, resume: bool = False,
             rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets=None, quantize: str | None = None,
             **options) -> dict:
    """Fine-tune `base` (a llamaherd.Model, or anything `llamaherd.load` takes) on a JSONL file into `out`.

    `quantize` ("int8", "int4", "int4-g32", ...) loads a path base weight-only quantized: the adapter then trains
    over the frozen int8/int4 weights (lora, qlora, and dpo/distill with an adapter).

    `options` are `TrainConfig` fields (lr, epochs, max_steps, batch_size, grad_accum, warmup_steps, clip, seed,
    max_len, pack, val_fraction, bf16, activation_checkpointing, beta, kd_topk, ...). Returns a summary dict.
    """
    from .. import load

    model = load(base, quantize=quantize) if isinstance(base, (str, Path)) else base
    if isinstance(teacher, (str, Path)):
        teacher = load(teacher)
    lora = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, **({"targets": tuple(targets)} if targets else {}))
    config = TrainConfig(method=method, lora=lora, **options)
    return Trainer(model, data, out, config, teacher=teacher).run(resume=resume)


__all__ = ["Example", "LoRAConfig", "LoRALinear", "METHODS", "Preference", "Renderer", "TrainConfig", "Trainer",
           "apply_lora", "finetune", "load_adapter", "load_examples", "merge_lora", "read_jsonl", "save_adapter"]
