"""Quantization: ggml codecs (ggml_quants decode, quantize encode) and the GGUF runtime swaps, importance matrices,
weight-only int8/int4 and FP8 (torch._scaled_mm) swaps over the built model, and the codes of foreign quantized
formats (GPTQ, AWQ, compressed-tensors FP8, Meta's int4 and FP8 releases)."""

from .ggml import GGMLEmbedding, GGMLLinear, GGMLWeight, swap_ggml

__all__ = ["GGMLEmbedding", "GGMLLinear", "GGMLWeight", "swap_ggml"]
