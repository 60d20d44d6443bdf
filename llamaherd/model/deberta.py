"""DeBERTa-v2/v3 sequence classifier (Prompt Guard's network): disentangled attention, pure torch.

The math follows the paper (He et al., "DeBERTa: Decoding-enhanced BERT with Disentangled Attention",
arXiv:2006.03654, eq. 2-4: content->content, content->position and position->content scores, scaled by
sqrt(d * (1 + number of position terms))) and the log-bucketed relative positions of DeBERTa v2
(transformers `models/deberta_v2/modeling_deberta_v2.py`, `make_log_bucket_position`). Module names mirror
the Hugging Face checkpoints (`deberta.encoder.layer.N.attention.self.query_proj`, ...) so a state dict loads
with strict=True and no renaming table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DebertaConfig:
    vocab_size: int
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    layer_norm_eps: float = 1e-7
    relative_attention: bool = True
    max_relative_positions: int = -1
    position_buckets: int = 256
    norm_rel_ebd: str = "layer_norm"
    share_att_key: bool = True
    pos_att_type: tuple[str, ...] = ("p2c", "c2p")
    position_biased_input: bool = False
    embedding_size: int | None = None
    pad_token_id: int = 0
    pooler_hidden_size: int | None = None
    pooler_hidden_act: str = "gelu"
    labels: tuple[str, ...] = field(default=("LABEL_0", "LABEL_1"))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rel_span(self) -> int:
        """Relative distances kept on each side: the bucket count, else the maximum relative position."""
        if self.position_buckets > 0:
            return self.position_buckets
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

    @property
    def max_relative(self) -> int:
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings


_ACT = {"gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh,
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def activation(name: str):
    return _ACT[name]


def relative_positions(q_len: int, k_len: int, buckets: int, max_position: int, device=None) -> torch.Tensor:
    """(q_len, k_len) relative distances q - k; beyond +-buckets/2 they grow logarithmically up to max_position."""
    rel = torch.arange(q_len, device=device)[:, None] - torch.arange(k_len, device=device)[None, :]
    if buckets <= 0 or max_position <= 0:
        return rel
    mid = buckets // 2
    sign = torch.sign(rel)
    abs_pos = torch.where((rel < mid) & (rel > -mid), torch.tensor(mid - 1).type_as(rel), rel.abs())
    log_pos = torch.ceil(torch.log(abs_pos / mid) / torch.log(torch.tensor((max_position - 1) / mid)) * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, rel.type_as(log_pos), log_pos * sign).long()


class Embeddings(nn.Module):
    def __init__(self, c: DebertaConfig) -> None:
        super().__init__()
        e = c.embedding_size or c.hidden_size
        self.word_embeddings = nn.Embedding(c.vocab_size, e)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, e) if c.position_biased_input else None
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, e) if c.type_vocab_size > 0 else None
        self.embed_proj = nn.Linear(e, c.hidden_size, bias=False) if e != c.hidden_size else None
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(ids)  # (B, T, e)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(torch.arange(ids.shape[1], device=ids.device))[None]
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings(torch.zeros_like(ids))
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        return self.LayerNorm(x) * mask[..., None].to(x.dtype)  # padding positions zeroed


class DisentangledSelfAttention(nn.Module):
    def __init__(self, c: DebertaConfig) -> None:
        super().__init__()
        self.c = c
        h = c.num_attention_heads * c.head_dim
        self.query_proj = nn.Linear(c.hidden_size, h)
        self.key_proj = nn.Linear(c.hidden_size, h)
        self.value_proj = nn.Linear(c.hidden_size, h)
        if c.relative_attention and not c.share_att_key:
            if "c2p" in c.pos_att_type:
                self.pos_key_proj = nn.Linear(c.hidden_size, h)
            if "p2c" in c.pos_att_type:
                self.pos_query_proj = nn.Linear(c.hidden_size, h)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.c.num_attention_heads, self.c.head_dim).transpose(-3, -2)  # (.., H, T, d)

    def forward(self, x: torch.Tensor, mask2d: torch.Tensor, rel_pos: torch.Tensor | None,
                rel_emb: torch.Tensor | None) -> torch.Tensor:
        c = self.c
        q, k, v = self._heads(self.query_proj(x)), self._heads(self.key_proj(x)), self._heads(self.value_proj(x))
        factor = 1 + ("c2p" in c.pos_att_type) + ("p2c" in c.pos_att_type) if c.relative_attention else 1
        scale = math.sqrt(c.head_dim * factor)
        scores = q @ k.transpose(-1, -2) / scale  # (B, H, T, T)
        if c.relative_attention:
            span = c.rel_span
            rel_emb = rel_emb[: 2 * span]  # (2*span, D)
            if c.share_att_key:
                pos_k, pos_q = self._heads(self.key_proj(rel_emb)), self._heads(self.query_proj(rel_emb))
            else:
                pos_k = self._heads(self.pos_key_proj(rel_emb)) if "c2p" in c.pos_att_type else None
                pos_q = self._heads(self.pos_query_proj(rel_emb)) if "p2c" in c.pos_att_type else None
            T = x.shape[1]
            if "c2p" in c.pos_att_type:  # query content -> key position: bucket of (i - j)
                c2p = q @ pos_k.transpose(-1, -2)  # (B, H, T, 2*span)
                idx = (rel_pos + span).clamp(0, 2 * span - 1).expand(*c2p.shape[:2], T, T)
                scores = scores + c2p.gather(-1, idx) / scale
            if "p2c" in c.pos_att_type:  # query position -> key content: bucket of (j - i), read from the key's side
                p2c = k @ pos_q.transpose(-1, -2)  # (B, H, T, 2*span)
                idx = (-rel_pos + span).clamp(0, 2 * span - 1).expand(*p2c.shape[:2], T, T)
                scores = scores + p2c.gather(-1, idx).transpose(-1, -2) / scale
        keep = mask2d[:, None]  # (B, 1, T, T): both the query and the key are real tokens
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, -1).masked_fill(~keep, 0.0)
        out = probs @ v  # (B, H, T, d)
        return out.transpose(1, 2).reshape(*x.shape[:2], -1)


class _Dense(nn.Module):
    """dense -> (dropout) -> LayerNorm(residual + .): HF's SelfOutput / Output blocks."""

    def __init__(self, d_in: int, c: DebertaConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, c: DebertaConfig) -> None:
        super().__init__()
        self.self = DisentangledSelfAttention(c)
        self.output = _Dense(c.hidden_size, c)


