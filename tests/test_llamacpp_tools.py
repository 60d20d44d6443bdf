"""llama.cpp's own tools on our importance matrices: llama-quantize reads them, llama-imatrix's agree with ours.

The tools (llama-quantize, llama-imatrix) are built from the llama.cpp tree of the installed llama-cpp-python by
`make llamacpp-tools` (bench/llamacpp_tools.py; `make test-all` builds them first). Without them these tests
fail saying so. Slow: a small random Llama (GQA, a 600-piece SentencePiece vocabulary so that both tools
tokenize the calibration text, widths multiples of 256 so the K-quants and IQ4_XS apply) is quantized by both
tools several times.
Run with `pytest -m slow tests/test_llamacpp_tools.py -s` to see the measured numbers.
"""

from __future__ import annotations

import os
import random
import re
import subprocess

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from bench import llamacpp_tools
from llamaherd.checkpoint.gguf_write import write
from llamaherd.cli import main as herd
from llamaherd.config import ModelConfig
from llamaherd.quant import imatrix
from llamaherd.tokenizer import Tokenizer
from tests.gguf_write_fixtures import checkpoint, dequantized, read_tensors
from tests.test_llamacpp_interop import _llama_cpp_logits

pytestmark = pytest.mark.slow

CTX, CHUNKS = 128, 4  # llama-imatrix's -c and --chunks, and herd imatrix's
N_ENTRIES = 2 * 7  # two blocks of q, k, v, output, gate, up, down: every matrix llama-imatrix collects
LLAMA_TYPE = {"q4_k_m": "Q4_K_M", "iq4_xs": "IQ4_XS"}


def _tools() -> dict[str, str]:
    found = llamacpp_tools.find_tools()
    if found is None:
        pytest.fail(f"llama.cpp's llama-quantize and llama-imatrix are not built (looked in "
                    f"{llamacpp_tools.tool_dir() / 'bin'}): run `{llamacpp_tools.MAKE_TARGET}` first")
    return {name: str(path) for name, path in found.items()}


def _run(cmd: list[str], **env) -> str:
    """Run a llama.cpp tool; its whole log (stdout and stderr), failing the test with it when the tool fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{log[-4000:]}"
    return log


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("llamacpp-tools")


@pytest.fixture(scope="module")
def tok(work):
    from tests.test_tokenizer_spm import train_spm

    return Tokenizer.from_file(train_spm(work))


@pytest.fixture(scope="module")
def model_file(work, tok):
    _tools()  # fail early, before writing anything, when the tools are missing
    config = ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, hidden_dim=512,
                         rope_theta=10000.0, max_seq_len=2048)
    return write(checkpoint(config, tokenizer=tok, std=0.05, seed=11), work / "f32.gguf", qtype="f32")


@pytest.fixture(scope="module")
def text_file(work):
    """Plain English-like text (no special-token strings, which the two tokenizer front ends treat differently)."""
    words = ("the of and to in is that it was for on are as with his they at be this from have or by one had not "
             "but what all were when we there can an your which their said if do will each about how up out them "
             "then she many some so these would other into has more her two like him see time could no make than "
             "first been its who now people my made over did down only way find use may water long little very "
             "after words called just where most know river stone light north 1987 3.14").split()
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 16))).capitalize() + rng.choice(".,;?!")
                 for _ in range(150)]
    path = work / "calibration.txt"
    path.write_text(" ".join(sentences) + "\n")
    return path


@pytest.fixture(scope="module")
def ours(model_file, text_file, work):
    """`herd imatrix` of the model over the text, in both layouts: {"dat": path, "gguf": path}."""
    out = {}
    for fmt in ("dat", "gguf"):
        out[fmt] = work / f"ours.{fmt}"
        assert herd(["imatrix", str(model_file), "-f", str(text_file), "-o", str(out[fmt]), "-c", str(CTX),
                     "--chunks", str(CHUNKS), "--quiet"]) == 0
    return out


# llama-imatrix's attention in float32 throughout: an F32 KV cache, and no flash attention (whose CPU kernel
# rounds the query to F16 even over an F32 cache).
F32_ATTENTION = ("-ctk", "f32", "-ctv", "f32", "-fa", "off")


@pytest.fixture(scope="module")
def theirs(model_file, text_file, work):
    """llama-imatrix of the same model over the same text: in both layouts at its defaults, and in GGUF with
    float32 attention ("f32-attention")."""
    tool = _tools()["llama-imatrix"]
    out = {}
    for key, fmt, extra in (("dat", "dat", ()), ("gguf", "gguf", ()), ("f32-attention", "gguf", F32_ATTENTION)):
        out[key] = work / f"theirs-{key}.{fmt}"
        _run([tool, "-m", str(model_file), "-f", str(text_file), "-o", str(out[key]), "--output-format", fmt,
              "-c", str(CTX), "--chunks", str(CHUNKS), "--no-ppl", "-t", "2", *extra])
    return out


def _llama_quantize(model_file, dst, ftype: str, im=None) -> str:
    cmd = [_tools()["llama-quantize"], *(["--imatrix", str(im)] if im else []), str(model_file), str(dst),
           LLAMA_TYPE[ftype], "2"]
    return _run(cmd, LLAMA_TRACE="1")  # LLAMA_TRACE: load_imatrix prints every entry it loads


@pytest.fixture(scope="module")
def plain(model_file, work):
    """llama-quantize's files without an importance matrix, by type."""
    out = {}
    for ftype in LLAMA_TYPE:
        out[ftype] = work / f"plain-{ftype}.gguf"
        _llama_quantize(model_file, out[ftype], ftype)
    return out


