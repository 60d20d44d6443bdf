"""Meta's own int4 checkpoints: Llama 3.2 1B/3B QLoRA / SpinQuant files and Llama 4 int4_scales_<rank>.pt experts.

Llama 3.2 (`-QLORA_INT4_EO8`, `-SpinQuant_INT4_EO8`): the reference is Meta's llama-models Transformer turned into
the int4 model by Meta's own loader (`llama3/quantization/loader.py`
`_prepare_model_int4_weight_int8_dynamic_activation`: torchao's `Int8DynActInt4WeightLinear` + Meta's LoRA adaptor
for every block Linear, `Int8WeightEmbedding` / `Int8WeightLinear` for the embedding and output) and loaded with
Meta's load hooks from the very folder we read. That loader module cannot be imported here: it imports
llama_models/quantize_impls.py (which raises without fbgemm_gpu, a CUDA package) and torchao's class under its old
path `torchao.quantization.GPTQ`; torchao 0.18, the one that imports with our torch, keeps it in
`torchao.quantization.linear_quant_modules`. So the four definitions are compiled from the loader's own source with
`ast` and given that class. torchao's forward also rounds each activation row to int8 (per-token dynamic
quantization), which our int4 path does its own way (float32, int16 rows or int8 blocks of 32, by the native
switches): the exactness check switches that rounding off in the reference (its weight dequantisation stays torchao's
own) and ours off with float32 activations, and the other checks bound the difference with them on. SpinQuant's online
rotation before w2 is added to the reference as llama-stack's meta_reference `add_hadamard_transform_for_spinquant`
does it (nn.Sequential(Hadamard, w2)), with the Hadamard matrix built here by Sylvester's construction.

Llama 4 (`int4_scales_<rank>.pt`): the files are made with Meta's own `int4_row_quantize` and `pack_int4`
(llama_models/quantize_impls.py), their two definitions compiled from that file's source in the same way; the layout
around them (transpose to (E, out, in), quantize each expert, transpose back, flatten to 2-D, view as float8_e4m3fn;
scales keyed "layers.{i}.feed_forward.experts.w1") follows llama-models `llama4/scripts/quantize.py`. The reference
is the same model read from a folder holding the dequantised experts, as the FP8 release's test does.
"""

from __future__ import annotations

import ast
import inspect
import shutil
import types
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
from torch import nn

import llamaherd
from llamaherd import native
from llamaherd.checkpoint import meta_pth
from llamaherd.config import ModelConfig
from llamaherd.errors import CheckpointError
from llamaherd.native import weight_only as native_wo
from llamaherd.quant import meta_int4
from tests.checkpoint_fixtures import META_EXPERT_KEYS, meta_params, meta_quantized_folders, stepwise_logits
from tests.conftest import random_model

# dim 256 (groups of 32 and 256), feed-forward width 1024 (a power of two: SpinQuant's Hadamard).
C = ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=1024,
                rope_theta=500000.0, max_seq_len=64)
LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
SHORT = [1, 17, 42, 99, 3, 250, 7, 64, 128, 5]  # 10 rows: the native decode kernels
LONG = list(range(3, 240, 11))  # 22 rows: the dequantised float32 path
RANK, LORA_SCALE = 4, 2.0


# -- references nobody here wrote ---------------------------------------------------------------------------------


def _definitions(module_file: str, names: tuple[str, ...], namespace: dict) -> types.SimpleNamespace:
    """The named top-level functions / classes of an installed llama_models file, compiled from its own source
    alone (the file's imports are not run: see the module docstring); `namespace` supplies what they refer to."""
    import llama_models

    path = f"{llama_models.__path__[0]}/{module_file}"
    tree = ast.parse(open(path).read())
    wanted = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names]
    assert sorted(n.name for n in wanted) == sorted(names)
    namespace = dict(namespace)
    exec(compile(ast.Module(body=wanted, type_ignores=[]), path, "exec"), namespace)
    return types.SimpleNamespace(**{n: namespace[n] for n in names})


