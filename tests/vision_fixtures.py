"""Helpers for the vision tests: tiny Llama 3.2 Vision references (transformers, Meta) with every weight redrawn.

Meta and transformers initialise the cross-attention gates to zero, so a freshly built reference ignores the
image; `redraw` sets every parameter, gates included, so that a parity test can fail.
"""

from __future__ import annotations

import importlib
import site
import sys
from pathlib import Path

import torch


def redraw(model: torch.nn.Module, seed: int = 0, std: float = 0.2, vision_std: float | None = None) -> torch.nn.Module:
    """Every parameter random: norm scales near 1, gates well away from 0, the rest N(0, std) (N(0, vision_std)
    in the vision encoder when given: Meta's 1280-wide encoder needs smaller weights to stay in range)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            is_norm = any(k in name for k in ("norm", "ln_", "layernorm"))
            if "gate" in leaf or name.endswith("gate"):
                p.copy_(torch.empty(p.shape).uniform_(0.4, 1.2, generator=g))
            elif is_norm and leaf == "weight":
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif is_norm and leaf == "bias":
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                scale = vision_std if vision_std is not None and "vision" in name else std
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


# -- transformers -------------------------------------------------------------------------------------

# A tiny MllamaConfig: 4 text layers + 2 cross-attention layers where Meta's schedule puts them (before text
# layers 1 and 3 -> HF indices 1 and 4), a 28-pixel tile of 2x2 patches (5 tokens, padded to 8), 5 local and 2
# global vision layers with intermediate layers 1 and 3.
VOCAB = 300


def hf_config_dict() -> dict:
    return {
        "model_type": "mllama",
        "image_token_index": VOCAB,
        "text_config": {
            "vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 6, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 96, "cross_attention_layers": [1, 4],
            "rms_norm_eps": 1e-5, "max_position_embeddings": 16384,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
        },
        "vision_config": {
            "hidden_size": 32, "num_hidden_layers": 5, "num_global_layers": 2, "attention_heads": 4,
            "intermediate_size": 128, "vision_output_dim": 32 * 3, "image_size": 28, "patch_size": 14,
            "max_num_tiles": 4, "intermediate_layers_indices": [1, 3], "norm_eps": 1e-5,
        },
    }


def hf_reference(seed: int = 0):
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    d = hf_config_dict()
    cfg = MllamaConfig(vision_config=d["vision_config"], text_config=d["text_config"],
                       image_token_index=d["image_token_index"])
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return with_meta_intermediate_layers(redraw(MllamaForConditionalGeneration(cfg), seed))


def with_meta_intermediate_layers(ref):
    """Make transformers' vision encoder read the intermediate features Meta's does: the input of each listed
    layer (llama-models `ImageTransformer.forward` appends x before running block idx; transformers 4 did the
    same). The installed transformers 5 appends hidden states after each layer again, the regression its PR
    #40083 once fixed; probed here, never assumed, and undone by reading one layer earlier. Only the module's
    attribute changes: the config (and what save_pretrained writes) keeps the released indices."""
    vision = ref.model.vision_model
    x = torch.randn(1, 8, vision.config.hidden_size)
    with torch.no_grad():
        states = vision.transformer(x).hidden_states
    if not torch.equal(states[0], x):  # states[i] is layer i's output
        assert min(vision.intermediate_layers_indices) > 0
        vision.intermediate_layers_indices = [i - 1 for i in vision.intermediate_layers_indices]
    return ref


def hf_inputs(tokens: list[int], aspect_ratios: list[tuple[int, int]], tiles: torch.Tensor | None) -> dict:
    """The tensors transformers' processor would hand the model, built with its own helpers."""
    from transformers.models.mllama.image_processing_pil_mllama import (
        build_aspect_ratio_mask_np as build_aspect_ratio_mask,
        convert_aspect_ratios_to_ids_np as convert_aspect_ratios_to_ids,
    )
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    ids = torch.tensor([tokens])
    if tiles is None:
        return {"input_ids": ids}
    spans = get_cross_attention_token_mask(tokens, VOCAB)
    xmask = convert_sparse_cross_attention_mask_to_dense(
        [spans], [[r * c for r, c in aspect_ratios]], max_num_tiles=4, length=len(tokens)
    )
    return {
        "input_ids": ids,
        "pixel_values": tiles,
        "aspect_ratio_ids": torch.as_tensor(convert_aspect_ratios_to_ids([aspect_ratios], 4)),
        "aspect_ratio_mask": torch.as_tensor(build_aspect_ratio_mask([aspect_ratios], 4)),
        "cross_attention_mask": torch.as_tensor(xmask),
    }


def random_tiles(aspect_ratios: list[tuple[int, int]], size: int = 28, seed: int = 1) -> torch.Tensor:
    """(1, images, 4, 3, size, size) normalised-pixel-like tiles, zeros beyond each image's grid."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(1, len(aspect_ratios), 4, 3, size, size)
    for i, (r, c) in enumerate(aspect_ratios):
        out[0, i, : r * c] = torch.randn(r * c, 3, size, size, generator=g)
    return out


# -- Meta's reference ---------------------------------------------------------------------------------

VISION_EXTRA = Path(__file__).resolve().parents[1] / ".venv" / "vision-extra"


def import_torchvision():
    """Import torchvision from `.venv/vision-extra` (kept off the environment's path: see the Makefile).

    The registries hold only CUDA builds of torchvision; on CPU torch its fake-operator registrations fail
    ("operator torchvision::nms does not exist"). Its pure-Python transforms, all Meta's image code uses, work
    once those registrations are skipped, which this helper does for the duration of the import.
    """
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    if not VISION_EXTRA.is_dir():
        import pytest

        pytest.skip("torchvision not installed in .venv/vision-extra (make install-test does it)")
    site.addsitedir(str(VISION_EXTRA))
    real = torch.library.register_fake

    def skip_missing(call, *args, **kwargs):
        try:
            return call(*args, **kwargs)
        except RuntimeError as exc:
            if "does not exist" not in str(exc):
                raise
            return None

    def tolerant(op, func=None, **kwargs):
        if func is not None:
            return skip_missing(real, op, func, **kwargs)

        def decorate(fn):  # `@register_fake("torchvision::nms")` fails when applied
            skip_missing(real, op, fn, **kwargs)
            return fn

        return decorate

    torch.library.register_fake = tolerant
    try:
        return importlib.import_module("torchvision")
    finally:
        torch.library.register_fake = real


def meta_params(vocab: int = VOCAB) -> dict:
    """A tiny Llama 3.2 Vision params.json: Meta's real encoder (its sizes are constants) on 28-pixel tiles, and a
    4-layer text decoder with 2 cross-attention layers."""
    return {
        "dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "vocab_size": vocab, "multiple_of": 32,
        "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True,
        "vision_chunk_size": 28, "vision_max_num_chunks": 4, "vision_num_cross_attention_layers": 2,
    }


def meta_reference(seed: int = 0):
    """llama-models' CrossAttentionTransformer (needs the meta_parallel fixture), every weight redrawn."""
    import_torchvision()
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.multimodal.model import CrossAttentionTransformer

    args = ModelArgs(**meta_params(), max_seq_len=64, max_batch_size=1)
    torch.manual_seed(seed)
    ref = CrossAttentionTransformer(args)
    redraw(ref, seed, std=0.2, vision_std=0.02)
    ref.setup_cache(1, torch.device("cpu"), torch.float32)
    return ref
