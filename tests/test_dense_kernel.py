"""The bf16 matrix-vector kernel (llamaherd/native/dense.c) against float64 products, and the swap that uses it."""

import pytest
import torch
import torch.nn.functional as F

from llamaherd import native
from llamaherd.model.cache import KVCache
from llamaherd.native import dense
from tests.conftest import TINY, random_model

pytestmark = pytest.mark.skipif(not dense.available(), reason="no C compiler: native kernels not built")


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.double() @ w.double().T


def bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Worst-case float32 accumulation error of the kernel, elementwise.

    Each product of two bf16 values is exact in float32 (8-bit significands), so only the additions round:
    a lane adds K/16 terms in sequence, then 16 lanes are summed in a tree of depth 4, so every term passes
    through at most K/16 + 8 roundings of relative size 2^-24 (Higham, Accuracy and Stability of Numerical
    Algorithms, 2nd ed., eq. 3.4 with n = K/16 + 8): |err| <= (K/16 + 8) 2^-24 sum_k |x_k w_k|.
    A wrong element, a dropped tail or a misread row errs by ~|x_k w_k|, far above this.
    """
    K = x.shape[-1]
    return (K / 16 + 8) * 2.0**-24 * (x.double().abs() @ w.double().abs().T) + 1e-30


def check(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    err = (got.double() - reference(x, w)).abs()
    assert (err <= bound(x, w)).all(), f"max error / bound = {(err / bound(x, w)).max().item():.3g}"


@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("N,K", [(64, 256), (13, 100), (7, 33), (5, 31), (1, 1), (130, 2048)])
def test_gemv_float32_matches_float64(M, N, K):
    torch.manual_seed(M * 1000 + N + K)
    x = torch.randn(M, K).bfloat16()
    w = torch.randn(N, K).bfloat16()
    check(dense.gemv(x, w, torch.float32), x, w)


@pytest.mark.parametrize("M", [1, 3, 16])
def test_gemv_strided_rows(M):
    """Weight rows further apart than K (a column slice of a wider matrix) and activation rows likewise."""
    torch.manual_seed(M)
    K, N = 96, 37
    w_wide = torch.randn(N, K + 29).bfloat16()
    x_wide = torch.randn(M, K + 7).bfloat16()
    w, x = w_wide[:, 3 : 3 + K], x_wide[:, :K]
    assert w.stride(0) != K and x.stride(0) != K
    assert dense.applies(x, w)
    check(dense.gemv(x, w, torch.float32), x, w)


def test_gemv_bf16_output_is_rounded_float32_sums():
    """bf16 output = the float32 sums rounded to nearest even (what `.bfloat16()` does)."""
    torch.manual_seed(1)
    x, w = torch.randn(4, 300).bfloat16(), torch.randn(70, 300).bfloat16()
    f32 = dense.gemv(x, w, torch.float32)
    assert torch.equal(dense.gemv(x, w, torch.bfloat16), f32.bfloat16())


def test_gemv_leading_dims_and_non_finite():
    torch.manual_seed(2)
    x, w = torch.randn(2, 3, 64).bfloat16(), torch.randn(9, 64).bfloat16()
    y = dense.gemv(x, w, torch.float32)
    assert y.shape == (2, 3, 9)
    check(y.reshape(6, 9), x.reshape(6, 64), w)
    w[4, 10] = float("nan")
    w[5, 0] = float("inf")
    x[..., 0] = 1.0
    y = dense.gemv(x, w)
    assert y[..., 4].isnan().all() and (y[..., 5] == float("inf")).all()


def test_applies_only_where_the_kernel_may_run():
    x, w = torch.randn(1, 64).bfloat16(), torch.randn(8, 64).bfloat16()
    assert dense.applies(x, w)
    assert not dense.applies(x.float(), w.float())  # float32: torch's path
    assert not dense.applies(torch.randn(dense.MAX_ROWS + 1, 64).bfloat16(), w)  # a GEMM: oneDNN
    assert not dense.applies(x, torch.randn(64, 8).bfloat16().T)  # unit stride along N, not K
    wg = w.clone().requires_grad_()
    assert not dense.applies(x, wg)  # autograd must record the product
    with torch.no_grad():
        assert dense.applies(x, wg)
    with native.disabled():
        assert not dense.applies(x, w)


def tiny_bf16(name: str) -> torch.nn.Module:
    return random_model(TINY[name]).to(torch.bfloat16).eval()


def run(net: torch.nn.Module, prompt: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Prefill logits for every prompt position, then `steps` cached greedy decode steps."""
    cache = KVCache.for_model(net.config, prompt.shape[0], prompt.shape[1] + steps, dtype=torch.bfloat16)
    with torch.inference_mode():
        out = [net(prompt, cache=cache)]
        tok = out[-1][:, -1].argmax(-1)
        for _ in range(steps):
            out.append(net(tok[:, None], cache=cache))
            tok = out[-1][:, -1].argmax(-1)
    return out


