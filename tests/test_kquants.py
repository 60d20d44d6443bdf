"""Our block quantizers against the reference decoders (gguf-py, and quant/ggml_quants.py's) and gguf-py's own quantizers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import gguf
from gguf import GGMLQuantizationType as Q

from llamaherd.quant import ggml_quants
from llamaherd.quant.quantize import QUANTIZERS, quantize

ALL = sorted(QUANTIZERS, key=lambda q: q.name)


def _data(rows: int = 24, cols: int = 512, seed: int = 0) -> torch.Tensor:
    """Gaussian weights plus the awkward cases: an all-zero super-block, constants, an outlier, all-positive."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 0.05
    x[1, :256] = 0.0
    x[2, :32] = 0.7  # a constant 32-block inside a super-block
    x[3, 5] = 4.0  # one outlier dominates its block's scale
    x[4] = x[4].abs() + 0.01  # no negative values: min clamps to 0 in the k-quants
    x[5, 256:] = -x[5, 256:].abs()  # no positive values
    x[6, :16] = 1e-20  # below GROUP_MAX_EPS
    return x


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_reference_decoders_reproduce_our_reconstruction(qtype):
    """gguf-py's decoder (a reference) and our own decoder (quant/ggml_quants.py), run on our bytes, give exactly our values."""
    x = _data()
    raw, recon = quantize(x, qtype)
    ref = gguf.quants.dequantize(raw, qtype)
    np.testing.assert_array_equal(ref, recon.numpy())
    ours_e = ggml_quants.dequantize(torch.from_numpy(raw), qtype.name)
    torch.testing.assert_close(ours_e, recon, rtol=0, atol=0)
    assert raw.shape == (x.shape[0], x.shape[1] // gguf.GGML_QUANT_SIZES[qtype][0] * gguf.GGML_QUANT_SIZES[qtype][1])


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q5_1], ids=lambda q: q.name)
def test_legacy_types_byte_identical_to_gguf_py(qtype):
    """gguf-py ports llama.cpp's reference quantizers for these types: our bytes must be identical."""
    x = _data(seed=1)
    raw, _ = quantize(x, qtype)
    np.testing.assert_array_equal(raw, gguf.quants.quantize(x.numpy(), qtype))


def test_error_ladder_follows_bits():
    """More bits, less error; k-quants beat the legacy type of the same width (llama.cpp's perplexity ranking)."""
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(2)) * 0.02
    rmse = {q: (quantize(x, q)[1] - x).pow(2).mean().sqrt().item() for q in ALL}
    assert rmse[Q.Q8_0] < rmse[Q.Q6_K] < rmse[Q.Q5_K] < rmse[Q.Q4_K] < rmse[Q.Q4_0]
    assert rmse[Q.Q5_K] < rmse[Q.Q5_1] < rmse[Q.Q5_0] < rmse[Q.Q4_0]
    # Gaussian data, 4-bit k-quant: error ~7% of the spread (llama.cpp reports Q4_K rmse ~0.07 sigma)
    assert rmse[Q.Q4_K] < 0.085 * 0.02


def test_zero_tensor_quantizes_to_zero():
    x = torch.zeros(2, 256)
    for q in ALL:
        raw, recon = quantize(x, q)
        assert torch.equal(recon, x), q
        np.testing.assert_array_equal(gguf.quants.dequantize(raw, q), x.numpy())


def test_row_length_must_fit_the_block():
    with pytest.raises(ValueError, match="multiple of the Q4_K block size 256"):
        quantize(torch.randn(2, 320), Q.Q4_K)
