"""The memory plan: what a model will hold (weights, KV cache, working buffers) before anything is allocated.

`llamaherd.load(..., max_memory=)`, `herd run|chat|serve --max-memory` and `herd show --memory` use it. The
plan is made from the checkpoint as read (tensors still memory-mapped, nothing touched) and the model built
on the meta device, so refusing costs no allocation:

    weights        every tensor as the model will hold it: packed GGUF rows at their packed size, floats in
                   the runtime dtype, weight-only int8/int4 projections at their quantized size
    conversion     source bytes read while converting (a dtype change or a quantization): the mapped pages
                   stay resident beside the converted copy
    KV cache       keys and values of every layer for `num_ctx` tokens (model/cache.py `KVCache`), or the
                   server's paged pool (engine/paged.py)
    working        the activations of the largest forward: a prefill of `num_ctx` tokens, one layer at a time
    allocator      what the C heap keeps of those activations once freed (the ones under glibc's mmap threshold)
    runtime        what the process holds now (interpreter, torch, tokenizer), less the checkpoint's own pages

Sizes are bytes; `parse_size` reads "512M", "8G", "1.5GiB" (powers of 1024).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .checkpoint.base import stored_dtype
from .checkpoint.quantized import holds_fp8
from .config import ModelConfig
from .errors import LlamaherdError
from .quant.ggml import GGMLWeight

MiB, GiB = 1 << 20, 1 << 30


class MemoryPlanError(LlamaherdError, MemoryError):
    """A model does not fit the memory budget (`max_memory`) or the memory available: refused before loading."""

    def __init__(self, message: str, plan: MemoryPlan) -> None:
        super().__init__(message)
        self.plan = plan


def parse_size(text: str | int | float) -> int:
    """Bytes from "512M", "8G", "8GiB", "1.5g", "1048576" (K, M, G, T are powers of 1024)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text <= 0:
            raise LlamaherdError(f"memory size {text!r} must be positive")
        return int(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", str(text).upper())
    if m is None or float(m.group(1)) <= 0:
        raise LlamaherdError(f"memory size {text!r}: give a positive number with an optional unit, like 512M, "
                             "8G or 8GiB (K, M, G, T are powers of 1024)")
    return int(float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2) or "_"))


def human(n: int | float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.0f} MiB"


# ---- what the process holds -------------------------------------------------------------------------------------


def resident_bytes() -> int:
    """This process's resident memory now (VmRSS)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak so far is the best the platform offers
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def available_bytes() -> int | None:
    """Memory the kernel can give without swapping (MemAvailable), or None where it is not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def mapped_resident_bytes(source: Path) -> int:
    """Resident pages of this process's memory maps of files under `source` (a checkpoint already read and
    partly touched): they are counted in the weights, not in the runtime."""
    root = str(Path(source).resolve())
    total, counting = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(maxsplit=6)
                if len(head) >= 5 and "-" in head[0] and not line.startswith(("Rss:", "Pss")):
                    path = head[5].strip() if len(head) > 5 else ""
                    counting = path == root or path.startswith(root + os.sep)
                elif counting and line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total


