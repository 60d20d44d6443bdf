"""Results of sibling projections computed together, handed out one by one: the protocol behind one native
call for wq/wk/wv or w1/w3 (`quant.ggml.SharedInput`, `native.dense.DenseGroup`).

The model calls each projection by its own name, in turn, on one input tensor. The first call computes every
member's product in one native call (one OpenMP fork/join and one Python round trip instead of one per
member) and keeps the others' results here, per thread, keyed by the input tensor object and its version
counter (inference tensors have none). A member gets a kept result only for that very tensor, unmodified;
any other input is computed afresh, so values never depend on the call order.
"""

from __future__ import annotations

import threading

import torch


class SiblingResults:
    def __init__(self) -> None:
        self._local = threading.local()

    @staticmethod
    def _version(x: torch.Tensor) -> int | None:
        return None if x.is_inference() else x._version

    def take(self, member: object, x: torch.Tensor) -> torch.Tensor | None:
        """The result kept for `member` on exactly this input, or None (then compute it)."""
        kept = getattr(self._local, "kept", None)
        if kept is None or kept[0] is not x or kept[1] != self._version(x) or member not in kept[2]:
            return None
        out = kept[2].pop(member)
        if not kept[2]:
            self._local.kept = None
        return out

    def keep(self, x: torch.Tensor, results: dict) -> None:
        """Hold the other members' results for input x (replacing whatever was held)."""
        self._local.kept = (x, self._version(x), results) if results else None

    def clear(self) -> None:
        self._local.kept = None
