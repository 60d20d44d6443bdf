"""Grouped projections (one native call for wq/wk/wv, w1/w3) against gguf-py's decode then a float64 matmul."""

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from llamaherd.native import ggml_kernels
from llamaherd.quant import GGMLLinear, GGMLWeight
from llamaherd.quant.ggml import group_shared_inputs
from tests.test_cpu_kernels import random_blocks

pytestmark = pytest.mark.skipif(ggml_kernels.library() is None, reason="no C compiler: native kernels not built")


@pytest.fixture(autouse=True)
def float_activations(monkeypatch):
    # These compare the float-activation kernels (native/ggml.c) with float64 math at float32 tolerances; the
    # default int8-activation path (ggml_kernels.INT8_ACTIVATIONS) rounds x to int8 codes first and is tested
    # against float64 math on the quantized x in tests/test_q8_kernels.py.
    monkeypatch.setattr(ggml_kernels, "INT8_ACTIVATIONS", False)

K = 512
# Mixed types in one group, as Q4_K_M files mix them (attn_v is often Q6_K beside Q5_0/Q4_K q and k).
TYPES = {"wq": ("Q5_0", 96), "wk": ("Q4_K", 40), "wv": ("Q6_K", 40)}


def reference(packed: torch.Tensor, name: str, x: torch.Tensor) -> torch.Tensor:
    dense = gguf.quants.dequantize(packed.numpy(), gguf.GGMLQuantizationType[name])
    return x.double() @ torch.from_numpy(np.ascontiguousarray(dense)).double().T


def close(got: torch.Tensor, want: torch.Tensor, tol: float = 2e-6) -> None:
    # float32 accumulation vs a float64 reference: relative to the output's magnitude (as test_cpu_kernels)
    torch.testing.assert_close(got.double(), want, atol=tol * want.abs().max().item(), rtol=0)


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for i, (attr, (name, rows)) in enumerate(TYPES.items()):
            lin = GGMLLinear(K, rows, name)
            lin.weight = GGMLWeight(random_blocks(name, rows, K, seed=10 + i), name)
            setattr(self, attr, lin)


@pytest.fixture
def attn() -> Attn:
    a = Attn()
    assert group_shared_inputs(a) == 1
    return a


def wants(a: Attn, x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {attr: reference(getattr(a, attr).weight.plain(), name, x.reshape(-1, K)).reshape(*x.shape[:-1], -1)
            for attr, (name, _) in TYPES.items()}


def test_gemv_many_mixed_types_equals_reference():
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(0))
    packed = {n: random_blocks(n, r, K, seed=i) for i, (n, r) in enumerate(TYPES.values())}
    outs = ggml_kernels.gemv_many(x, ggml_kernels.Weights([(p, gguf.GGMLQuantizationType[n].value) for n, p in packed.items()]), K)
    for (n, p), got in zip(packed.items(), outs):
        assert got.is_contiguous()
        close(got, reference(p, n, x))


@pytest.mark.parametrize("order", [("wq", "wk", "wv"), ("wv", "wq", "wk")])
@pytest.mark.parametrize("shape", [(1, 1, K), (2, 3, K)])
def test_group_results_in_any_call_order(attn, order, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    want = wants(attn, x)
    with torch.inference_mode():
        xi = x.clone()
        for attr in order:
            close(getattr(attn, attr)(xi), want[attr])
    for attr in order:  # outside inference mode the version counter guards the stash too
        close(getattr(attn, attr)(x), want[attr])


def test_stash_is_not_reused_for_another_input_or_after_in_place_change(attn):
    x, y = torch.randn(2, 1, 1, K, generator=torch.Generator().manual_seed(2))
    attn.wq(x)  # stashes wk(x), wv(x)
    close(attn.wk(y), wants(attn, y)["wk"])  # another tensor: computed for y, not handed x's result
    attn.wq(x)
    x.mul_(2)  # same tensor object, new values
    close(attn.wv(x), wants(attn, x)["wv"])


def test_many_rows_and_no_kernels_fall_back(attn, monkeypatch):
    monkeypatch.setattr(ggml_kernels, "BF16_PREFILL", False)  # the float32 GEMM, compared at float32 tolerance
    x = torch.randn(1, ggml_kernels.MAX_GEMV_ROWS + 6, K, generator=torch.Generator().manual_seed(3))
    want = wants(attn, x)
    for attr in ("wq", "wk", "wv"):
        close(getattr(attn, attr)(x), want[attr], tol=1e-5)  # decode + float32 GEMM path
    with ggml_kernels.disabled():
        for attr in ("wk", "wq"):
            close(getattr(attn, attr)(x[:, :1]), want[attr][:, :1], tol=1e-5)


def test_state_dict_names_unchanged(attn):
    assert sorted(attn.state_dict()) == ["wk.weight", "wq.weight", "wv.weight"]