# ---- the sizes --------------------------------------------------------------------------------------------------


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Keys and values of one token in every layer (model/cache.py, engine/paged.py)."""
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * torch.finfo(dtype).bits // 8


# glibc serves allocations below its mmap threshold (dynamic, at most 32 MiB on 64-bit: DEFAULT_MMAP_THRESHOLD_MAX
# in malloc/malloc.c) from its heap and keeps what is freed there; larger ones are unmapped when freed.
MMAP_THRESHOLD_MAX = 32 * MiB


def working_bytes(config: ModelConfig, tokens: int, dtype: torch.dtype) -> tuple[int, int]:
    """(live, kept): activations of one forward over `tokens` tokens at the largest moment of one layer
    (model/llama.py, gemma3.py), and what the C heap keeps of them after they are freed.

    Live: the residual stream, the normed input and the sublayer's output, then either the attention's q, k, v,
    their rotated (float) copies and its output, or the feed-forward's four hidden-wide tensors (two
    projections, the activation, their product); a sliding-window model's boolean mask over every query and key
    and the additive float mask attention makes of it; the float32 logits of the last position. Kept: glibc
    serves each tensor under its mmap threshold from the heap and keeps it there once freed (measured:
    bench/memory_plan.py, BENCHMARKS.md)."""
    a = torch.finfo(dtype).bits // 8
    q = config.n_heads * config.head_dim
    kv = config.n_kv_heads * config.head_dim
    hidden = config.hidden_dim
    if config.moe is not None:  # routed experts and the shared one, each hidden-wide (model/moe.py)
        hidden = max(hidden, (config.moe.top_k + 1) * config.moe.hidden_dim)
    attention = [tokens * q * a] * 5 + [tokens * kv * a] * 4
    ffn = [tokens * hidden * a] * 4
    tensors = [tokens * config.dim * a] * 3 + max(attention, ffn, key=sum) + [config.vocab_size * 4] * 2
    if config.sliding_window and tokens > config.sliding_window:  # gemma3.window_mask, then sdpa's float mask
        tensors += [tokens * tokens, 4 * tokens * tokens]
    return sum(tensors), sum(t for t in tensors if t < MMAP_THRESHOLD_MAX)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes a loaded model will hold, by part; `total` is what the process will hold at its peak."""

    weights: int
    conversion: int
    kv_cache: int
    working: int
    kept: int
    runtime: int
    num_ctx: int
    kv_per_token: int
    weights_note: str
    kv_note: str
    kv_pool: bool = False  # the KV cache is a server's paged pool (--kv-cache-memory), not one context's

    @property
    def total(self) -> int:
        return self.weights + self.conversion + self.kv_cache + self.working + self.kept + self.runtime

    def rows(self) -> list[tuple[str, int, str]]:
        rows = [("weights", self.weights, self.weights_note)]
        if self.conversion:
            rows.append(("conversion", self.conversion, "source pages read while converting (reclaimable)"))
        rows += [("KV cache", self.kv_cache, self.kv_note),
                 ("working buffers", self.working, f"activations of a {self.num_ctx}-token prefill")]
        if self.kept:
            rows.append(("allocator", self.kept, "freed activations the C heap keeps (each under 32 MiB)"))
        rows.append(("runtime", self.runtime, "interpreter, torch, tokenizer"))
        return rows

    def table(self) -> str:
        lines = [f"  {name:<16} {human(n):>11}  {note}" for name, n, note in self.rows()]
        return "\n".join(lines + [f"  {'total':<16} {human(self.total):>11}"])

    def fitting_context(self, budget: int) -> int:
        """The largest num_ctx whose plan fits `budget` (0 when even the weights do not)."""
        fixed = self.weights + self.conversion + self.runtime
        ctx = self.num_ctx
        while ctx >= 1:
            scale = ctx / self.num_ctx
            if fixed + self.kv_per_token * ctx + int((self.working + self.kept) * scale) <= budget:
                return ctx
            ctx //= 2
        return 0

    def check(self, max_memory: int | None, *, available: int | None = None) -> None:
        """Raise MemoryPlanError when the plan exceeds `max_memory`; without a budget, when the weights (and
        their conversion) exceed the memory `available` now."""
        if max_memory is not None:
            if self.total <= max_memory:
                return
            parts = ", ".join(f"{name} {human(n)}" for name, n, _ in self.rows())
            ctx = self.fitting_context(max_memory)
            ways = ["a smaller KV cache pool (--kv-cache-memory)" if self.kv_pool else None,
                    f"a smaller context (num_ctx {ctx} fits)" if 0 < ctx < self.num_ctx and not self.kv_pool else None,
                    "fewer bytes per weight (--quantize int8, int4 or fp8, or a Q4_K_M GGUF made by herd quantize)",
                    "a larger --max-memory"]
            raise MemoryPlanError(f"this model needs {human(self.total)} ({parts}) with a {self.num_ctx}-token "
                                  f"context, more than the memory budget (max_memory) of {human(max_memory)}; try "
                                  f"{'; or '.join(w for w in ways if w)}", self)
        # Without a budget: refuse only what loading itself would allocate (the KV cache grows with use).
        need = self.weights + self.conversion
        if available is not None and need > available:
            raise MemoryPlanError(f"loading this model needs {human(need)} ({self.weights_note} weights "
                                  f"{human(self.weights)}, conversion {human(self.conversion)}), more than the "
                                  f"{human(available)} this machine has available; try fewer bytes per weight "
                                  "(--quantize int8, int4 or fp8, or a Q4_K_M GGUF made by herd quantize), or free "
                                  "memory", self)


# ---- planning a checkpoint --------------------------------------------------------------------------------------


