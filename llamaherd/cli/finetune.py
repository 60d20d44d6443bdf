"""`herd finetune BASE DATA --method lora|qlora|full|dpo|distill --out DIR`: adapt a model to a JSONL data set."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a model (LoRA, QLoRA, full, DPO, distillation) on a JSONL file",
        description="Train BASE on DATA (JSONL: OpenAI 'messages' with tools, 'prompt'/'completion', 'text', or "
                    "DPO 'prompt'/'chosen'/'rejected'). Writes a PEFT adapter (or, with --method full, a Hugging "
                    "Face folder), checkpoint.pt, metrics.jsonl and loss.png into --out.")
    p.add_argument("base", help="checkpoint folder, .gguf file or store name")
    p.add_argument("data", help="training data, one JSON object per line")
    p.add_argument("--out", required=True, help="output folder (adapter, checkpoint, metrics, loss plot)")
    p.add_argument("--method", default="lora", choices=("lora", "qlora", "full", "dpo", "distill"))
    p.add_argument("--dry-run", action="store_true", help="print one rendered example, trained spans in [[ ]], and stop")
    p.add_argument("--resume", action="store_true", help="continue the run whose checkpoint.pt is in --out")
    p.add_argument("--dtype", default=None, help="base weights: f32 (default for float checkpoints), bf16, f16")
    p.add_argument("--chat-format", default=None, help="render chats in this format (e.g. gemma3 for a base Gemma)")
    p.add_argument("--quantize", default=None, metavar="SCHEME",
                   help="load the base weight-only quantized (int8, int4, int4-g32/-g64/-g128) and train the "
                        "adapter over its frozen codes")
    p.add_argument("--nproc", type=int, default=1,
                   help="train in N processes with FSDP2 (gloo on CPU, NCCL on GPUs), the step split over them; "
                        "or start `herd finetune` under torchrun --nproc-per-node N")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: every epoch)")
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="the cosine ends at lr * this")
    g.add_argument("--clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-len", type=int, default=None, help="longest example in tokens (default: the context)")
    g.add_argument("--pack", action="store_true", help="pack examples into rows, attention kept per example")
    g.add_argument("--val-split", type=float, default=0.0, help="fraction of the data held out for validation")
    g.add_argument("--eval-every", type=int, default=0, help="steps between validation passes (0: at the end)")
    g.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: at the end)")
    g.add_argument("--log-every", type=int, default=1)
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute layer activations in backward")
    a = p.add_argument_group("adapter")
    a.add_argument("--rank", type=int, default=8)
    a.add_argument("--alpha", type=float, default=16.0)
    a.add_argument("--dropout", type=float, default=0.0)
    a.add_argument("--target", action="append", default=None,
                   help="module to adapt (repeatable): wq wk wv wo w1 w2 w3 or q_proj ... (default: attention)")
    a.add_argument("--full-weights", action="store_true", help="dpo/distill: train every weight, not an adapter")
    m = p.add_argument_group("dpo and distillation")
    m.add_argument("--beta", type=float, default=0.1, help="DPO temperature")
    m.add_argument("--teacher", default=None, help="distill: the teacher model (any source llamaherd loads)")
    m.add_argument("--kd-topk", type=int, default=32, help="distill: teacher logits kept per position")
    m.add_argument("--kd-temperature", type=float, default=1.0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint.save import parse_dtype
    from ..errors import TrainingError
    from ..train import LoRAConfig, TrainConfig

    lora = LoRAConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                      **({"targets": tuple(args.target)} if args.target else {}))
    config = TrainConfig(
        method=args.method, lora=lora, lr=args.lr, weight_decay=args.weight_decay, epochs=args.epochs,
        max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio, clip=args.clip or None, seed=args.seed,
        max_len=args.max_len, pack=args.pack, val_fraction=args.val_split, eval_every=args.eval_every,
        save_every=args.save_every, log_every=args.log_every, bf16=args.bf16,
        activation_checkpointing=args.activation_checkpointing, full_weights=args.full_weights, beta=args.beta,
        kd_topk=args.kd_topk, kd_temperature=args.kd_temperature, chat_format=args.chat_format)
    parse_dtype(args.dtype)  # a bad spelling fails before the model loads
    if args.nproc < 1:
        raise TrainingError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1 and args.method == "qlora":
        raise TrainingError("QLoRA's packed 4-bit weights cannot be sharded across processes: run --method qlora "
                            "without --nproc, or --method lora with --nproc")
    if args.nproc > 1 and args.quantize:
        raise TrainingError("weight-only int8/int4 codes cannot be sharded across processes: drop --quantize or "
                            "--nproc")
    if args.nproc > 1 and not args.dry_run:
        from ..train.distributed import launch

        return launch(_train, (args, config), args.nproc)
    from ..train.distributed import init_from_environment

    init_from_environment()  # started by torchrun: join its process group
    return _train(args, config)


def _train(args: argparse.Namespace, config) -> int:
    """Load, train, print the summary (the lead process only, when there are several)."""
    from ..train import Trainer
    from ..train.distributed import device, rank
    from ._generation import load_model

    model, _ = load_model(args.base, args.dtype, device=device(), quantize=args.quantize)
    teacher = load_model(args.teacher, args.dtype, device=device())[0] if args.teacher else None
    trainer = Trainer(model, args.data, args.out, config, teacher=teacher)
    if args.dry_run:
        print(trainer.dry_run())
        return 0
    summary = trainer.run(resume=args.resume)
    if rank() == 0:
        print(json.dumps(summary))
    return 0
