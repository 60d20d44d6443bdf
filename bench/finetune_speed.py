"""LoRA training speed and peak memory on the default model (Gemma 3 270M): llamaherd against transformers + PEFT.

    python bench/finetune_speed.py [--steps 3] [--batch 4] [--seq 64] [--threads 2]

Each configuration runs in its own subprocess (so peak RSS is its own): one warm-up step, then `--steps` timed
optimizer steps (forward, backward, AdamW) on one fixed batch of random tokens, every position trained, LoRA rank
16 / alpha 32 on all seven projections, same thread count. Both sides start from the same weights: the GGUF's
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
import resource
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


def child(mode: str, steps: int, batch: int, seq: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    vocab, forward, params = _peft() if mode == "peft-lora-f32" else _ours(mode)
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
    return {"mode": mode, "tokens_per_s": steps * batch * seq / dt, "seconds_per_step": dt / steps,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "first_loss": first,
            "trainable": sum(p.numel() for p in params)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="ours-lora-f32,peft-lora-f32,ours-lora-bf16,ours-qlora")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.steps, a.batch, a.seq, a.threads)))
        return
    print(f"load average before: {os.getloadavg()}; batch {a.batch} x {a.seq} tokens, {a.steps} timed steps, "
          f"{a.threads} threads")
    for mode in a.modes.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(a.steps), "--batch",
                              str(a.batch), "--seq", str(a.seq), "--threads", str(a.threads)],
                             capture_output=True, text=True)
        if out.returncode:
            print(f"{mode}: failed\n{out.stderr[-2000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{mode:15s} {r['tokens_per_s']:8.1f} tok/s  {r['seconds_per_step']:7.2f} s/step  "
              f"peak RSS {r['peak_rss_mib']:7.0f} MiB  first loss {r['first_loss']:.4f}  "
              f"trainable {r['trainable']:,}  (load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
