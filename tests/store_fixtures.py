"""Fixtures for the model store tests: a tiny Gemma 3 GGUF written with gguf-py, and a fake Ollama store."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from llamaherd.config import ModelConfig
from llamaherd.checkpoint.gemma3 import GGUF_NAMES, to_gguf

# A tiny Gemma 3 with what a GGUF cannot state set as llama.cpp assumes it (llama-model.cpp, LLM_ARCH_GEMMA3):
# every 6th layer global, local rope base 1e4, queries scaled by 1/sqrt(head_dim). Window 4, 256 tokens.
TINY_GEMMA = ModelConfig(
    arch="gemma3", dim=32, n_layers=6, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=48, vocab_size=256,
    norm_eps=1e-6, rope_theta=1e6, rope_local_theta=1e4, max_seq_len=128, tie_embeddings=True,
    sliding_window=4, sliding_window_pattern=6, query_pre_attn_scalar=16.0,
)


def random_gemma_state(config: ModelConfig = TINY_GEMMA, seed: int = 0) -> dict[str, torch.Tensor]:
    from llamaherd.model import build

    torch.manual_seed(seed)
    net = build(config)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.normal_(0.0, 0.3 if name.endswith("norm.weight") else 0.2)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def write_tiny_gemma_gguf(path: Path, state: dict[str, torch.Tensor], config: ModelConfig = TINY_GEMMA,
                          extra_specials: tuple[str, ...] = ()) -> Path:
    """A float32 Gemma 3 GGUF laid out as llama.cpp's converter writes one (names, +1 on norms, metadata);
    `extra_specials` adds control tokens (Gemma's "<start_of_turn>", "<end_of_turn>") after the first four."""
    import gguf

    inverse = {v: k for k, v in GGUF_NAMES.items()}
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_name("tiny gemma3 for tests")
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.dim)
    w.add_block_count(config.n_layers)
    w.add_feed_forward_length(config.hidden_dim)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    w.add_sliding_window(config.sliding_window)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", *extra_specials]
    tokens = specials + [f"t{i}" for i in range(config.vocab_size - len(specials))]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([gguf.TokenType.CONTROL] * len(specials) + [gguf.TokenType.NORMAL] * (len(tokens) - len(specials)))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)
    for name, t in state.items():
        layer = name.split(".")[1] if name.startswith("layers.") else None
        key = name.replace(f"layers.{layer}.", "layers.{i}.") if layer is not None else name
        gguf_name = inverse[key].replace("{i}", layer) if layer is not None else inverse[key]
        w.add_tensor(gguf_name, to_gguf(name, t).float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def add_to_ollama_store(root: Path, name: str, gguf_file: Path, *, digest: str | None = None) -> Path:
    """Put a GGUF into an Ollama-layout store as Ollama does: blob by sha256, manifest naming the layers."""
    data = gguf_file.read_bytes()
    hexdigest = hashlib.sha256(data).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / f"sha256-{hexdigest}").write_bytes(data)
    template = b"{{ .Prompt }}"
    template_hex = hashlib.sha256(template).hexdigest()
    (root / "blobs" / f"sha256-{template_hex}").write_bytes(template)
    base, _, tag = name.partition(":")
    parts = base.split("/")
    host, namespace, model = {1: ["registry.ollama.ai", "library"], 2: ["registry.ollama.ai"], 3: []}[len(parts)] + parts
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:" + "0" * 64, "size": 2},
        "layers": [
            {"mediaType": "application/vnd.ollama.image.template", "digest": f"sha256:{template_hex}", "size": len(template)},
            {"mediaType": "application/vnd.ollama.image.model", "digest": digest or f"sha256:{hexdigest}", "size": len(data)},
        ],
    }
    path = root / "manifests" / host / namespace / model / (tag or "latest")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return path
