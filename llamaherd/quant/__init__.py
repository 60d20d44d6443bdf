"""ggml quantization: the codecs (ggml_quants decode, quantize encode) and the GGUF runtime swaps over the built model."""

from .ggml import GGMLEmbedding, GGMLLinear, GGMLWeight, swap_ggml

__all__ = ["GGMLEmbedding", "GGMLLinear", "GGMLWeight", "swap_ggml"]