def meta_quantize_functions() -> types.SimpleNamespace:
    """`int4_row_quantize` and `pack_int4` from llama_models/quantize_impls.py, without its fbgemm import."""
    return _definitions("quantize_impls.py", ("int4_row_quantize", "pack_int4"),
                        {"torch": torch, "Tuple": Tuple, "Optional": Optional})


@pytest.fixture(scope="module")
def meta_loader():
    """llama-models' llama3 int4 loader classes on torchao 0.18 (see the module docstring)."""
    pytest.importorskip("torchao")
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from torchao.quantization.linear_quant_modules import Int8DynActInt4WeightLinear

    names = ("Int8DynActInt4WeightLinearLoRA", "Int8WeightEmbedding", "Int8WeightLinear",
             "_prepare_model_int4_weight_int8_dynamic_activation")
    return _definitions("llama3/quantization/loader.py", names, {
        "torch": torch, "nn": nn, "Tensor": torch.Tensor, "Any": Any, "Dict": Dict, "List": List,
        "Optional": Optional, "ColumnParallelLinear": ColumnParallelLinear, "RowParallelLinear": RowParallelLinear,
        "Int8DynActInt4WeightLinear": Int8DynActInt4WeightLinear})


def sylvester(n: int) -> torch.Tensor:
    """H_n / sqrt(n), H_1 = [1], H_2m = [[H_m, H_m], [H_m, -H_m]] (float64)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


class HadamardRef(nn.Module):
    def forward(self, x):
        return (x.double() @ sylvester(x.shape[-1])).to(x.dtype)  # H is symmetric


# -- the Llama 3.2 int4 folders ------------------------------------------------------------------------------------


def _symmetric_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest int4 per group of inputs: (q int8 (N, K) in -8..7, float32 scales (N, K / group))."""
    N, K = w.shape
    g = w.float().reshape(N, K // group, group)
    s = g.abs().amax(-1) / 7.5
    q = torch.round(g / s[..., None]).clamp(-8, 7).to(torch.int8).reshape(N, K)
    return q, s


def _int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = w.float().abs().amax(1, keepdim=True) / 127  # (N, 1): Int8WeightEmbedding's weight * scales broadcasts
    return torch.round(w / s).clamp(-128, 127).to(torch.int8), s


def int4_folder(tmp_path, group=32, lora=False, spinquant=False, zeros=False, tied=False, seed=0):
    """A Meta folder laid out as the int4 releases are (see the module docstring); returns (folder, params)."""
    floats = random_model(C, seed=seed, std=0.05).state_dict()  # Meta's parameter names
    gen = torch.Generator().manual_seed(seed + 1)
    sd = {}
    for name, t in floats.items():
        parts = name.split(".")
        t = t.detach().float()
        if name.startswith("layers.") and parts[-2] in LINEARS:
            q, s = _symmetric_int4(t, group)
            sd[name], sd[name.replace(".weight", ".scales")] = q, s
            module = name.removesuffix(".weight")
            if zeros:  # torchao keeps float zero points; Meta's loader uses them when the file has them
                sd[f"{module}.zeros"] = torch.randint(-2, 3, s.shape, generator=gen).float() * 0.5
            if lora:  # the QLoRA releases keep the adaptor in bf16
                sd[f"{module}.adaptor.A.weight"] = (torch.randn(RANK, t.shape[1], generator=gen) * 0.05).bfloat16()
                sd[f"{module}.adaptor.B.weight"] = (torch.randn(t.shape[0], RANK, generator=gen) * 0.05).bfloat16()
        elif name in ("tok_embeddings.weight", "output.weight"):
            source = floats["tok_embeddings.weight"] if tied else t
            sd[name], sd[name.replace(".weight", ".scales")] = _int8_rows(source.float())
        else:
            sd[name] = t.clone()
    params = dict(meta_params(C), quantization_args={"scheme": meta_int4.SCHEME, "group_size": group})
    if spinquant:
        params["quantization_args"]["spinquant"] = True
    if lora:
        params["lora_args"] = {"rank": RANK, "scale": LORA_SCALE}
    folder = tmp_path / "int4"
    folder.mkdir()
    torch.save(sd, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(__import__("json").dumps(params))
    return folder, params


def meta_int4_reference(loader, folder, params):
    """Meta's Transformer made into the int4 model by Meta's loader, loaded from `folder` with Meta's hooks."""
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer

    args = ModelArgs(**params, max_seq_len=C.max_seq_len, max_batch_size=1)
    ref = Transformer(args)
    lora = params.get("lora_args") or {}
    loader._prepare_model_int4_weight_int8_dynamic_activation(ref, params["quantization_args"]["group_size"],
                                                               lora.get("rank"), lora.get("scale"))
    ref.load_state_dict(torch.load(folder / "consolidated.00.pth", weights_only=True), strict=True)
    if params["quantization_args"].get("spinquant"):  # llama-stack: nn.Sequential(HadamardModule, w2)
        for layer in ref.layers:
            layer.feed_forward.w2 = nn.Sequential(HadamardRef(), layer.feed_forward.w2)
    return ref.eval()


def _reference_logits(ref, tokens, monkeypatch, activation_rounding: bool):
    from torchao.quantization import linear_quant_modules

    with monkeypatch.context() as m:
        if not activation_rounding:
            m.setattr(linear_quant_modules, "per_token_dynamic_quant", lambda x, **_: x)
        with torch.no_grad():
            return ref(torch.tensor([tokens]), 0)[0].float()


VARIANTS = [
    dict(group=32),
    dict(group=32, lora=True),
    dict(group=256, lora=True, zeros=True),
    dict(group=32, spinquant=True, tied=True),
]


@pytest.mark.parametrize("kw", VARIANTS, ids=["-".join(f"{k}{v}" for k, v in kw.items()) for kw in VARIANTS])
def test_llama32_int4_logits_equal_metas_loader(tmp_path, meta_parallel, meta_loader, monkeypatch, kw):
    monkeypatch.setattr(meta_int4.Int8RowsLinear, "CHUNK_ROWS", 100)  # the 256-row vocabulary in three chunks
    folder, params = int4_folder(tmp_path, **kw)
    ref = meta_int4_reference(meta_loader, folder, params)
    model = llamaherd.load(folder, dtype=torch.float32)
    wq = model.net.layers[0].attention.wq
    assert isinstance(wq, meta_int4.MetaInt4Linear) and wq.group_size == kw["group"]
    assert (wq.adaptor is not None) == kw.get("lora", False)
    assert model.net.layers[1].feed_forward.w2.rotate == kw.get("spinquant", False)
    assert model.config.tie_embeddings == kw.get("tied", False)
    # tied: the vocabulary projection runs on the int8 output rows (native for SHORT, by chunks for LONG)
    assert isinstance(getattr(model.net.project, "linear", None), meta_int4.Int8RowsLinear) == kw.get("tied", False)
    for tokens in (SHORT, LONG):  # the native kernels (<= 16 rows), then the dequantised float32 path
        want = _reference_logits(ref, tokens, monkeypatch, activation_rounding=False)
        with native.switched_off(native_wo, "INT16_ACTIVATIONS"):  # float32 activations: the exact products
            got = model.logits(tokens)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    want = _reference_logits(ref, SHORT, monkeypatch, activation_rounding=False)
    # int16 activation codes move each activation by at most amax / 65534 of its row
    with native.switched_off(native_wo, "INT8_ACTIVATIONS"):
        got = model.logits(SHORT)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())
    # the default: 4-bit codes on int8 activation blocks (llama.cpp's Q8_0 rounding, amax / 254 per 32), the GPTQ /
    # AWQ test's bound; against torchao's own forward (int8 rows, amax / 255 per token) both sides round the
    # activations, each their own way: twice that bound.
    got = model.logits(SHORT)
    torch.testing.assert_close(got, want, rtol=0, atol=4e-2 * want.abs().max().item())
    torchao = _reference_logits(ref, SHORT, monkeypatch, activation_rounding=True)
    torch.testing.assert_close(got, torchao, rtol=0, atol=8e-2 * torchao.abs().max().item())


def test_bf16_model_decodes_like_its_full_forward(qlora_folder):
    """A bf16 model over QLoRA codes: prefill + one-row decode steps give the full forward's logits."""
    model = llamaherd.load(qlora_folder, dtype=torch.bfloat16)
    full = model.logits(SHORT)
    torch.testing.assert_close(stepwise_logits(model, SHORT, C), full[3:], rtol=0.05,
                               atol=0.05 * full.abs().max().item())


def test_hadamard_is_sylvesters_normalised_matrix():
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    torch.testing.assert_close(meta_int4.hadamard(x), x @ sylvester(64))
    xb = torch.randn(2, 1024).bfloat16()
    got = meta_int4.hadamard(xb)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), (xb.double() @ sylvester(1024)).float(), rtol=1e-2, atol=1e-2)


