"""Helpers for checkpoint tests: reference models (Meta's llama-models, HF transformers) and folders they save.

Everything here is written independently of llamaherd's converters, so the tests compare our code against
files laid out by the references' own rules (Meta: params.json + torch.save'd state dict; HF: save_pretrained).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llamaherd.config import ModelConfig

# fairscale layer kinds in llama-models llama3/model.py, restated here for hand-made shards (not imported
# from llamaherd, so the test does not check our splitter against itself).
COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3")
ROW_PARALLEL = ("wo", "w2")


def meta_params(c: ModelConfig) -> dict:
    """params.json as Meta writes it (llama-models ModelArgs fields)."""
    return {
        "dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
        "vocab_size": c.vocab_size, "multiple_of": c.multiple_of, "ffn_dim_multiplier": c.ffn_dim_multiplier,
        "norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "use_scaled_rope": c.rope_scaling is not None,
    }


def meta_reference(c: ModelConfig, seed: int = 0, std: float = 0.2):
    """Meta's reference Transformer (needs the meta_parallel fixture) with random weights; tied when c ties."""
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer

    args = ModelArgs(**meta_params(c), max_seq_len=c.max_seq_len, max_batch_size=2)
    torch.manual_seed(seed)
    ref = Transformer(args)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            # fairscale layers here start from torch.empty (init_method=lambda x: x): every weight is set.
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
        if c.tie_embeddings:
            ref.output.weight.copy_(ref.tok_embeddings.weight)  # as Meta's Llama 3.2 1B/3B files carry it
    return ref.eval()


def save_meta_folder(state_dict: dict, params: dict, dst: Path, shards: int = 1, embedding_dim: int = 0) -> Path:
    """Write a Meta folder the way Meta ships one; with shards > 1 split as fairscale's layers hold weights."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "params.json").write_text(json.dumps(params))
    parts: list[dict] = [{} for _ in range(shards)]
    for name, t in state_dict.items():
        leaf = name.split(".")[-2]
        if name == "tok_embeddings.weight":
            axis = embedding_dim
        elif name == "output.weight" or leaf in COLUMN_PARALLEL:
            axis = 0
        elif leaf in ROW_PARALLEL:
            axis = 1
        else:
            axis = None
        for i in range(shards):
            parts[i][name] = t.clone() if axis is None else t.chunk(shards, dim=axis)[i].clone()
    for i, part in enumerate(parts):
        torch.save(part, dst / f"consolidated.{i:02d}.pth")
    return dst


def hf_llama_config(c: ModelConfig):
    """transformers LlamaConfig for the same architecture."""
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        s = c.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": c.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position}
    return LlamaConfig(
        hidden_size=c.dim, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, intermediate_size=c.hidden_dim, vocab_size=c.vocab_size,
        rms_norm_eps=c.norm_eps, max_position_embeddings=c.max_seq_len, rope_parameters=rope,
        tie_word_embeddings=c.tie_embeddings, head_dim=c.head_dim,
    )


def hf_reference(c: ModelConfig, seed: int = 0, std: float = 0.2):
    """transformers LlamaForCausalLM with random weights (built from a config; nothing downloaded)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    ref = LlamaForCausalLM(hf_llama_config(c)).float()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return ref.eval()


# Meta's Llama 4 expert stacks and the keys its quantized releases' scales files give them
# (llama-models llama4/quantization/loader.py: f"layers.{i}.feed_forward.experts.{w1|w3|w2}").
META_EXPERT_KEYS = {"moe_w_in_eD_F": "w1", "moe_w_swiglu_eD_F": "w3", "moe_w_out_eF_D": "w2"}


def meta_quantized_folders(tmp_path: Path, config: ModelConfig, shards: int, scales_file: str, quantize,
                           std: float = 0.2) -> tuple[Path, Path]:
    """(a Meta folder quantized rank by rank, a float folder holding what its codes stand for) of a random model.

    `quantize(name, tensor)` returns None to keep a tensor, else (codes, dequantised, scales key, scales); each
    rank's scales are saved as `scales_file.format(rank=...)` beside its consolidated.NN.pth.
    """
    import shutil

    from llamaherd.checkpoint import meta_pth
    from llamaherd.checkpoint.base import Checkpoint
    from tests.conftest import random_model

    src = meta_pth.write(Checkpoint(config=config, state_dict=random_model(config, seed=0, std=std).state_dict(),
                                    source=tmp_path), tmp_path / "bf", shards=shards)
    quantized, floats_dir = tmp_path / "quantized", tmp_path / "float"
    for d in (quantized, floats_dir):
        d.mkdir()
        shutil.copy(src / "params.json", d / "params.json")
    for rank in range(shards):
        sd = torch.load(src / f"consolidated.{rank:02d}.pth", weights_only=True)
        codes, floats, scales = dict(sd), dict(sd), {}
        for name, w in sd.items():
            done = quantize(name, w)
            if done is not None:
                codes[name], floats[name], key, scales[key] = done
        assert scales, "the config must have a quantized tensor"
        torch.save(codes, quantized / f"consolidated.{rank:02d}.pth")
        torch.save(floats, floats_dir / f"consolidated.{rank:02d}.pth")
        torch.save(scales, quantized / scales_file.format(rank=rank))
    return quantized, floats_dir


def stepwise_logits(model, tokens: list[int], config: ModelConfig, prompt: int = 4) -> torch.Tensor:
    """The logits of a prefill of the first `prompt` tokens, then one decode step per remaining token: the rows a
    full forward gives from position `prompt - 1` on, computed through the KV cache in the model's dtype."""
    from llamaherd.engine.generate import decode_one, prefill
    from llamaherd.model.cache import KVCache

    dtype = next(p.dtype for p in model.net.parameters() if p.is_floating_point())
    cache = KVCache.for_model(config, 1, len(tokens), dtype=dtype)
    with torch.inference_mode():
        steps = [prefill(model.net, torch.tensor([tokens[:prompt]]), cache)[0]]
        steps += [decode_one(model.net, torch.tensor([t]), cache)[0] for t in tokens[prompt:]]
    return torch.stack(steps).float()