def _blocks(raw: np.ndarray, qtype: Q) -> np.ndarray:
    return raw.reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])


@pytest.mark.parametrize("ftype", list(LLAMA_TYPE))
@pytest.mark.parametrize("fmt", ["dat", "gguf"])
def test_llama_quantize_reads_our_imatrix(model_file, ours, plain, work, fmt, ftype):
    """llama-quantize --imatrix OUR file: it loads every entry, the matrix changes its output, and its file
    has the tensor types of `herd quantize --imatrix` on the same input, with blocks (nearly all) the same."""
    theirs_path = work / f"llamacpp-{fmt}-{ftype}.gguf"
    log = _llama_quantize(model_file, theirs_path, ftype, ours[fmt])
    im = imatrix.read(ours[fmt], chunk_size=CTX)
    loaded = re.search(r"load_imatrix: loaded (\d+) importance matrix entries from (.+) computed on (\d+) chunks", log)
    assert loaded, log[-4000:]
    assert (int(loaded[1]), loaded[2], int(loaded[3])) == (N_ENTRIES, str(ours[fmt]), CHUNKS)
    traced = re.findall(r"load_imatrix: loaded data \(size = +(\d+), ([^)]*)\) for '([^']+)'", log)
    assert sorted(name for _, _, name in traced) == sorted(im.entries) and len(im.entries) == N_ENTRIES
    # how llama.cpp reads each entry's counts: the legacy file's ncall (chunks), the GGUF file's token count
    counted = f"ncall = +{CHUNKS}" if fmt == "dat" else f"n_tokens = +{CTX * CHUNKS}, n_chunks = +{CHUNKS}"
    for size, counts, name in traced:
        assert int(size) == im.entries[name].sums.numel() and re.fullmatch(counted, counts), (name, size, counts)
    assert gguf.GGUFReader(theirs_path).fields["quantize.imatrix.entries_count"].contents() == N_ENTRIES

    raw_theirs, raw_plain = read_tensors(theirs_path), read_tensors(plain[ftype])
    unchanged = [n for n in im.entries if np.array_equal(raw_theirs[n][1], raw_plain[n][1])]
    assert not unchanged, f"llama-quantize's output with our importance matrix equals its output without: {unchanged}"

    ours_path = work / f"ours-{fmt}-{ftype}.gguf"
    assert herd(["quantize", str(model_file), str(ours_path), "--type", ftype, "--imatrix", str(ours[fmt]),
                 "--quiet"]) == 0
    raw_ours = read_tensors(ours_path)
    assert {n: t for n, (t, _) in raw_ours.items()} == {n: t for n, (t, _) in raw_theirs.items()}

    src, deq_ours, deq_theirs = dequantized(model_file), dequantized(ours_path), dequantized(theirs_path)
    print(f"\n{fmt} {ftype}: tensor type  weighted err ours / llama.cpp  identical blocks")
    same_blocks = all_blocks = 0
    err_ours = err_theirs = 0.0
    for name, (qtype, raw) in raw_theirs.items():
        if qtype in (Q.F32, Q.F16):
            torch.testing.assert_close(deq_ours[name], deq_theirs[name], rtol=0, atol=0)
            continue
        x = src[name]
        w = im.weights(name, 1, x.shape[-1])
        w = torch.ones(x.shape[-1]) if w is None else w[0]
        e_ours = float(((deq_ours[name] - x) ** 2 * w).sum())
        e_theirs = float(((deq_theirs[name] - x) ** 2 * w).sum())
        same = (_blocks(raw_ours[name][1], qtype) == _blocks(raw, qtype)).all(1)
        print(f"  {name:<24} {qtype.name:<6} {e_ours / e_theirs:.5f}  {same.mean():.4f} of {same.size}")
        same_blocks, all_blocks = same_blocks + int(same.sum()), all_blocks + same.size
        err_ours, err_theirs = err_ours + e_ours, err_theirs + e_theirs
        assert e_ours <= 1.01 * e_theirs, name  # tests/test_quant_iq.py's bound on one tensor
    print(f"  all: weighted error ratio {err_ours / err_theirs:.6f}; identical blocks {same_blocks / all_blocks:.4f}")
    assert err_ours <= 1.002 * err_theirs
    assert same_blocks >= 0.9 * all_blocks


