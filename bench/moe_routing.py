"""Llama 4 MoE layer: experts run only on their routed tokens (llamaherd) vs every expert on every token (Meta).

The dense baseline is the computation of llama-models `llama4/moe.py` (each expert sees all a tokens, scaled
by a zero gate when not chosen): E*a rows through batched matmuls. Both give the same output (checked here).

    .venv/bin/python bench/moe_routing.py [--dim 1024 --hidden 2048 --experts 16 --tokens 1 64 512 --threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from llamaherd.config import ModelConfig, MoEConfig
from llamaherd.model.moe import MoE


def dense_all_experts(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Meta's reference computation: gate = sigmoid(score) for the top-k, 0 elsewhere; all experts run."""
    B, T, D = x.shape
    x_aD = x.reshape(-1, D)
    scores = x_aD @ moe.router_DE  # (a, E)
    top, idx = torch.topk(scores, moe.top_k, dim=-1)
    gates = torch.sigmoid(torch.full_like(scores, float("-inf")).scatter(1, idx, top))  # (a, E)
    routed_in = x_aD[None] * gates.t()[:, :, None]  # (E, a, D)
    w = moe.experts
    h = F.silu(torch.bmm(routed_in, w.moe_w_in_eD_F)) * torch.bmm(routed_in, w.moe_w_swiglu_eD_F)  # (E, a, F)
    return (moe.shared_expert(x_aD) + torch.bmm(h, w.moe_w_out_eF_D).sum(0)).view(B, T, D)


def timeit(fn, repeat: int) -> float:
    """CPU seconds per call (process time: with one thread it ignores waiting for a busy machine's cores)."""
    fn()  # warm-up
    t0 = time.process_time()
    for _ in range(repeat):
        fn()
    return (time.process_time() - t0) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 512])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="1 keeps timings stable on a shared machine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ModelConfig(arch="llama4", dim=args.dim, n_layers=1, n_heads=8, vocab_size=8,
                         moe=MoEConfig(num_experts=args.experts, top_k=args.top_k, hidden_dim=args.hidden))
    moe = MoE(config).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, args.dim**-0.5)
    E, D, Fh, k = args.experts, args.dim, args.hidden, args.top_k
    print(f"MoE dim {D}, expert width {Fh}, {E} experts, top-{k}, float32, {torch.get_num_threads()} threads")
    print(f"{'tokens':>7} {'routed cpu-ms':>14} {'all-experts cpu-ms':>19} {'speed-up':>9} {'routed MiB':>11} {'all MiB':>8}")
    with torch.no_grad():
        for a in args.tokens:
            x = torch.randn(1, a, D)
            torch.testing.assert_close(moe(x), dense_all_experts(moe, x), atol=1e-4, rtol=1e-4)
            t_routed = timeit(lambda: moe(x), args.repeat)
            t_dense = timeit(lambda: dense_all_experts(moe, x), args.repeat)
            # Activation memory of the expert part: inputs, gate/up/hidden, outputs, float32.
            routed_mib = a * k * (2 * D + 3 * Fh) * 4 / 2**20
            dense_mib = E * a * (2 * D + 3 * Fh) * 4 / 2**20
            print(f"{a:>7} {t_routed * 1e3:>14.2f} {t_dense * 1e3:>19.2f} {t_dense / t_routed:>8.1f}x "
                  f"{routed_mib:>11.2f} {dense_mib:>8.2f}")


if __name__ == "__main__":
    main()
