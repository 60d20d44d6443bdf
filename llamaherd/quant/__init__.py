"""Weight-only quantization as module swaps applied after the model is built (the model file knows none)."""

from .ggml import GGMLEmbedding, GGMLLinear, GGMLWeight, swap_ggml

# The names the design guide uses for the GGUF runtime swaps.
QuantizedLinear = GGMLLinear
QuantizedEmbedding = GGMLEmbedding

__all__ = ["GGMLEmbedding", "GGMLLinear", "GGMLWeight", "QuantizedEmbedding", "QuantizedLinear", "swap_ggml"]