def test_llama_imatrix_agrees_with_ours(ours, theirs, model_file, text_file, tok):
    """Our reader reads llama-imatrix's files (both layouts); its statistics and ours, collected on the same
    model, text, chunking (BOS first in each chunk) and token count, agree per column."""
    import llama_cpp

    llm = llama_cpp.Llama(str(model_file), vocab_only=True, verbose=False)
    try:  # the premise: both read the same tokens (llama-imatrix tokenizes with BOS in front, as we do)
        text = text_file.read_text()
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok.encode(text, bos=True)
    finally:
        llm.close()
    mine = imatrix.read(ours["gguf"])
    worst = {}
    for key in ("gguf", "dat", "f32-attention"):
        other = imatrix.read(theirs[key], chunk_size=CTX)
        assert other.chunks == mine.chunks == CHUNKS
        assert set(other.entries) == set(mine.entries) and len(mine.entries) == N_ENTRIES
        print(f"\nllama-imatrix ({key}) vs herd imatrix: max relative difference of the mean squared input per column")
        worst[key] = {}
        for name, e in sorted(mine.entries.items()):
            assert other.entries[name].counts.tolist() == e.counts.tolist() == [float(CTX * CHUNKS)], name
            a, b = mine.weights(name, 1, e.sums.shape[1]), other.weights(name, 1, e.sums.shape[1])
            worst[key][name] = float(((a - b).abs() / b).max())
            print(f"  {name:<24} {worst[key][name]:.2e}")
    # With float32 attention the two collections are the same up to float32 rounding: llama.cpp sums the
    # squares of 512 tokens in float32 where we sum in float64 (measured: at most 2.7e-6).
    assert max(worst["f32-attention"].values()) < 2e-5
    for key in ("gguf", "dat"):
        # At llama-imatrix's defaults (F16 KV cache, flash attention on) every input after the first attention
        # carries F16 rounding (measured: at most 1.3e-3); layer 0's q/k/v inputs, the normed embeddings, do not.
        assert max(worst[key][f"blk.0.attn_{p}.weight"] for p in "qkv") < 2e-5
        assert max(worst[key].values()) < 5e-3


def test_llama_cpp_runs_both_quantizers_files(model_file, ours, work, tok):
    """llama.cpp loads llama-quantize's file and ours (Q4_K_M, both made with our imatrix) and they pick the
    same top tokens."""
    theirs_path, ours_path = work / "llamacpp-run-q4_k_m.gguf", work / "ours-run-q4_k_m.gguf"
    _llama_quantize(model_file, theirs_path, "q4_k_m", ours["gguf"])
    assert herd(["quantize", str(model_file), str(ours_path), "--type", "q4_k_m", "--imatrix", str(ours["gguf"]),
                 "--quiet"]) == 0
    ids = [tok.bos_id, *tok.encode("The river ran north past the stone, and people called it long water.")]
    a, b = _llama_cpp_logits(theirs_path, ids), _llama_cpp_logits(ours_path, ids)
    agree = float((a.argmax(-1) == b.argmax(-1)).mean())
    diff = np.abs(a - b)
    print(f"\nllama.cpp on llama-quantize's file vs ours: top-1 agreement {agree:.2f}; "
          f"|logit difference| max {diff.max():.4f} mean {diff.mean():.5f} (logits std {a.std():.3f})")
    assert agree >= 0.9
    assert diff.mean() < 0.05 * a.std()
