"""Training losses: masked next-token cross-entropy (SFT), DPO, and knowledge distillation on top-k teacher logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IGNORE


def trained_rows(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """((N, V) logits, (N,) labels) of the trained positions, in row-major order.

    `logits` is (B, T, V), or already (N, V) when the model projected the trained rows only (swaps.TrainedRows).
    """
    mask = labels != IGNORE
    return (logits if logits.dim() == 2 else logits[mask]).float(), labels[mask]


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of -log p(label) over the positions whose label is not IGNORE. labels (B, T)."""
    rows, targets = trained_rows(logits, labels)
    return F.cross_entropy(rows, targets, reduction="sum")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) sum of log p(label) over each row's trained positions (DPO's sequence log-likelihood)."""
    rows, targets = trained_rows(logits, labels)
    logp = torch.gather(rows.log_softmax(-1), 1, targets[:, None])[:, 0]  # (N,)
    which = (labels != IGNORE).nonzero()[:, 0]  # the batch row of each trained position
    return torch.zeros(labels.shape[0], dtype=logp.dtype, device=logp.device).index_add(0, which, logp)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO loss (Rafailov et al. 2023, eq. 7; conservative DPO's label smoothing as in TRL's "sigmoid" loss).

    -log sigmoid(beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)))), each log p summed over the
    answer's tokens. Returns the (B,) losses; the caller takes the mean.
    """
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin) * (1 - label_smoothing) - F.logsigmoid(-margin) * label_smoothing


def teacher_topk(logits: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k largest logits and their token ids at each trained position: ((N, k) float32, (N, k) long)."""
    values, ids = trained_rows(logits, labels)[0].topk(k, dim=-1)
    return values, ids


def kd_loss_sum(student_logits: torch.Tensor, labels: torch.Tensor, teacher_values: torch.Tensor,
                teacher_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Sum over trained positions of KL(p_teacher || p_student) restricted to the teacher's top-k tokens, times T^2.

    p_teacher = softmax(top-k teacher logits / T), renormalised over the k kept tokens (the rest of its mass is
    not stored); log p_student = log_softmax(student logits / T) over the whole vocabulary, read at those k ids.
    Hinton et al. 2015 ("Distilling the Knowledge in a Neural Network") scale by T^2 so gradients keep their size.
    """
    s = trained_rows(student_logits, labels)[0] / temperature  # (N, V)
    log_q = torch.gather(s.log_softmax(-1), 1, teacher_ids)  # (N, k)
    log_p = (teacher_values / temperature).log_softmax(-1)  # (N, k)
    return (log_p.exp() * (log_p - log_q)).sum() * temperature**2
