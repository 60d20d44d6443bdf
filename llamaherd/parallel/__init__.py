"""Tensor parallelism over torch.distributed: the cut of the built model (`tp.py`) and its loading and launch."""

from .tp import ParallelError, TensorParallel, apply_tensor_parallel

__all__ = ["ParallelError", "TensorParallel", "apply_tensor_parallel"]
