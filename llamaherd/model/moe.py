"""Llama 4 mixture-of-experts feed-forward: sigmoid top-k router, stacked routed experts, one shared expert.

Parameter names and layouts are Meta's (llama-models `llama4/moe.py` and its checkpoint names):
`router_DE` (dim, n_experts), `experts.moe_w_in_eD_F` / `moe_w_swiglu_eD_F` (E, dim, F) and
`experts.moe_w_out_eF_D` (E, F, dim), `shared_expert.w1/w2/w3`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .llama import FeedForward


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked tensors; `forward` runs one expert on the tokens routed to it."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.moe_w_in_eD_F = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))  # gate (Meta w1)
        self.moe_w_swiglu_eD_F = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))  # up (Meta w3)
        self.moe_w_out_eF_D = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))  # down (Meta w2)

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """x: (n, dim) tokens routed to `expert` -> (n, dim)."""
        gate = x @ self.moe_w_in_eD_F[expert]  # (n, F)
        up = x @ self.moe_w_swiglu_eD_F[expert]
        return (F.silu(gate) * up) @ self.moe_w_out_eF_D[expert]


class MoE(nn.Module):
    """shared_expert(x) + sum over the top-k experts e of expert_e(sigmoid(score_e) * x).

    As in Meta's reference the router's sigmoid score scales the expert's INPUT (not its output). Unlike the
    reference, which runs every expert on every token (zero-scaled when not chosen), each expert here runs only
    on the tokens routed to it: tokens are grouped by expert and the loop visits experts that have tokens.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        moe = config.moe
        assert moe is not None and moe.hidden_dim > 0, "MoE layer needs config.moe.hidden_dim"
        self.num_experts = moe.num_experts
        self.top_k = moe.top_k
        self.router_DE = nn.Parameter(torch.empty(config.dim, moe.num_experts))
        self.experts = Experts(moe.num_experts, config.dim, moe.hidden_dim)
        self.shared_expert = FeedForward(config.dim, moe.hidden_dim)

    def route(self, x_aD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert indices (a, k) and their sigmoid gates (a, k) for a tokens (a, dim)."""
        scores_aE = x_aD @ self.router_DE  # (a, E)
        top_scores, top_idx = torch.topk(scores_aE, self.top_k, dim=-1)
        return top_idx, torch.sigmoid(top_scores)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        x_aD = x.reshape(-1, D)  # (a = B*T, D)
        out = self.shared_expert(x_aD)
        top_idx, gates = self.route(x_aD)
        # Group the a*k (token, expert) assignments by expert: a stable sort keeps token order inside a group.
        expert_of = top_idx.reshape(-1)  # (a*k,)
        order = torch.argsort(expert_of, stable=True)
        token_of = order // self.top_k  # assignment j belongs to token j // k
        gate_of = gates.reshape(-1)[order]
        counts = torch.bincount(expert_of, minlength=self.num_experts).tolist()
        begin = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            tokens = token_of[begin : begin + n]
            routed_in = x_aD[tokens] * gate_of[begin : begin + n, None].to(x.dtype)  # (n, D)
            out.index_add_(0, tokens, self.experts(routed_in, e))
            begin += n
        return out.view(B, T, D)
