"""Helpers for the tensor-parallel tests: tiny configurations every rank count (1, 2, 4) divides, and the runs
each rank makes (full forward, cached decode, greedy generation), run by module-level functions so that spawned
processes can pickle them."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from llamaherd.checkpoint.llama4 import config_from_params
from llamaherd.config import ModelConfig
from llamaherd.engine.generate import decode_one, generate_tokens, greedy_reference, prefill
from llamaherd.engine.sampling import SamplingParams, make_sampler
from llamaherd.model.cache import KVCache

# Meta's params.json of a tiny Llama 4 (test_llama4.py's, with heads every rank count divides).
LLAMA4_PARAMS = dict(
    dim=64, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=256, multiple_of=32, ffn_dim_multiplier=1.2,
    ffn_exp=4.0, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True, attention_chunk_size=16,
    nope_layer_interval=3, use_qk_norm=True, attn_temperature_tuning=True, floor_scale=4.0, attn_scale=0.1,
    moe_args=dict(num_experts=4, top_k=1, interleave_moe_layer_step=2), max_seq_len=128,
)
# Heads, widths and expert widths divisible by 4; vocabularies of 250 (not a multiple of 4 or 8) exercise the
# uneven last vocabulary block.
FAMILIES: dict[str, ModelConfig] = {
    # Llama 2: multi-head attention, separate output.
    "llama2": ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=256, multiple_of=32, rope_theta=10000.0,
                          max_seq_len=256),
    # Llama 3: grouped-query attention (two query heads per KV head), rank counts split KV heads.
    "llama3": ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=250, multiple_of=32,
                          ffn_dim_multiplier=1.3, rope_theta=500000.0, max_seq_len=256),
    # Llama 3.2: tied embeddings: the vocabulary-parallel embedding is the output matrix too.
    "llama3.2": ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=250, multiple_of=32,
                            ffn_dim_multiplier=1.5, rope_theta=500000.0, max_seq_len=256, tie_embeddings=True),
    # Llama 4: MoE layers (routed experts + shared expert) every second layer, chunked attention, NoPE, QK-norm.
    "llama4": config_from_params({**LLAMA4_PARAMS, "vocab_size": 250}),
    # Gemma 3: sliding-window and global layers, QK-norm, sandwich norms, softcapped logits, tied; two KV heads,
    # so that 4 ranks replicate each on the two ranks whose query heads read it.
    "gemma3": ModelConfig(arch="gemma3", dim=64, n_layers=3, n_heads=8, n_kv_heads=2, head_dim=16, hidden_dim=96,
                          vocab_size=250, norm_eps=1e-6, rope_theta=1e6, rope_local_theta=1e4, max_seq_len=256,
                          tie_embeddings=True, sliding_window=8, sliding_window_pattern=3,
                          query_pre_attn_scalar=24.0, final_logit_softcap=5.0),
}
SEQ, PREFIX, NEW = 24, 16, 10  # full forward over SEQ tokens; cached: PREFIX then one at a time; NEW greedy


def inputs(config: ModelConfig) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(7))


@torch.inference_mode()
def runs(net: torch.nn.Module) -> dict[str, torch.Tensor | list]:
    """What a model computes: full-forward logits, cached prefill + one-token decode logits, greedy ids.

    The caches come from `net.config`, so a cut model's hold its own heads only.
    """
    toks = inputs(net.config)
    full = net(toks)
    cache = KVCache.for_model(net.config, 2, SEQ)
    steps = [prefill(net, toks[:, :PREFIX], cache)]
    for t in range(PREFIX, SEQ - 1):
        steps.append(decode_one(net, toks[:, t], cache))
    prompt = toks[0, :PREFIX].tolist()
    sampler = make_sampler(SamplingParams(temperature=0.0, max_tokens=NEW), net.config.vocab_size)
    # the batched path: two prompts of different lengths (left padding, a key mask) on one cache
    batched = [step.tokens for step in generate_tokens(net, [prompt, toks[1, :PREFIX - 3].tolist()], sampler)]
    return {"full": full, "cached": torch.stack(steps, 1), "greedy": greedy_reference(net, prompt, NEW),
            "batched": batched}


def tp_worker(families: list[str], seed: int, out_dir: str) -> None:
    """One rank: build each family's random model (same seed on every rank), cut it, record its runs."""
    import torch.distributed as dist

    from llamaherd.parallel import apply_tensor_parallel

    from .conftest import random_model

    for name in families:
        net = apply_tensor_parallel(random_model(FAMILIES[name], seed=seed))
        result = runs(net)
        torch.save(result, Path(out_dir) / f"{name}.rank{dist.get_rank()}.pt")