def _fp8_expert_sizes(name: str, experts: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Each of an Experts module's stacks mapped to a meta-device Fp8Bank of its size (codes and row scales)."""
    from .quant.fp8_mm import E4M3, Fp8Bank

    banks = {}
    for leaf, p in experts.named_parameters():
        e, k, n = p.shape  # Meta's (E, in, out) layout
        banks[f"{name}.{leaf}"] = Fp8Bank([(torch.empty(e, n, k, dtype=E4M3, device="meta"),
                                            torch.empty(e, n, device="meta"))])
    return banks


def _prepared_bytes(net: torch.nn.Module) -> int:
    """The bytes of the codes a checkpoint's `prepare` built into the meta-built model (GPTQ / AWQ / Meta int4
    packed projections, an FP8 file's e4m3 codes): real buffers, not in the state dict."""
    return sum(b.numel() * b.element_size() for m in net.modules() for b in m.buffers(recurse=False)
               if b.device.type != "meta")


def _weight_sizes(ckpt: Checkpoint, target: torch.dtype, quantize: str | None) -> tuple[int, int, str]:
    """(runtime weight bytes, source bytes converted, a note) from the checkpoint's tensors and the meta model."""
    from .model import build

    net = build(ckpt.config, device="meta")
    if ckpt.prepare is not None:
        ckpt.prepare(net)
    quantized: dict[str, torch.Size] = {}
    kept = _prepared_bytes(net)  # packed or FP8 codes a format attached by `prepare`
    if quantize == "fp8" and not holds_fp8(ckpt):
        from .model.moe import Experts
        from .quant import fp8_mm

        floats = {k for k, t in ckpt.state_dict.items() if not isinstance(t, GGMLWeight) and t.is_floating_point()}
        for name, module in net.named_modules():
            if name + ".weight" in floats and fp8_mm.quantizable(name, module):
                quantized[name + ".weight"] = fp8_mm.Fp8Linear(
                    torch.empty(module.weight.shape, dtype=fp8_mm.E4M3, device="meta"),
                    torch.empty(module.out_features, device="meta"))
            elif type(module) is Experts and f"{name}.moe_w_in_eD_F" in floats and \
                    fp8_mm.fits(*module.moe_w_in_eD_F.shape[1:]):
                quantized.update(_fp8_expert_sizes(name, module))
    elif quantize is not None and quantize != "fp8":
        from .quant.weight_only import empty_module, parse_scheme, quantizable

        scheme, group = parse_scheme(quantize)
        floats = {k for k, t in ckpt.state_dict.items() if not isinstance(t, GGMLWeight) and t.is_floating_point()}
        for name, module in net.named_modules():
            if name + ".weight" in floats and quantizable(name, module, scheme, group):
                quantized[name + ".weight"] = empty_module(scheme, group, module.out_features, module.in_features)
        out_name = "tok_embeddings.weight" if ckpt.config.tie_embeddings else "output.weight"
        w = ckpt.state_dict.get(out_name)
        if out_name in floats and w.dim() == 2 and w.shape[1] % (group or 2) == 0:
            quantized["project"] = empty_module(scheme, group, w.shape[0], w.shape[1])
    size = torch.finfo(target).bits // 8
    weights, conversion = kept, 0
    packed = set()
    for name, t in ckpt.state_dict.items():
        if isinstance(t, GGMLWeight):
            weights += t.numel() * t.element_size()
            packed.add(t.qtype.name)
            continue
        stored = t.numel() * t.element_size()
        if name in quantized:
            conversion += stored
            continue
        converted = t.is_floating_point() and t.dtype != target
        weights += t.numel() * size if t.is_floating_point() else stored
        conversion += stored if converted else 0
    for module in quantized.values():
        weights += sum(p.numel() * p.element_size() for p in (*module.parameters(), *module.buffers()))
        if getattr(module, "group_size", None):  # int4: the kernel's own packed layout, built on first use
            weights += module.qweight.numel() * module.qweight.element_size()
    note = f"{'/'.join(sorted(packed))} packed" if packed else str(target).removeprefix("torch.")
    if quantize is not None:
        note += f", projections {quantize}"
    return weights, conversion, note


def plan(ckpt: Checkpoint, *, num_ctx: int | None = None, dtype: torch.dtype | None = None,
         quantize: str | None = None, kv_pool_bytes: int | None = None) -> MemoryPlan:
    """The memory plan of loading `ckpt` and running it with a `num_ctx`-token context (default: the model's
    max_seq_len); `kv_pool_bytes` is a server's paged KV cache in place of one context's cache."""
    config = ckpt.config
    ctx = config.max_seq_len if num_ctx is None else num_ctx
    if not isinstance(ctx, int) or ctx <= 0:
        raise LlamaherdError(f"num_ctx={num_ctx!r}: must be a positive integer")
    target = dtype or stored_dtype(ckpt.state_dict)
    weights, conversion, note = _weight_sizes(ckpt, target, quantize)  # builds on meta: imports torch's meta kernels
    per_token = kv_bytes_per_token(config, target)
    if kv_pool_bytes is None:
        kv = per_token * ctx
        kv_note = f"{ctx} tokens, {per_token / 1024:.1f} KiB each ({str(target).removeprefix('torch.')})"
    else:
        kv, kv_note = kv_pool_bytes, f"paged pool: {kv_pool_bytes // per_token} tokens"
    runtime = max(0, resident_bytes() - mapped_resident_bytes(ckpt.source))
    live, kept = working_bytes(config, ctx, target)
    return MemoryPlan(weights=weights, conversion=conversion, kv_cache=kv, working=live, kept=kept, runtime=runtime,
                      num_ctx=ctx, kv_per_token=per_token, weights_note=note, kv_note=kv_note,
                      kv_pool=kv_pool_bytes is not None)


def check_fits(ckpt: Checkpoint, max_memory: int | str | None, **how) -> MemoryPlan:
    """Plan `ckpt` and raise MemoryPlanError when it does not fit `max_memory` (or the memory available)."""
    budget = None if max_memory is None else parse_size(max_memory)
    p = plan(ckpt, **how)
    p.check(budget, available=available_bytes())
    return p
