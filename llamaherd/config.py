"""Model configuration: frozen dataclasses with derived fields and validation (torch-free)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import LlamaherdError


class ConfigError(LlamaherdError, ValueError):
    """A configuration is inconsistent or names something unknown."""


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's SwiGLU width rule (llama-models `llama3/model.py::FeedForward`).

    Start from 4*dim, take two thirds, apply the optional multiplier, round up to `multiple_of`.
    """
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def moe_hidden_dim(dim: int, ffn_exp: float, multiple_of: int, ffn_dim_multiplier: float | None,
                   capacity_factor: float = 1.0, auto_scale: bool = True) -> int:
    """Width of each routed (and the shared) expert, Meta's rule (llama-models `llama4/moe.py::MoE.__init__`).

    ffn_exp * dim, two thirds of it, times ffn_dim_multiplier, divided by (capacity_factor + 1) when
    auto-scaled so the active parameters equal a dense layer's, rounded up to `multiple_of`.
    """
    hidden = int(ffn_exp * dim)
    hidden = int(2 * hidden / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    if auto_scale:
        hidden = int(hidden / (capacity_factor + 1))
    return hidden + (-hidden % multiple_of)


@dataclass(frozen=True)
class RopeScaling:
    """Rotary-frequency scaling.

    kind "llama3": Llama 3.1's piecewise frequency scaling (also Llama 4 Scout's, with other factors);
    kind "linear": positions divided by `factor` (position interpolation, Chen et al. 2023).
    """

    kind: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ("llama3", "linear"):
            raise ConfigError(f"unknown rope scaling kind {self.kind!r}; known: 'llama3', 'linear'")
        if self.factor <= 0:
            raise ConfigError(f"rope scaling factor must be positive, got {self.factor}")


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts feed-forward (Llama 4): routed experts plus one shared expert."""

    num_experts: int
    top_k: int = 1
    hidden_dim: int = 0  # width of each routed expert (and of the shared expert)
    interleave_step: int = 1  # every `interleave_step`-th layer is MoE, the others dense

    def is_moe_layer(self, layer: int) -> bool:
        # llama-models llama4/model.py: (layer_id + 1) % interleave_moe_layer_step == 0
        return (layer + 1) % self.interleave_step == 0


@dataclass(frozen=True)
class VisionConfig:
    """Llama 3.2 Vision's tiled ViT encoder and the cross-attention layers that read it.

    Defaults are the released encoder (llama-models `llama3/multimodal/model.py::CrossAttentionTransformerVision`
    hard-codes ViT-H/14: width 1280, 32 local + 8 global layers, 16 heads, intermediate layers 3,7,15,23,30,
    at most 4 tiles); `image_size` is one tile's side (Meta's `vision_chunk_size`, 560 in the releases).
    """

    image_size: int = 560
    patch_size: int = 14
    max_num_tiles: int = 4
    width: int = 1280
    n_layers: int = 32
    n_global_layers: int = 8
    n_heads: int = 16
    mlp_ratio: float = 4.0
    intermediate_layers: tuple[int, ...] = (3, 7, 15, 23, 30)
    n_cross_attention_layers: int = 8
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        object.__setattr__(self, "intermediate_layers", tuple(self.intermediate_layers))
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.n_heads:
            raise ConfigError(f"vision width {self.width} is not divisible by n_heads {self.n_heads}")
        if any(not 0 <= i < self.n_layers for i in self.intermediate_layers):
            raise ConfigError(f"vision intermediate_layers {self.intermediate_layers} outside 0..{self.n_layers - 1}")

    @property
    def tokens_per_tile(self) -> int:
        """Patches of one tile plus its class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def output_dim(self) -> int:
        """Width of the encoder output: the final layer concatenated with each intermediate layer."""
        return self.width * (len(self.intermediate_layers) + 1)


@dataclass(frozen=True)
class Llama4VisionConfig:
    """Llama 4's vision encoder (early fusion): a ViT over 336-pixel tiles with 2-D rotary attention, pixel shuffle
    and an MLP adapter; its output replaces the embeddings of the prompt's <|patch|> tokens.

    Defaults are Scout's and Maverick's params.json `vision_args` (llama-models `llama4/args.py::VisionArgs`).
    """

    image_size: int = 336
    patch_size: int = 14
    width: int = 1408
    n_layers: int = 34
    n_heads: int = 16
    mlp_ratio: float = 4.0
    output_dim: int = 4096
    pixel_shuffle_ratio: float = 0.5
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        grid = self.image_size // self.patch_size
        if self.image_size % self.patch_size or (grid * self.pixel_shuffle_ratio) % 1:
            raise ConfigError(f"a {self.image_size}-pixel tile of {self.patch_size}-pixel patches does not shuffle "
                              f"by {self.pixel_shuffle_ratio}")
        if (self.width // self.n_heads) % 4:
            raise ConfigError("the 2-D rotary embedding needs a head width divisible by 4")

    @property
    def tokens_per_tile(self) -> int:
        """<|patch|> tokens one tile becomes after pixel shuffle (144 for 336 / 14 / 0.5)."""
        return int((self.image_size // self.patch_size) * self.pixel_shuffle_ratio) ** 2


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of one decoder. Batch size, device and cache length are runtime choices, not here.

    `arch` picks the model class (see `llamaherd.model.registry`). Fields after the common block are used
    only by the families named in their comment and keep neutral defaults otherwise.
    """

    arch: str = "llama"
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: multi-head attention (n_kv_heads = n_heads)
    vocab_size: int = 32000
    hidden_dim: int | None = None  # None: derived from multiple_of / ffn_dim_multiplier
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    head_dim: int | None = None  # None: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048  # trained context length: the largest position a prompt may reach
    tie_embeddings: bool = False

    # Llama 4
    moe: MoEConfig | None = None
    attention_chunk_size: int | None = None  # chunked local attention on RoPE layers
    nope_layer_interval: int | None = None  # every n-th layer has no positional encoding
    use_qk_norm: bool = False
    attn_temperature_tuning: bool = False
    floor_scale: float = 8192.0
    attn_scale: float = 0.1

    # Gemma 3
    sliding_window: int | None = None
    sliding_window_pattern: int | None = None  # every n-th layer is global, the rest local
    rope_local_theta: float | None = None
    query_pre_attn_scalar: float | None = None
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None

    # Vision: Llama 3.2 Vision's encoder and cross-attention layers (arch "mllama"), or Llama 4's early-fusion
    # encoder (arch "llama4"; None there means the text decoder alone)
    vision: VisionConfig | Llama4VisionConfig | None = None

    def __post_init__(self) -> None:
        # Derived fields are stored once so every consumer sees the same numbers.
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}; set head_dim")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.hidden_dim is None:
            object.__setattr__(
                self, "hidden_dim", ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
            )
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    # -- derived views -------------------------------------------------------------------------
    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (derived fields such as hidden_dim keep their values)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields {unknown}; known: {sorted(known)}")
        data = dict(data)
        if isinstance(data.get("rope_scaling"), dict):
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        if isinstance(data.get("moe"), dict):
            data["moe"] = MoEConfig(**data["moe"])
        if isinstance(data.get("vision"), dict):
            kind = Llama4VisionConfig if data.get("arch") == "llama4" else VisionConfig
            data["vision"] = kind(**data["vision"])
        return cls(**data)


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling defaults a checkpoint ships (HF generation_config.json), plus its end tokens."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    bos_token_id: int | None = None