@pytest.mark.parametrize("name", ["llama3", "llama3.2"])  # separate output and tied output
def test_swapped_model_logits_match_torch(name):
    plain = tiny_bf16(name)
    swapped = tiny_bf16(name)
    assert dense.swap_dense(swapped) == 7 * TINY[name].n_layers + (0 if TINY[name].tie_embeddings else 1)
    assert isinstance(swapped.layers[0].attention.wq, dense.DenseLinear)
    prompt = torch.tensor([[3, 17, 99, 5, 250], [1, 2, 3, 4, 5]])  # M = 10 rows in prefill: the kernel too
    got, want = run(swapped, prompt, 6), run(plain, prompt, 6)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32
        # Each product differs from torch's bf16 one by at most one bf16 rounding of its float32 sum (tested
        # above); those 2^-8-relative differences pass through 2 layers. Allow a few bf16 ulps of the logits'
        # scale; a wrong kernel (a dropped row, a wrong tail) moves logits by their whole magnitude.
        torch.testing.assert_close(g, w, atol=4 * 2.0**-8 * w.abs().max().item(), rtol=0)
        assert torch.equal(g.argmax(-1), w.argmax(-1))
    with native.disabled():  # switched off: bit for bit the unswapped model's torch path
        off, plain_off = run(swapped, prompt, 6), run(plain, prompt, 6)
    for g, w in zip(off, plain_off):
        assert torch.equal(g, w)


def test_swap_keeps_the_state_dict():
    net = tiny_bf16("llama3.2")
    before = net.state_dict()
    params = {n: p for n, p in net.named_parameters()}
    dense.swap_dense(net)
    after = net.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert after[k] is before[k] or after[k].data_ptr() == before[k].data_ptr()
        assert torch.equal(after[k], before[k])
    assert all(p is params[n] for n, p in net.named_parameters())


def test_swap_leaves_float32_models_alone():
    net, plain = random_model(TINY["llama3"]).eval(), random_model(TINY["llama3"]).eval()
    assert dense.swap_dense(net) == 0
    assert "project" not in vars(net)
    assert type(net.layers[0].attention.wq) is torch.nn.Linear
    x = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        assert torch.equal(net(x), plain(x))


def test_autograd_takes_the_torch_path():
    net = tiny_bf16("llama3.2")
    dense.swap_dense(net)
    lin = net.layers[0].attention.wq
    x = torch.randn(1, 1, lin.in_features).bfloat16().requires_grad_()
    y = lin(x)
    assert y.grad_fn is not None
    y.float().sum().backward()
    assert lin.weight.grad is not None and x.grad is not None
    torch.testing.assert_close(x.grad, (torch.ones(1, 1, lin.out_features) @ lin.weight.float()).bfloat16())
    logits = net(torch.tensor([[1, 2]]))  # grad enabled, weights require grad: every product recorded
    logits.sum().backward()
    assert net.tok_embeddings.weight.grad is not None


def test_gemv_rejects_what_it_cannot_read():
    w = torch.randn(8, 64).bfloat16()
    with pytest.raises(ValueError):
        dense.gemv(torch.randn(dense.MAX_ROWS + 1, 64).bfloat16(), w)
    with pytest.raises(ValueError):
        dense.gemv(torch.randn(1, 64), w)
    with pytest.raises(ValueError):
        dense.gemv(torch.randn(1, 64).bfloat16(), w, torch.float16)
    with pytest.raises(ValueError):  # K mismatch, even where the element count would fit
        dense.gemv(torch.randn(1, 128).bfloat16(), w)
    with pytest.raises(ValueError):  # K = 0: no rows to speak of
        dense.gemv(torch.randn(1, 0).bfloat16(), torch.randn(8, 0).bfloat16())


def test_grouped_projections_in_any_order():
    """wq/wk/wv share one native call; a member given another tensor, or called twice, still gets its own product."""
    net = tiny_bf16("llama3")
    dense.swap_dense(net)
    att = net.layers[0].attention
    assert att.wq.group is att.wk.group is att.wv.group is not None
    assert net.layers[0].feed_forward.w1.group is net.layers[0].feed_forward.w3.group is not None
    assert net.layers[0].feed_forward.w2.group is None
    torch.manual_seed(3)
    x, y = torch.randn(2, 1, 64).bfloat16(), torch.randn(2, 1, 64).bfloat16()
    with torch.inference_mode():
        want = {n: F.linear(t, getattr(att, n).weight) for n in ("wq", "wk", "wv") for t in (x,)}
        got_q = att.wq(x)
        got_k_other = att.wk(y)  # another input: computed alone, the stash for x dropped
        got_v = att.wv(x)
        got_q2, got_k, got_q3 = att.wq(x), att.wk(x), att.wq(x)
    for g, w in [(got_q, want["wq"]), (got_v, want["wv"]), (got_q2, want["wq"]), (got_k, want["wk"]), (got_q3, want["wq"])]:
        # bf16 outputs: both are float32 sums rounded once; they may differ by one bf16 rounding step
        torch.testing.assert_close(g, w, atol=2.0**-7 * w.abs().max().item(), rtol=0)
    want_other = F.linear(y, att.wk.weight)
    torch.testing.assert_close(got_k_other, want_other, atol=2.0**-7 * want_other.abs().max().item(), rtol=0)
    assert got_q.shape == (2, 1, att.wq.out_features) and got_k.is_contiguous()


