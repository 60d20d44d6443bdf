"""Meta's checkpoint format: params.json + consolidated.NN.pth (+ tokenizer.model), read and written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, ModelConfig, RopeScaling, ffn_hidden_dim
from ..errors import CheckpointError
from ..model import build
from ..quant import fp8, meta_int4
from . import llama4, mllama
from .base import Checkpoint, attach_tokenizer
from .pth import TOKENIZER_FILES, load_pth, shard_files
from .transforms import META_IGNORED, embedding_shard_dim, merge_shards, shard_dim, split_shards


# -- params.json <-> ModelConfig -----------------------------------------------------------------


def _default_max_seq_len(params: dict[str, Any]) -> int:
    """Trained context when params.json omits it (Meta's files do): from the model cards.

    Llama 3.1+ (scaled RoPE): 131072; Llama 3 (theta 5e5): 8192; Llama 2 (theta 1e4): 4096.
    """
    if params.get("use_scaled_rope"):
        return 131072
    if float(params.get("rope_theta", 10000.0)) >= 500000.0:
        return 8192
    return 4096


def config_from_params(params: dict[str, Any], path: Path, vocab_from_weights: int | None = None) -> ModelConfig:
    """ModelConfig from a Meta params.json dict (llama-models `llama3/args.py::ModelArgs` fields)."""
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise CheckpointError(path, f"params.json lacks {key!r}; a Meta params.json states dim, n_layers, n_heads")
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                "norm_eps", "rope_theta", "vision_chunk_size"):
        v = params.get(key)  # a list here would be repeated, not multiplied (found by bench/fuzz_loaders.py)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise CheckpointError(path, f"params.json field {key!r} is {v!r}; it must be a number")
    if params.get("vision_chunk_size", -1) > 0:  # Llama 3.2 Vision (llama-models llama3/args.py)
        raise CheckpointError(path, "params.json describes a Llama 3.2 Vision model; only text models are supported")
    vocab = int(params.get("vocab_size", -1))
    if vocab <= 0:  # Llama 2's params.json says -1: the vocabulary comes from the tokenizer / weights
        if vocab_from_weights is None:
            raise CheckpointError(path, "params.json has vocab_size -1 and no tok_embeddings to read it from")
        vocab = vocab_from_weights
    scaling = None
    if params.get("use_scaled_rope"):
        # Meta's reference hard-codes factor 8 in apply_scaling (llama-models llama3/model.py), and Llama 3.2
        # 1B/3B params.json do not state a factor although HF's configs say 32 (llama-models issues #166,
        # #241). Running Meta's files as Meta's code does means 8 unless the file itself states a factor.
        scaling = RopeScaling(kind="llama3", factor=float(params.get("rope_scaling_factor", 8.0)))
    try:
        return ModelConfig(
            arch="llama",
            dim=int(params["dim"]),
            n_layers=int(params["n_layers"]),
            n_heads=int(params["n_heads"]),
            n_kv_heads=params.get("n_kv_heads"),
            vocab_size=vocab,
            multiple_of=int(params.get("multiple_of", 256)),
            ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_seq_len=int(params.get("max_seq_len", _default_max_seq_len(params))),
        )
    except ConfigError as exc:
        raise CheckpointError(path, f"params.json is inconsistent: {exc}") from None


def _ffn_params(c: ModelConfig) -> tuple[int, float | None]:
    """multiple_of / ffn_dim_multiplier that make Meta's FeedForward rule yield c.hidden_dim."""
    if ffn_hidden_dim(c.dim, c.multiple_of, c.ffn_dim_multiplier) == c.hidden_dim:
        return c.multiple_of, c.ffn_dim_multiplier
    # A config read from HF states only intermediate_size. Rounding up to multiple_of = hidden_dim after
    # scaling 2/3*4*dim by hidden/base lands exactly on hidden_dim (int() may fall one short; the round-up fixes it).
    base = int(2 * (4 * c.dim) / 3)
    mult = c.hidden_dim / base if base > c.hidden_dim else None
    assert ffn_hidden_dim(c.dim, c.hidden_dim, mult) == c.hidden_dim
    return c.hidden_dim, mult


def params_from_config(c: ModelConfig) -> dict[str, Any]:
    """A Meta params.json dict that Meta's ModelArgs reads back into the same architecture."""
    if c.arch != "llama":
        raise CheckpointError(None, f"Meta params.json output supports arch 'llama', not {c.arch!r}")
    if c.head_dim * c.n_heads != c.dim:
        raise CheckpointError(None, f"Meta's format derives head_dim = dim / n_heads; head_dim {c.head_dim} differs")
    multiple_of, mult = _ffn_params(c)
    params: dict[str, Any] = {
        "dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
        "vocab_size": c.vocab_size, "multiple_of": multiple_of, "ffn_dim_multiplier": mult,
        "norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "use_scaled_rope": c.rope_scaling is not None,
        "max_seq_len": c.max_seq_len,
    }
    s = c.rope_scaling
    if s is not None:
        if (s.kind, s.low_freq_factor, s.high_freq_factor, s.original_max_position) != ("llama3", 1.0, 4.0, 8192):
            raise CheckpointError(None, f"Meta's format can only express Llama 3.1 rope scaling, not {s}")
        if s.factor != 8.0:
            params["rope_scaling_factor"] = s.factor  # ours to read back; Meta's reference would use 8
    return params


# -- reading -------------------------------------------------------------------------------------


def read(path: str | Path) -> Checkpoint:
    """Read a Meta checkpoint folder; shards are merged, a tied output (equal to tok_embeddings) dropped."""
    path = Path(path)
    pfile = path / "params.json"
    if not pfile.exists():
        raise CheckpointError(
            path, "params.json is missing; a Meta checkpoint folder needs it beside consolidated.*.pth"
        )
    try:
        params = json.loads(pfile.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(pfile, f"is not valid JSON ({exc}); restore the file from the release") from None
    if not isinstance(params, dict):
        raise CheckpointError(pfile, "must hold a JSON object of model parameters")
    if params.get("vision_chunk_size", -1) > 0:  # Llama 3.2 Vision (llama-models llama3/args.py)
        return mllama.read_meta(path, params)
    files = shard_files(path)
    shards = [load_pth(f) for f in files]
    if "moe_args" in params:
        return _read_llama4(path, params, files, shards)
    if "dim" not in params:
        raise CheckpointError(pfile, "params.json lacks 'dim'; a Meta params.json states dim, n_layers, n_heads")
    if "quantization_args" in params or "lora_args" in params or any(k.endswith(".scales") for k in shards[0]):
        return _read_int4(path, params, files, shards)
    sd = merge_shards(shards, int(params["dim"]), files)
    for name in META_IGNORED:
        sd.pop(name, None)
    emb = sd.get("tok_embeddings.weight")
    config = config_from_params(params, pfile, vocab_from_weights=None if emb is None else emb.shape[0])
    n_heads = config.n_heads
    if len(files) > 1 and (n_heads % len(files) or config.n_kv_heads % len(files)):
        raise CheckpointError(
            path, f"{len(files)} shards cannot split {n_heads} query / {config.n_kv_heads} key-value heads evenly; "
            "the shard count does not belong to this params.json",
        )
    out = sd.get("output.weight")
    if emb is not None and out is not None and out.shape == emb.shape and torch.equal(out, emb):
        # Llama 3.2 1B/3B: Meta's files carry output.weight as a copy of the embedding; the model ties them.
        del sd["output.weight"]
        config = config.replace(tie_embeddings=True)
    return Checkpoint(
        config=config, state_dict=sd, source=path, tokenizer=attach_tokenizer(path, TOKENIZER_FILES),
        metadata={"format": "meta", "shards": len(files), "params": params},
    )


def read_rank(path: str | Path, rank: int, world: int) -> Checkpoint | None:
    """Rank `rank`'s model-parallel piece of a Meta folder written as `world` shards: consolidated.{rank}.pth
    alone, memory-mapped, in canonical names and nothing merged (what tensor parallelism reads); None when the
    folder holds another number of shards, or is Llama 3.2 Vision.

    The pieces keep fairscale's cut (checkpoint/transforms.py). Metadata says what one shard cannot decide
    alone: "embedding_dim", the axis tok_embeddings is cut on (Llama 2's ParallelEmbedding cuts the width), and
    "output_equals_embedding", whether this piece's output.weight equals its embedding rows (Meta's tied
    Llama 3.2 1B/3B), which every rank must find for the model to be tied.
    """
    path = Path(path)
    pfile = path / "params.json"
    files = shard_files(path)
    if len(files) != world or not pfile.exists():
        return None
    try:
        params = json.loads(pfile.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(pfile, f"is not valid JSON ({exc}); restore the file from the release") from None
    if not isinstance(params, dict) or params.get("vision_chunk_size", -1) > 0 or "quantization_args" in params:
        return None  # Llama 3.2's int4 releases are single files, read whole by `read`
    sd = load_pth(files[rank])
    for name in META_IGNORED:
        sd.pop(name, None)
    emb = sd.get("tok_embeddings.weight")
    if "moe_args" in params:
        config = llama4.config_from_params(params, source=str(pfile))
        sd = llama4.normalize_meta(sd, config)
        if (path / f"int4_scales_{rank}.pt").exists():  # this rank's own int4 experts, as `_read_llama4` reads them
            sd = _dequantize_int4(path, rank, sd, config)
        axis = 0
    else:
        if emb is None:
            raise CheckpointError(files[rank], "holds no tok_embeddings.weight; get the complete folder")
        axis = embedding_shard_dim(tuple(emb.shape), world, int(params["dim"]), files[rank])
        config = config_from_params(params, pfile, vocab_from_weights=emb.shape[0] * (world if axis == 0 else 1))
    out = sd.get("output.weight")
    same = emb is not None and out is not None and axis == 0 and out.shape == emb.shape and torch.equal(out, emb)
    return Checkpoint(
        config=config, state_dict=sd, source=path, tokenizer=attach_tokenizer(path, TOKENIZER_FILES),
        metadata={"format": "meta", "shards": world, "params": params, "rank": rank, "embedding_dim": axis,
                  "output_equals_embedding": same},
    )


def _read_llama4(path: Path, params: dict[str, Any], files: list[Path], shards: list[dict]) -> Checkpoint:
    """Llama 4 (params.json with moe_args): names and layouts from checkpoint/llama4.py, shards merged by Llama 4's rules."""
    config = llama4.config_from_params(params, source=str(path / "params.json"))
    n = len(files)
    if n > 1 and (config.n_heads % n or config.n_kv_heads % n or config.moe.hidden_dim % n):
        raise CheckpointError(
            path, f"{n} shards cannot split {config.n_heads} query / {config.n_kv_heads} key-value heads and expert "
            f"width {config.moe.hidden_dim} evenly; the shard count does not belong to this params.json",
        )
    # Old spellings and flattened (E*D, F/n) expert matrices are normalised per shard: the split axis of the
    # canonical (E, D, F) layout is only well defined once each piece has its 3-D shape.
    shards = [llama4.normalize_meta(s, config) for s in shards]
    fp8_experts = _fp8_expert_codes(path, shards)  # as stored, for `quantized.keep_fp8` (torch._scaled_mm)
    shards = [_dequantize_experts(path, i, s, config) for i, s in enumerate(shards)]  # FP8 / int4 releases: per rank
    sd = merge_shards(shards, config.dim, files, arch="llama4")
    _check_llama4_shapes(sd, config, files)
    out, emb = sd.get("output.weight"), sd.get("tok_embeddings.weight")
    same = out is not None and emb is not None and out.shape == emb.shape and torch.equal(out, emb)
    if config.tie_embeddings or same:
        sd.pop("output.weight", None)
        config = config.replace(tie_embeddings=True)
    return Checkpoint(
        config=config, state_dict=sd, source=path, tokenizer=attach_tokenizer(path, TOKENIZER_FILES),
        metadata={"format": "meta", "shards": n, "params": params,
                  **({"fp8_experts": fp8_experts} if fp8_experts else {})},
    )


def _fp8_expert_codes(path: Path, shards: list[dict]) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """{expert stack name: [(codes, scales) of each rank]} of Meta's FP8 release; {} for any other folder."""
    files = [path / f"fp8_scales_{rank}.pt" for rank in range(len(shards))]
    if not all(f.exists() for f in files):
        return {}
    per_rank = [fp8.meta_codes(shard, load_pth(f)) for shard, f in zip(shards, files)]
    names = set(per_rank[0]).intersection(*per_rank[1:])
    return {name: [codes[name] for codes in per_rank] for name in sorted(names)}


def _dequantize_experts(path: Path, rank: int, shard: dict[str, torch.Tensor],
                        config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rank `rank`'s experts dequantised with its int4_scales_{rank}.pt or fp8_scales_{rank}.pt, when present."""
    if (path / f"int4_scales_{rank}.pt").exists():
        return _dequantize_int4(path, rank, shard, config)
    return _dequantize_fp8(path, rank, shard)


def _dequantize_int4(path: Path, rank: int, shard: dict[str, torch.Tensor],
                     config: ModelConfig) -> dict[str, torch.Tensor]:
    """Meta's int4_mixed Llama 4 (llama-models llama4/scripts/quantize.py): dequantised to bf16 per shard at load,
    as the FP8 experts are on CPU (quant/meta_int4.py); our MoE multiplies float expert banks."""
    scales_file = path / f"int4_scales_{rank}.pt"
    scales = load_pth(scales_file)
    try:
        return meta_int4.dequantize_llama4_shard(shard, scales, config.moe.num_experts)
    except meta_int4.MetaInt4Error as exc:
        raise CheckpointError(scales_file, f"Meta int4 experts: {exc}; the folder is incomplete or mixed: "
                              "download it again") from None


def _dequantize_fp8(path: Path, rank: int, shard: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank `rank`'s experts dequantised with fp8_scales_{rank}.pt when Meta's FP8 release puts one there."""
    scales_file = path / f"fp8_scales_{rank}.pt"
    try:
        return fp8.dequantize_meta_shard(shard, load_pth(scales_file) if scales_file.exists() else None)
    except fp8.FP8Error as exc:
        raise CheckpointError(scales_file, f"Meta FP8 experts: {exc}; the folder is incomplete: "
                              "download it again") from None


def _read_int4(path: Path, params: dict[str, Any], files: list[Path], shards: list[dict]) -> Checkpoint:
    """Llama 3.2 1B/3B int4 (QLoRA / SpinQuant) releases: torchao int4 projections built as our int4 modules when
    the model is built, without a float copy; the int8 embedding and output dequantised (quant/meta_int4.py)."""
    pfile = path / "params.json"
    try:
        args = meta_int4.parse_args(params)
    except meta_int4.MetaInt4Error as exc:
        raise CheckpointError(pfile, f"{exc}") from None
    if args is None:
        raise CheckpointError(pfile, "the weights hold int8 codes with .scales but params.json has no "
                              "quantization_args (group_size); restore the release's params.json")
    if len(files) != 1:
        raise CheckpointError(path, f"{len(files)} int4 shards: Meta's int4 releases are one consolidated.00.pth; "
                              "get the release's folder")
    try:
        sd, packed = meta_int4.split({k: v for k, v in shards[0].items() if k not in META_IGNORED}, args)
    except meta_int4.MetaInt4Error as exc:
        raise CheckpointError(files[0], str(exc)) from None
    emb = sd.get("tok_embeddings.weight")
    config = config_from_params(params, pfile, vocab_from_weights=None if emb is None else emb.shape[0])
    out, vocab = sd.get("output.weight"), None
    if emb is not None and out is not None and out.shape == emb.shape and torch.equal(out, emb):
        del sd["output.weight"]  # Llama 3.2 1B/3B tie them; the int4 releases carry the same int8 rows twice
        config = config.replace(tie_embeddings=True)
        if "output.scales" in shards[0]:  # the projection runs on those int8 rows (the embedding keeps its floats)
            vocab = shards[0]["output.weight"], shards[0]["output.scales"]

    def prepare(net: torch.nn.Module) -> None:
        if vocab is not None:
            try:
                net.project = meta_int4.vocab_projection(*vocab)
            except meta_int4.MetaInt4Error as exc:
                raise CheckpointError(files[0], str(exc)) from None
        for name, tensors in packed.items():
            parent, _, leaf = name.rpartition(".")
            try:
                owner = net.get_submodule(parent)
                new = meta_int4.linear(tensors, args, name, rotate=args.spinquant and name.endswith("feed_forward.w2"))
            except AttributeError:
                raise CheckpointError(files[0], f"holds int4 {name!r}, which the params.json model lacks") from None
            except meta_int4.MetaInt4Error as exc:
                raise CheckpointError(files[0], str(exc)) from None
            old = getattr(owner, leaf, None)
            if not isinstance(old, torch.nn.Linear) or (old.out_features, old.in_features) != (new.out_features,
                                                                                             new.in_features):
                raise CheckpointError(files[0], f"{name} is ({new.out_features}, {new.in_features}) int4, which the "
                                      "params.json model does not have there; params.json does not belong to it")
            setattr(owner, leaf, new)

    return Checkpoint(
        config=config, state_dict=sd, source=path, tokenizer=attach_tokenizer(path, TOKENIZER_FILES), prepare=prepare,
        metadata={"format": "meta", "shards": 1, "params": params, "quantization": args.describe()},
    )


def _check_llama4_shapes(sd: dict[str, torch.Tensor], config: ModelConfig, files: list[Path]) -> None:
    """Merged tensors must have the shapes params.json implies; a mismatch on a split tensor means a shard count
    other than the one the checkpoint was written with (e.g. half of an 8-file folder)."""
    expected = {k: tuple(t.shape) for k, t in build(config, device="meta").state_dict().items()}
    n = len(files)
    for name, t in sd.items():
        want = expected.get(name)
        if want is None or tuple(t.shape) == want:
            continue  # unknown names are left to the strict load, which lists them all
        axis = shard_dim(name, "llama4")
        others_agree = axis is not None and len(want) == t.dim() and all(
            a == b for d, (a, b) in enumerate(zip(t.shape, want)) if d != axis)
        piece = t.shape[axis] // n if others_agree else 0
        if piece and want[axis] % piece == 0:
            written = want[axis] // piece
            raise CheckpointError(
                files[0], f"{name} is {t.shape[axis] // n} wide on dim {axis} in each of the "
                f"{n} shards, merging to {tuple(t.shape)}, but params.json implies {want}: the checkpoint was "
                f"written as {written} shards and this folder holds {n}; get the complete folder",
            )
        raise CheckpointError(
            files[0], f"{name} merges to shape {tuple(t.shape)} but params.json implies {want}; "
            "params.json does not belong to these weights",
        )


# -- writing -------------------------------------------------------------------------------------


def write(ckpt: Checkpoint, dst: str | Path, *, shards: int = 1, embedding_dim: int = 0, **_: Any) -> Path:
    """Write params.json + consolidated.NN.pth (split over `shards` files as fairscale would) + tokenizer.

    `embedding_dim` 0 splits tok_embeddings by vocabulary (Llama 3), 1 by embedding width (Llama 2);
    Llama 4 always splits it by vocabulary (its reference builds a VocabParallelEmbedding).
    """
    dst = Path(dst)
    c = ckpt.config
    if c.arch == "llama4":
        params = llama4.params_from_config(c)
        if shards >= 1 and c.moe.hidden_dim % shards:
            raise CheckpointError(
                dst, f"--shards {shards} must divide the expert width {c.moe.hidden_dim} (Meta's Experts divide it "
                "exactly per rank); pick a divisor",
            )
    else:
        params = params_from_config(c)
    if shards < 1 or c.n_heads % shards or c.n_kv_heads % shards:
        raise CheckpointError(
            dst, f"--shards {shards} must divide n_heads {c.n_heads} and n_kv_heads {c.n_kv_heads}; pick a divisor"
        )
    sd = dict(ckpt.state_dict)
    if c.tie_embeddings and "output.weight" not in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]  # Meta's format always carries output
    dst.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(split_shards(sd, shards, embedding_dim=embedding_dim, arch=c.arch)):
        torch.save(part, dst / f"consolidated.{i:02d}.pth")
    (dst / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    _copy_tokenizer(ckpt.source, dst)
    return dst


def _copy_tokenizer(src: Path, dst: Path) -> None:
    if not src.is_dir():  # a single-file source (GGUF) has no tokenizer file beside it to copy
        return
    for name in TOKENIZER_FILES:
        if (src / name).exists() and not (dst / name).exists():
            shutil.copyfile(src / name, dst / name)
            return
