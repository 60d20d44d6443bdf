"""Generation engine: sampling controls, the composed sampler, and the simple prefill/decode generation path."""

from .sampling import SamplingError, SamplingParams, Sampler, make_sampler, resolve_stop_ids

__all__ = ["SamplingError", "SamplingParams", "Sampler", "make_sampler", "resolve_stop_ids"]