# -- loading each rank's slice, and Meta's reference run rank by rank -------------------------------------------


def load_worker(folders: dict[str, str], out_dir: str) -> None:
    """One rank: each folder through `load_parallel`, its logits on `inputs` recorded."""
    import torch.distributed as dist

    from llamaherd.parallel import load_parallel

    for name, folder in folders.items():
        model = load_parallel(folder, dtype=torch.float32)
        with torch.inference_mode():
            logits = model.net(inputs(model.config))
        torch.save(logits, Path(out_dir) / f"{name}.ours.rank{dist.get_rank()}.pt")


def meta_worker(folders: dict[str, str], out_dir: str) -> None:
    """One rank: Meta's own reference (llama-models on fairscale's model-parallel layers) built for the world
    size, loaded with this rank's consolidated.NN.pth as Meta's code loads it, its logits recorded."""
    import json

    import fairscale.nn.model_parallel.initialize as fs_init
    import torch.distributed as dist

    rank = dist.get_rank()
    fs_init.initialize_model_parallel(dist.get_world_size())
    torch.Tensor.cuda = lambda self, *a, **k: self  # Llama 4's reference allocates its cache with .cuda()
    for name, folder in folders.items():
        params = json.loads((Path(folder) / "params.json").read_text())
        shard = torch.load(Path(folder) / f"consolidated.{rank:02d}.pth", weights_only=True)
        if "moe_args" in params:
            from llama_models.llama4.args import ModelArgs, MoEArgs
            from llama_models.llama4.datatypes import TransformerInput
            from llama_models.llama4.model import Transformer

            ref = Transformer(ModelArgs(**{**params, "moe_args": MoEArgs(**params["moe_args"]),
                                           "max_batch_size": 2}))
            ref.load_state_dict(shard, strict=True)
            run = lambda toks: ref(TransformerInput(tokens=toks, tokens_position=0)).logits  # noqa: E731
        else:
            from llama_models.llama3.args import ModelArgs
            from llama_models.llama3.model import Transformer

            ref = Transformer(ModelArgs(**params, max_batch_size=2))
            ref.load_state_dict(shard, strict=False)  # Meta's files carry no rope buffers; its modules hold none
            run = lambda toks: ref(toks, 0)  # noqa: E731
        vocab = ref.tok_embeddings.num_embeddings
        with torch.inference_mode():
            logits = run(torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(7))).float()
        torch.save(logits, Path(out_dir) / f"{name}.meta.rank{rank}.pt")


# -- packed (quantized) GGUF files cut on block boundaries ------------------------------------------------------

# Widths every cut of 2 ranks keeps on whole K-quant super-blocks (wo and w2 take K = 512: 256 per rank).
# Gemma 3 with one KV head (as the 270M model): the KV head is replicated on both ranks. Llama 3 with an
# untied output matrix: the vocabulary-parallel output is packed rows too.
PACKED: dict[str, tuple[ModelConfig, str]] = {
    "gemma3-q4_k_m": (ModelConfig(arch="gemma3", dim=256, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=128,
                                  hidden_dim=512, vocab_size=250, norm_eps=1e-6, rope_theta=1e6,
                                  rope_local_theta=1e4, max_seq_len=256, tie_embeddings=True, sliding_window=8,
                                  sliding_window_pattern=2, query_pre_attn_scalar=128.0), "q4_k_m"),
    "llama3-q8_0": (ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=512, vocab_size=250,
                                rope_theta=500000.0, max_seq_len=256), "q8_0"),
}


