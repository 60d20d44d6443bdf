"""Tensor parallelism over torch.distributed: the cut of the built model (`tp.py`), each rank loading only its
slice (`load.py`)."""

from .load import load_parallel
from .tp import ParallelError, TensorParallel, apply_tensor_parallel

__all__ = ["ParallelError", "TensorParallel", "apply_tensor_parallel", "load_parallel"]