def test_swapped_model_deepcopies():
    import copy

    net = tiny_bf16("llama3.2")
    dense.swap_dense(net)
    twin = copy.deepcopy(net)
    att = twin.layers[1].attention
    assert att.wq.group is att.wv.group and att.wq.group is not net.layers[1].attention.wq.group
    assert att.wq.group.members[0] is att.wq
    x = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        assert torch.equal(twin(x), net(x))


def test_portable_fallback_matches_float64(tmp_path):
    """The `#else` path (no AVX512_BF16): dense.c built alone without it, called directly through ctypes."""
    import ctypes
    import shutil
    import subprocess

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    src = native.sources()[[p.name for p in native.sources()].index("dense.c")]
    lib_path = tmp_path / "dense_portable.so"
    flags = ["-O3", "-fopenmp", "-shared", "-fPIC", "-march=native", "-mno-avx512bf16"]
    done = subprocess.run([cc, *flags, str(src), "-o", str(lib_path)], capture_output=True, text=True)
    if done.returncode != 0:  # a compiler without -mno-avx512bf16: build for the baseline ISA instead
        done = subprocess.run([cc, "-O3", "-fopenmp", "-shared", "-fPIC", str(src), "-o", str(lib_path)],
                              capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lib = ctypes.CDLL(str(lib_path))
    assert lib.lh_bf16_native() == 0
    fn = lib.lh_bf16_gemv
    fn.argtypes, fn.restype = dense._SIGNATURES["lh_bf16_gemv"], ctypes.c_int
    torch.manual_seed(4)
    for M, N, K in [(1, 7, 33), (5, 13, 100), (16, 9, 64)]:
        x = torch.randn(M, K).bfloat16()
        w = torch.randn(N, K + 3).bfloat16()[:, :K]
        y = torch.empty(M, N)
        assert fn(x.data_ptr(), K, M, w.data_ptr(), w.stride(0), N, K, y.data_ptr(), N, 0, 2) == 0
        check(y, x, w)


def other_architectures():
    from tests.test_gemma3 import tiny as gemma3_tiny
    from tests.test_llama4 import CONFIG as llama4_config

    return {"gemma3": gemma3_tiny(), "llama4": llama4_config}


@pytest.mark.parametrize("arch", ["gemma3", "llama4"])
def test_swap_on_other_architectures(arch):
    """Every architecture loads through `llamaherd.load`, so every one gets the swap: Gemma 3 and Llama 4 too."""
    config = other_architectures()[arch]
    plain = random_model(config, std=0.05).to(torch.bfloat16).eval()
    swapped = random_model(config, std=0.05).to(torch.bfloat16).eval()
    assert dense.swap_dense(swapped) > 0
    assert any(isinstance(m, dense.DenseLinear) for m in swapped.modules())
    prompt = torch.tensor([[3, 17, 99, 5], [1, 2, 3, 4]])
    got, want = run(swapped, prompt, 4), run(plain, prompt, 4)
    for g, w in zip(got, want):
        # as in test_swapped_model_logits_match_torch: one bf16 rounding per product, through a few layers
        torch.testing.assert_close(g, w, atol=4 * 2.0**-8 * w.abs().max().item(), rtol=0)


def test_group_follows_weights_moved_by_module_to():
    """`.to(dtype)` keeps each Parameter object but gives it new memory: the grouped call must read the new one."""
    net = tiny_bf16("llama3")
    dense.swap_dense(net)
    att = net.layers[0].attention
    x = torch.randn(1, 1, 64).bfloat16()
    with torch.inference_mode():
        att.wq(x), att.wk(x), att.wv(x)  # caches the group's native arguments
    params = [att.wq.weight, att.wk.weight]
    net.float()
    with torch.no_grad():
        att.wk.weight.mul_(-1.0)  # float32 now: the torch path; the new values must be read after the round trip
    net.to(torch.bfloat16)
    assert att.wq.weight is params[0] and att.wk.weight is params[1]
    with torch.inference_mode():
        got = att.wq(x), att.wk(x), att.wv(x)
    for g, lin in zip(got, (att.wq, att.wk, att.wv)):
        want = F.linear(x, lin.weight)
        torch.testing.assert_close(g, want, atol=2.0**-7 * want.abs().max().item(), rtol=0)