class _Intermediate(nn.Module):
    def __init__(self, c: DebertaConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)


class Layer(nn.Module):
    def __init__(self, c: DebertaConfig) -> None:
        super().__init__()
        self.act = activation(c.hidden_act)
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _Dense(c.intermediate_size, c)

    def forward(self, x, mask2d, rel_pos, rel_emb):
        a = self.attention.output(self.attention.self(x, mask2d, rel_pos, rel_emb), x)
        return self.output(self.act(self.intermediate.dense(a)), a)


class Encoder(nn.Module):
    def __init__(self, c: DebertaConfig) -> None:
        super().__init__()
        self.c = c
        self.layer = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        if c.relative_attention:
            self.rel_embeddings = nn.Embedding(2 * c.rel_span, c.hidden_size)
        if "layer_norm" in [s.strip() for s in c.norm_rel_ebd.lower().split("|")]:
            self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        c = self.c
        mask2d = mask[:, None, :] & mask[:, :, None]  # (B, T, T)
        rel_pos = rel_emb = None
        if c.relative_attention:
            rel_pos = relative_positions(x.shape[1], x.shape[1], c.position_buckets, c.max_relative, x.device)
            rel_emb = self.rel_embeddings.weight
            if hasattr(self, "LayerNorm"):
                rel_emb = self.LayerNorm(rel_emb)
        for layer in self.layer:
            x = layer(x, mask2d, rel_pos, rel_emb)
        return x


class Backbone(nn.Module):
    def __init__(self, c: DebertaConfig) -> None:
        super().__init__()
        self.embeddings = Embeddings(c)
        self.encoder = Encoder(c)


class _Pooler(nn.Module):
    def __init__(self, c: DebertaConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.pooler_hidden_size or c.hidden_size, c.pooler_hidden_size or c.hidden_size)


class DebertaForSequenceClassification(nn.Module):
    """Token ids (B, T) and a padding mask -> label logits (B, n_labels), pooled from the first token."""

    def __init__(self, c: DebertaConfig) -> None:
        super().__init__()
        self.config = c
        self.pool_act = activation(c.pooler_hidden_act)
        self.deberta = Backbone(c)
        self.pooler = _Pooler(c)
        self.classifier = nn.Linear(c.pooler_hidden_size or c.hidden_size, len(c.labels))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        h = self.deberta.encoder(self.deberta.embeddings(ids, mask), mask)  # (B, T, D)
        pooled = self.pool_act(self.pooler.dense(h[:, 0]))
        return self.classifier(pooled).float()
