"""The training loop: method swaps on the built model, AdamW with warmup + cosine, accumulation, clipping, resume.

One optimizer step consumes `grad_accum` micro-batches; each micro-batch loss is divided by the trained tokens
(or pairs) of the whole step, so accumulation equals one large batch. The micro-batch order is a pure function of
(seed, epoch), so a checkpoint's `position` (micro-batches consumed) plus its RNG states resume a run exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..atomic import write_text
from ..errors import TrainingError
from . import distributed as dist
from . import state as ckpt_state
from .data import IGNORE, Batch, Renderer, collate, epoch_batches, load_examples, pack, segment_mask, show, split
from .losses import dpo_loss, kd_loss_sum, sequence_logps, teacher_topk, token_nll_sum
from ..lora.layer import LoRAConfig, adapters_disabled, apply_lora, lora_state, trainable_parameters
from ..quant.weight_only import Int4Linear, Int8Linear
from .swaps import (checkpoint_activations, dequantize_packed, differentiable_weight_only, project_trained_rows,
                    quantize_linears, selecting)

METHODS = ("lora", "qlora", "full", "dpo", "distill")


@dataclass
class TrainConfig:
    method: str = "lora"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    lr: float = 2e-4
    weight_decay: float = 0.0
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (default: all epochs)
    batch_size: int = 4
    grad_accum: int = 1
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio
    clip: float | None = 1.0  # max global gradient norm; None: no clipping
    seed: int = 0
    max_len: int | None = None  # default: the model's context window
    pack: bool = False
    val_fraction: float = 0.0
    eval_every: int = 0  # steps between validation passes (0: at the end only)
    save_every: int = 0  # steps between checkpoints (0: at the end only)
    log_every: int = 1
    bf16: bool = False  # CPU/GPU autocast to bfloat16
    activation_checkpointing: bool = False
    full_weights: bool = False  # dpo/distill: train every weight instead of a LoRA adapter
    beta: float = 0.1  # DPO temperature
    kd_topk: int = 32
    kd_temperature: float = 1.0
    chat_format: str | None = None  # override the model's own format (e.g. "gemma3" for a base Gemma)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise TrainingError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        for name in ("batch_size", "grad_accum", "epochs", "log_every"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.pack and self.method == "dpo":
            raise TrainingError("packing is for SFT/distillation data; DPO pairs are batched unpacked")

    @property
    def uses_adapter(self) -> bool:
        return self.method in ("lora", "qlora") or (self.method in ("dpo", "distill") and not self.full_weights)


def lr_lambda(config: TrainConfig, total: int) -> Callable[[int], float]:
    """Linear warmup then cosine to min_lr_ratio (transformers `get_cosine_schedule_with_warmup`, plus a floor)."""
    warm = config.warmup_steps

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Trainer:
    """Fine-tunes `model` (a llamaherd.Model) on a JSONL file; `run()` trains, `dry_run()` shows one example."""

    def __init__(self, model, data: str | Path, out: str | Path, config: TrainConfig, *, teacher=None,
                 log: Callable[[str], None] | None = None) -> None:
        self.model, self.net, self.config = model, model.net, config
        self.data, self.out = Path(data), Path(out)
        self.teacher = teacher
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        if config.method == "distill" and teacher is None:
            raise TrainingError("distillation needs a teacher model (--teacher SOURCE)")
        max_len = config.max_len or model.config.max_seq_len
        self.renderer = Renderer(model.tokenizer, self._chat_format(), max_len)
        preference = config.method == "dpo"
        examples = load_examples(self.data, self.renderer, preference=preference)  # bad data fails before any write
        self.train_set, self.val_set = split(examples, config.val_fraction, config.seed)
        self.max_len = max_len

    def _chat_format(self):
        from ..chat import get_format

        if self.config.chat_format:
            return get_format(self.config.chat_format, self.model.tokenizer)
        return self.model.chat_format() if self.model.has_chat_format else None

    # -- inspection -----------------------------------------------------------------------------------------
    def dry_run(self) -> str:
        """The first training example as text, trained spans between [[ and ]], with token counts."""
        ex = self.train_set[0]
        parts = [ex.chosen, ex.rejected] if hasattr(ex, "chosen") else [ex]
        lines = [f"{len(self.train_set)} training / {len(self.val_set)} validation examples; "
                 "trained tokens are shown between [[ and ]]"]
        for e in parts:
            lines.append(f"--- {e.where}: {len(e)} tokens, {sum(e.trained)} trained")
            lines.append(show(e, self.model.tokenizer))
        return "\n".join(lines)

    # -- setup ----------------------------------------------------------------------------------------------
    def _prepare_model(self) -> list[nn.Parameter]:
        c = self.config
        if c.method == "qlora":
            quantize_linears(self.net)  # a float base goes to 4 bits; a GGUF base keeps its own packed weights
        elif c.method == "lora":
            dequantize_packed(self.net)  # LoRA trains over float weights, decoded once from a GGUF base
        if c.uses_adapter:
            differentiable_weight_only(self.net)  # an int8/int4 base (--quantize) passes gradients through
            apply_lora(self.net, c.lora, seed=c.seed)
        else:
            if any(isinstance(m, (Int8Linear, Int4Linear)) for m in self.net.modules()):
                raise TrainingError(f"--method {c.method} trains every weight, and this base is weight-only "
                                    "quantized (int8/int4 codes are not trainable): load it without --quantize, "
                                    "or train an adapter (lora, qlora, dpo/distill without --full-weights)")
            dequantize_packed(self.net)  # full fine-tuning trains float weights: a GGUF base is decoded once
            for p in self.net.parameters():
                p.requires_grad_(True)
        if c.activation_checkpointing:
            checkpoint_activations(self.net)
        project_trained_rows(self.net)
        self.reference = None
        if c.method == "dpo" and not c.uses_adapter:
            import copy

            self.reference = copy.deepcopy(self.net).requires_grad_(False)
        params = trainable_parameters(self.net)
        if not params:
            raise TrainingError("nothing to train: no parameter requires a gradient")
        return params

    def fingerprint(self) -> dict:
        c = asdict(self.config)
        for k in ("log_every", "eval_every", "save_every", "max_steps"):
            c.pop(k)  # may change between a run and its resumption
        mc = self.model.config
        return {"config": json.dumps(c, sort_keys=True, default=str), "data": _sha256(self.data),
                "model": f"{mc.arch}:{mc.dim}x{mc.n_layers}:{mc.vocab_size}"}

    def _weights(self) -> dict[str, torch.Tensor]:
        """The trained weights, whole (gathered from every rank under FSDP: all ranks call this together)."""
        state = lora_state(self.net) if self.config.uses_adapter else self.net.state_dict()
        return {k: v.detach().clone() for k, v in dist.full_state(state).items()}

    def _save_state(self, optimizer, scheduler, step: int, position: int, fingerprint: dict) -> None:
        weights, opt_state = self._weights(), dist.optimizer_state(optimizer)  # collectives: every rank
        if dist.rank() == 0:
            ckpt_state.save(self.out, weights=weights, optimizer=opt_state, scheduler=scheduler, step=step,
                            position=position, fingerprint=fingerprint)
        dist.barrier()

    # -- batches --------------------------------------------------------------------------------------------
    def _micro_batches(self, epoch: int) -> list[list[int]]:
        lengths = [len(e) for e in self.train_set]
        return epoch_batches(lengths, self.config.batch_size, self.config.seed, epoch)

    def _make(self, items: list) -> Batch:
        if self.config.method == "dpo":
            batch = collate([p.chosen for p in items] + [p.rejected for p in items])
        elif self.config.pack:
            batch = pack(items, self.max_len)
        else:
            batch = collate(items)
        return batch.to(_device(self.net))

    def _forward(self, net: nn.Module, batch: Batch) -> torch.Tensor:
        kwargs = {}
        if batch.segments is not None:
            kwargs = {"positions": batch.positions, "key_mask": segment_mask(batch.segments)}
        # Logits of the trained positions only, (N, V), when the projection is swapped (swaps.TrainedRows).
        with torch.autocast(batch.tokens.device.type, dtype=torch.bfloat16, enabled=self.config.bf16), \
                selecting(net, batch.labels != IGNORE):
            return net(batch.tokens, **kwargs)

    # -- losses ---------------------------------------------------------------------------------------------
    def _loss_sum(self, batch: Batch, items: list, indices: list[int]) -> tuple[torch.Tensor, int]:
        """(summed loss, count it is a sum over): tokens for SFT/distillation, pairs for DPO."""
        c = self.config
        logits = self._forward(self.net, batch)
        if c.method == "dpo":
            n = len(items)
            policy = sequence_logps(logits, batch.labels)
            with torch.no_grad():
                if self.reference is not None:
                    ref = sequence_logps(self._forward(self.reference, batch), batch.labels)
                else:
                    with adapters_disabled(self.net):
                        ref = sequence_logps(self._forward(self.net, batch), batch.labels)
            return dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], c.beta).sum(), n
        if c.method == "distill":
            values = torch.cat([self.teacher_cache["values"][i] for i in indices]).to(logits.device)
            ids = torch.cat([self.teacher_cache["ids"][i] for i in indices]).to(logits.device)
            return kd_loss_sum(logits, batch.labels, values, ids, c.kd_temperature), batch.n_trained
        return token_nll_sum(logits, batch.labels), batch.n_trained

    def _cache_teacher(self) -> dict:
        """Top-k teacher logits of every training example, computed once and kept in `out`/teacher_topk.pt."""
        path = self.out / "teacher_topk.pt"
        key = {"teacher": str(self.teacher.checkpoint.source), "k": self.config.kd_topk, "data": _sha256(self.data),
               "seed": self.config.seed, "val_fraction": self.config.val_fraction}
        if path.is_file():
            cached = torch.load(path, weights_only=True)
            if cached.get("key") == key:
                return cached
        values, ids = [], []
        with torch.no_grad():
            for ex in self.train_set:
                b = collate([ex]).to(_device(self.teacher.net))
                v, i = teacher_topk(self.teacher.net(b.tokens), b.labels, self.config.kd_topk)
                values.append(v.cpu())
                ids.append(i.cpu())
        cached = {"key": key, "values": values, "ids": ids}
        ckpt_state.atomic_save(cached, path)
        return cached

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean validation loss (per trained token; per pair for DPO), or None without a validation split."""
        if not self.val_set:
            return None
        was_training = self.net.training
        self.net.eval()
        total, count = 0.0, 0
        bs = self.config.batch_size
        for s in range(0, len(self.val_set), bs):
            items = self.val_set[s : s + bs]
            batch = self._make(items) if self.config.method == "dpo" else collate(items).to(_device(self.net))
            if self.config.method == "distill":  # validation is plain next-token loss: no teacher cache for it
                loss, n = token_nll_sum(self._forward(self.net, batch), batch.labels), batch.n_trained
            else:
                loss, n = self._loss_sum(batch, items, [])
            total, count = total + float(loss), count + n
        self.net.train(was_training)
        return total / max(1, count)

    # -- the loop -------------------------------------------------------------------------------------------
    def run(self, resume: bool = False, stop_after: int | None = None) -> dict:
        """Train; returns a summary. `stop_after` ends after that many steps in this call (tests, demos)."""
        c = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        params = self._prepare_model()
        if dist.active():
            dist.shard(self.net)
            params = trainable_parameters(self.net)  # the sharded (DTensor) parameters fully_shard put in place
        lead = dist.rank() == 0  # the one process that logs and writes files
        torch.manual_seed(c.seed)
        n_batches = len(self._micro_batches(0))
        total = c.max_steps or math.ceil(c.epochs * n_batches / c.grad_accum)
        optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(c, total))
        step = position = 0
        fingerprint = self.fingerprint()
        metrics_path = self.out / "metrics.jsonl"
        if resume:
            saved = ckpt_state.load(self.out, fingerprint)
            current = dict(self.net.named_parameters())
            for name, t in saved["weights"].items():
                dist.load_full(current[name], t)
            dist.load_optimizer_state(optimizer, saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            ckpt_state.set_rng_state(saved["rng"])
            step, position = saved["step"], saved["position"]
            kept = [ln for ln in metrics_path.read_text().splitlines() if _logged_step(ln) <= step] \
                if metrics_path.exists() else []
            dist.barrier()  # every rank has read the metrics before the lead rewrites them
            if lead:
                write_text(metrics_path, "".join(ln + "\n" for ln in kept))
                self.log(f"resumed at step {step}/{total} from {self.out / ckpt_state.FILE}")
        elif lead:
            write_text(metrics_path, "")
        if c.method == "distill":
            self.teacher_cache = self._cache_teacher()
        self.net.train()
        started, start_step = time.perf_counter(), step
        epoch_cache: dict[int, list[list[int]]] = {}
        last_loss = None
        while step < total and (stop_after is None or step - start_step < stop_after):
            micro = []
            for _ in range(c.grad_accum):
                epoch, k = divmod(position, n_batches)
                if epoch >= c.epochs and c.max_steps is None:
                    break
                order = epoch_cache.setdefault(epoch, self._micro_batches(epoch))
                micro.append(order[k])
                position += 1
            if not micro:
                break
            # The divisor counts the whole step (every rank's rows); under FSDP each rank runs its share of every
            # micro-batch, and the gradients it reduces are averaged over the ranks, hence the factor world().
            denom = sum(len(ix) if c.method == "dpo" else self._make([self.train_set[i] for i in ix]).n_trained
                        for ix in micro)
            tokens = sum(len(self.train_set[i]) for ix in micro for i in ix) * (2 if c.method == "dpo" else 1)
            step_loss = 0.0
            t0 = time.perf_counter()
            for ix in micro:
                ix, weight = dist.rows_of(ix)
                loss_sum, _ = self._loss_sum(self._make([self.train_set[i] for i in ix]),
                                             [self.train_set[i] for i in ix], ix)
                (loss_sum * (weight * dist.world()) / denom).backward()  # one process: loss_sum * 1.0 / denom
                step_loss += weight * float(loss_sum.detach()) / denom
            step_loss = dist.sum_across(step_loss)
            grad_norm = None
            if c.clip:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, c.clip))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last_loss = step_loss
            dt = time.perf_counter() - t0
            record = {"step": step, "loss": step_loss, "lr": lr, "tokens": tokens, "tokens_per_s": tokens / dt,
                      "grad_norm": grad_norm}
            if c.eval_every and step % c.eval_every == 0:
                record["val_loss"] = self.validate()
            if lead:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if lead and (step % c.log_every == 0 or step == total):
                elapsed = time.perf_counter() - started
                eta = elapsed / (step - start_step) * (total - step)
                val = f"  val {record['val_loss']:.4f}" if record.get("val_loss") is not None else ""
                self.log(f"step {step}/{total}  loss {step_loss:.4f}{val}  lr {lr:.2e}  "
                         f"{tokens / dt:.0f} tok/s  ETA {_fmt_time(eta)}")
            if c.save_every and step % c.save_every == 0:
                self._save_state(optimizer, scheduler, step, position, fingerprint)
        self._save_state(optimizer, scheduler, step, position, fingerprint)
        val_loss = self.validate() if step >= total else None
        if val_loss is not None and lead:
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": step, "val_loss": val_loss}) + "\n")
        self.net.eval()
        if step >= total:
            self._finish(metrics_path)
        return {"step": step, "total": total, "loss": last_loss, "val_loss": val_loss, "out": str(self.out)}

    def _finish(self, metrics_path: Path) -> None:
        from .plot import plot_series

        if dist.rank() == 0:
            rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
            train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
            val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
            plot_series(self.out / "loss.png", [train, val] if val else [train])
        self.save_result()

    def save_result(self) -> Path:
        """The adapter (PEFT folder in `out`) or, for full fine-tuning, the model as a Hugging Face folder.
        Under FSDP every rank gathers the weights and the lead rank writes them."""
        weights = self._weights()
        out = self.out if self.config.uses_adapter else self.out / "model"
        if dist.rank() == 0:
            if self.config.uses_adapter:
                from ..lora.peft import save_adapter

                save_adapter(self.net, self.model.config, self.config.lora, out,
                             base=str(self.model.checkpoint.source), weights=weights)
            else:
                import dataclasses

                from ..checkpoint.save import save

                save(dataclasses.replace(self.model.checkpoint, state_dict=weights, prepare=None), out, "hf")
        dist.barrier()
        return out


def _device(net: nn.Module) -> torch.device:
    """Where the model computes (its embedding's device; a sharded weight's local device)."""
    w = net.tok_embeddings.weight
    return w.to_local().device if hasattr(w, "to_local") else w.device


def _logged_step(line: str) -> float:
    """The step of one metrics.jsonl line; a line torn by a killed run counts as never written."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