def _edit(folder, fn):
    path = folder / "consolidated.00.pth"
    sd = torch.load(path, weights_only=True)
    fn(sd)
    torch.save(sd, path)


def _edit_params(folder, fn):
    import json

    params = json.loads((folder / "params.json").read_text())
    fn(params)
    (folder / "params.json").write_text(json.dumps(params))


BAD_LLAMA32 = [
    ("missing scales", lambda sd: sd.pop("layers.0.attention.wq.scales"), None, "wq.scales is missing"),
    ("scales of another group", lambda sd: sd.__setitem__("layers.1.feed_forward.w1.scales",
                                                          torch.ones(C.hidden_dim, C.dim // 64)), None, "group_size"),
    ("codes out of range", lambda sd: sd["layers.0.attention.wo.weight"].__setitem__((0, 0), 9), None, "-8..7"),
    ("one adaptor half", lambda sd: sd.pop("layers.0.attention.wk.adaptor.B.weight"), None, "adaptor"),
    ("adaptor without lora_args", None, lambda p: p.pop("lora_args"), "lora_args"),
    ("no quantization_args", None, lambda p: p.pop("quantization_args"), "quantization_args"),
    ("another scheme", None, lambda p: p["quantization_args"].__setitem__("scheme", "int4_weight_only"), "scheme"),
    ("group 48", None, lambda p: p["quantization_args"].__setitem__("group_size", 48), "group_size"),
    ("bad lora_args", None, lambda p: p.__setitem__("lora_args", {"rank": 0, "scale": 2}), "lora_args"),
]


@pytest.fixture(scope="module")
def qlora_folder(tmp_path_factory):
    return int4_folder(tmp_path_factory.mktemp("qlora"), group=32, lora=True)[0]


@pytest.mark.parametrize("what,edit_sd,edit_params,match", BAD_LLAMA32, ids=[b[0] for b in BAD_LLAMA32])
def test_broken_llama32_int4_folders_are_checkpoint_errors(tmp_path, qlora_folder, what, edit_sd, edit_params, match):
    folder = shutil.copytree(qlora_folder, tmp_path / "broken")
    if edit_sd:
        _edit(folder, edit_sd)
    if edit_params:
        _edit_params(folder, edit_params)
    with pytest.raises(CheckpointError, match=match):
        llamaherd.load(folder)


# -- Llama 4 int4_scales_<rank>.pt ---------------------------------------------------------------------------------


def _llama4_config():
    from llamaherd.checkpoint.llama4 import config_from_params
    from tests.test_llama4 import PARAMS

    # dim 128 and expert width 256: every expert matrix's input (and each of 2 ranks' w2 piece) holds groups of 128
    return config_from_params(dict(PARAMS, dim=128, multiple_of=128))


def meta_int4_llama4_folders(tmp_path, shards: int, shared: bool = False):
    """(int4 folder as llama4/scripts/quantize.py writes it, float folder holding the dequantised weights)."""
    meta = meta_quantize_functions()
    L4 = _llama4_config()

    def quantize(name, w):
        prefix, _, leaf = name.rpartition(".")
        layer = int(name.split(".")[1]) if name.startswith("layers.") else -1
        if layer in (0, L4.n_layers - 1):
            return None  # quantize.py leaves the first and last layers in bf16
        if leaf in META_EXPERT_KEYS:  # routed experts (E, in, out)
            weight = w.transpose(1, 2).contiguous()  # (E, out, in), as quantize.py
            wq, s = zip(*[meta.int4_row_quantize(e) for e in weight])
            packed = torch.stack([meta.pack_int4(q) for q in wq])  # (E, out, in/2)
            s = torch.stack(s)  # (E, in/128, out)
            codes = packed.transpose(1, 2).reshape(-1, w.shape[-1]).contiguous().view(torch.float8_e4m3fn)
            deq = torch.stack(wq).float() * s.transpose(1, 2).repeat_interleave(128, dim=-1)
            return codes, deq.transpose(1, 2).contiguous(), f"{prefix}.{META_EXPERT_KEYS[leaf]}", s
        if shared and ".shared_expert." in name:  # int4_mixed's shared expert: nn.Linear weight (out, in)
            q, s = meta.int4_row_quantize(w)
            return meta.pack_int4(q), q.float() * s.t().repeat_interleave(128, dim=-1), name.removesuffix(".weight"), s
        return None

    return meta_quantized_folders(tmp_path, L4, shards, "int4_scales_{rank}.pt", quantize, std=0.05)


@pytest.mark.parametrize("shards,shared", [(1, False), (2, False), (2, True)])
def test_llama4_int4_experts_equal_their_dequantised_weights(tmp_path, shards, shared):
    """Each rank's experts are dequantised with that rank's scales (w2's groups are cut within each rank's piece)."""
    from tests.test_llama4 import tokens

    int4_dir, float_dir = meta_int4_llama4_folders(tmp_path, shards, shared)
    toks = tokens(seq=24)
    with torch.inference_mode():
        ours = llamaherd.load(int4_dir, dtype=torch.float32).net(toks)
        ref = llamaherd.load(float_dir, dtype=torch.float32).net(toks)
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-4, rel
    if shards > 1:  # tensor parallelism reads each rank's own piece: dequantised with its own scales file
        for rank in range(shards):
            a = meta_pth.read_rank(int4_dir, rank, shards).state_dict
            b = meta_pth.read_rank(float_dir, rank, shards).state_dict
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unpack_inverts_metas_pack_int4():
    meta = meta_quantize_functions()
    q = torch.randint(-8, 8, (5, 64), dtype=torch.int8)
    assert torch.equal(meta_int4.unpack_int4(meta.pack_int4(q)), q)


def _edit_scales(folder, fn):
    path = folder / "int4_scales_0.pt"
    scales = torch.load(path, weights_only=True)
    fn(scales)
    torch.save(scales, path)


BAD_LLAMA4 = [
    ("missing scales key", lambda s: s.pop("layers.1.feed_forward.experts.w3"), "names no scales"),
    ("a tensor the shard lacks", lambda s: s.__setitem__("layers.0.feed_forward.experts.w1",
                                                        s["layers.1.feed_forward.experts.w1"]), "holds no int4"),
    ("wrong scale shape", lambda s: s.__setitem__("layers.1.feed_forward.experts.w2",
                                                  s["layers.1.feed_forward.experts.w2"][:, :, :7]), "disagree"),
    ("scales per tensor", lambda s: s.__setitem__("layers.1.feed_forward.experts.w1", torch.ones(4)), "expert"),
]


@pytest.mark.parametrize("what,edit,match", BAD_LLAMA4, ids=[b[0] for b in BAD_LLAMA4])
def test_broken_llama4_int4_folders_are_checkpoint_errors(tmp_path, what, edit, match):
    int4_dir, _ = meta_int4_llama4_folders(tmp_path, 1)
    _edit_scales(int4_dir, edit)
    with pytest.raises(CheckpointError, match=match) as info:
        llamaherd.load(int4_dir)
    assert "int4_scales_0.pt" in str(info.value) and "download it again" in str(info.value)


def test_meta_functions_come_from_llama_models_source():
    """The ast loader ran Meta's own definitions (not a copy): same source text as the installed file."""
    meta = meta_quantize_functions()
    import llama_models

    source = open(llama_models.__path__[0] + "/quantize_impls.py").read()
    assert inspect.getsource(meta.pack_int4) in source