def packed_file(name: str, folder: Path) -> Path:
    """The tiny model `name` of PACKED written as GGUF in its file type by the package's writer."""
    from llamaherd.checkpoint.base import Checkpoint
    from llamaherd.checkpoint.gguf_write import write

    from .conftest import random_model

    config, qtype = PACKED[name]
    net = random_model(config, seed=11, std=0.05)
    ckpt = Checkpoint(config=config, state_dict={k: v.detach().clone() for k, v in net.state_dict().items()},
                      source=Path(name))
    return write(ckpt, Path(folder) / f"{name}.gguf", qtype=qtype)


# The ggml kernels' switches: float32 activations and products (exact up to the float32 sum order), and the
# defaults (llama.cpp-style int8 activations; bf16 prefill GEMMs where the CPU has them).
KERNELS = {"float32": {"INT8_ACTIVATIONS": False, "BF16_PREFILL": False}, "default": {}}


def packed_worker(files: dict[str, str], out_dir: str) -> None:
    """One rank: each packed GGUF file through `load_parallel`, its runs recorded under each of KERNELS."""
    import torch.distributed as dist

    from llamaherd.parallel import load_parallel

    for name, path in files.items():
        net = load_parallel(path).net
        for kernels in KERNELS:
            with ggml_switches(KERNELS[kernels]):
                result = runs(net)
            torch.save(result, Path(out_dir) / f"{name}.{kernels}.rank{dist.get_rank()}.pt")


@contextlib.contextmanager
def ggml_switches(switches: dict[str, bool]):
    """`native.ggml_kernels`' module switches set for the block, then restored."""
    from llamaherd.native import ggml_kernels

    old = {k: getattr(ggml_kernels, k) for k in switches}
    for k, v in switches.items():
        setattr(ggml_kernels, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(ggml_kernels, k, v)


# -- --quantize with tensor parallelism -------------------------------------------------------------------------

# wo (K = 64) and w2 (K = 256) cut in 2 keep whole int4 groups of 32; the untied output matrix is quantized too.
# Every cut row count a multiple of 16 (torch's CPU int4 kernel): vocabulary 256.
QUANTIZED = ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, hidden_dim=256, vocab_size=256,
                        rope_theta=500000.0, max_seq_len=256)


def quantized_worker(folder: str, specs: list[str], out_dir: str) -> None:
    """One rank: the folder loaded as each quantization scheme of `specs` by `load_parallel`, its runs recorded
    with the native decode kernels' float32 activations and with their default int16 ones."""
    import torch.distributed as dist

    from llamaherd.parallel import load_parallel

    for spec in specs:
        net = load_parallel(folder, dtype=torch.float32, quantize=spec).net
        for int16 in (False, True):
            with int16_activations(int16):
                result = runs(net)
            torch.save(result, Path(out_dir) / f"{spec}.int16-{int16}.rank{dist.get_rank()}.pt")


@contextlib.contextmanager
def int16_activations(on: bool):
    """The weight-only kernels on int16 activation codes (on) or float32 activations (off) for the block, then
    the switches restored. int4's int8 codes (`INT8_ACTIVATIONS`, the default) are off here: a row-parallel
    rank's K may not be the multiple of 128 they take, and the rank would fall back to int16."""
    from llamaherd.native import weight_only

    old = weight_only.INT16_ACTIVATIONS, weight_only.INT8_ACTIVATIONS
    weight_only.INT16_ACTIVATIONS, weight_only.INT8_ACTIVATIONS = on, False
    try:
        yield
    finally:
        weight_only.INT16_ACTIVATIONS, weight_only.INT8_ACTIVATIONS = old
