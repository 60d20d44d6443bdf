"""LoRA training speed and peak memory on the default model (Gemma 3 270M): llamaherd against transformers + PEFT.

    python bench/finetune_speed.py [--steps 3] [--batch 4] [--seq 64] [--threads 2] [--rounds 2] [--profile]

Each configuration runs in its own subprocess (so peak memory is its own): one warm-up step, then `--steps` timed
optimizer steps (forward, backward, AdamW) on one fixed batch of random tokens, every position trained, LoRA rank
16 / alpha 32 on all seven projections, same thread count. The configurations run interleaved, `--rounds` times
(A B C D A B C D ...), and each one's fastest round is reported: on a shared machine a single run mostly measures
what else was running. Memory is the process's peak resident set during training (the high-water mark is reset
after loading: /proc/self/clear_refs), and the whole process's peak, loading included. `--profile` prints each
configuration's top operators for one step (torch.profiler). Both sides start from the same weights: the GGUF's
packed tensors decoded to float32 (llamaherd's `dequantize_packed`), handed to transformers' Gemma3ForCausalLM
under Hugging Face names. Configurations:
  ours-lora-f32   llamaherd LoRA over float32 base weights
  peft-lora-f32   transformers + PEFT, the same
  ours-lora-bf16  llamaherd LoRA over bf16 base weights, bf16 autocast
  ours-qlora      llamaherd QLoRA over the GGUF's own packed (Q4_K/Q6_K...) weights, decoded in forward and backward
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]


def _batch(vocab: int, batch: int, seq: int):
    import torch

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _ours(mode: str):
    import torch

    import llamaherd
    from llamaherd.store import DEFAULT_MODEL
    from llamaherd.lora.layer import LoRAConfig, apply_lora, trainable_parameters
    from llamaherd.train.swaps import dequantize_packed, project_trained_rows

    model = llamaherd.load(DEFAULT_MODEL)
    net = model.net
    if mode == "ours-lora-f32":
        dequantize_packed(net, torch.float32)
    elif mode == "ours-lora-bf16":
        dequantize_packed(net, torch.bfloat16)
    apply_lora(net, LoRAConfig(rank=16, alpha=32.0, targets=TARGETS), seed=0)
    project_trained_rows(net)
    net.train()
    autocast = mode == "ours-lora-bf16"

    def forward(tokens):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return net(tokens)

    return model.config.vocab_size, forward, trainable_parameters(net)


def _peft():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    import llamaherd
    from llamaherd.checkpoint import gemma3
    from llamaherd.store import DEFAULT_MODEL
    from llamaherd.train.swaps import dequantize_packed

    model = llamaherd.load(DEFAULT_MODEL)
    dequantize_packed(model.net, torch.float32)
    state = gemma3.meta_to_hf({k: v for k, v in model.net.state_dict().items()}, model.config)
    hf_cfg = gemma3.config_to_hf(model.config)
    hf_cfg.pop("architectures", None)
    hf_cfg.pop("model_type", None)
    cfg = Gemma3TextConfig(**hf_cfg)
    cfg._attn_implementation = "sdpa"
    ref = Gemma3ForCausalLM(cfg)
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    ref.tie_weights()
    del model
    peft_model = get_peft_model(ref, LoraConfig(r=16, lora_alpha=32, target_modules=HF_TARGETS, lora_dropout=0.0))
    peft_model.train()

    def forward(tokens):
        return peft_model(input_ids=tokens, use_cache=False).logits

    return cfg.vocab_size, forward, [p for p in peft_model.parameters() if p.requires_grad]


def _peak_rss_mib() -> float:
    """The process's resident high-water mark (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS to the current RSS (Linux >= 4.0)
        f.write("5")


def child(mode: str, steps: int, batch: int, seq: int, threads: int, profile: bool = False) -> dict:
    import torch

    torch.set_num_threads(threads)
    vocab, forward, params = _peft() if mode == "peft-lora-f32" else _ours(mode)
    load_peak = _peak_rss_mib()
    _reset_peak_rss()
    tokens, labels = _batch(vocab, batch, seq)
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        logits = forward(tokens)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    first = step()  # warm-up (first-use allocations, kernel builds)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = time.perf_counter() - t0
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60), file=sys.stderr)
    return {"mode": mode, "tokens_per_s": steps * batch * seq / dt, "seconds_per_step": dt / steps,
            "train_peak_mib": _peak_rss_mib(), "peak_rss_mib": max(load_peak, _peak_rss_mib()),
            "first_loss": first, "trainable": sum(p.numel() for p in params)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="ours-lora-f32,peft-lora-f32,ours-lora-bf16,ours-qlora")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved runs of every mode; the fastest is kept")
    ap.add_argument("--profile", action="store_true", help="print each mode's top operators for one more step")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.steps, a.batch, a.seq, a.threads, a.profile)))
        return
    print(f"load average before: {os.getloadavg()}; batch {a.batch} x {a.seq} tokens, {a.steps} timed steps, "
          f"{a.threads} threads, {a.rounds} interleaved rounds")
    best: dict[str, dict] = {}
    for rnd in range(a.rounds):
        for mode in a.modes.split(","):
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(a.steps), "--batch",
                                  str(a.batch), "--seq", str(a.seq), "--threads", str(a.threads)]
                                 + (["--profile"] if a.profile and rnd == 0 else []),
                                 capture_output=True, text=True)
            if out.returncode:
                print(f"{mode}: failed\n{out.stderr[-2000:]}")
                continue
            if a.profile and rnd == 0:
                print(f"--- {mode}: one step's top operators\n{_table(out.stderr)}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["load"] = os.getloadavg()[0]
            print(f"round {rnd + 1} {mode:15s} {r['tokens_per_s']:8.1f} tok/s  {r['seconds_per_step']:7.2f} s/step  "
                  f"train peak {r['train_peak_mib']:6.0f} MiB  process peak {r['peak_rss_mib']:6.0f} MiB  "
                  f"first loss {r['first_loss']:.4f}  (load average {r['load']:.1f})", flush=True)
            if mode not in best or r["seconds_per_step"] < best[mode]["seconds_per_step"]:
                best[mode] = r
    print("\nfastest round per mode:")
    for mode, r in best.items():
        print(f"{mode:15s} {r['tokens_per_s']:8.1f} tok/s  {r['seconds_per_step']:7.2f} s/step  "
              f"train peak {r['train_peak_mib']:6.0f} MiB  process peak {r['peak_rss_mib']:6.0f} MiB  "
              f"first loss {r['first_loss']:.4f}  trainable {r['trainable']:,}  (load average {r['load']:.1f})")
    print(f"load average after: {os.getloadavg()}")


def _table(stderr: str) -> str:
    """The profiler table out of a child's stderr (warnings dropped)."""
    lines = stderr.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("---")), len(lines))
    return "\n".join(lines[start:])


if __name__ == "__main__":
    main()
