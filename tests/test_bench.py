"""`herd bench`: the weight-bytes count behind the bandwidth ceiling, and the verb end to end on a tiny Q8_0 GGUF."""

import gguf
import torch

from llamaherd.cli import main
from llamaherd.cli.bench import memory_bandwidth, weight_bytes_per_token

from .conftest import TINY, random_model
from .gguf_read_fixtures import write_llama_gguf


def _config_bytes(c, tied: bool) -> int:
    # Independent count from the config: per layer wq, wk, wv, wo, w1, w2, w3 and two norms; final norm;
    # the vocab projection once (tied: the embedding is that projection; untied: the lookup reads one row).
    kv = c.n_kv_heads * c.head_dim
    per_layer = c.dim * c.n_heads * c.head_dim * 2 + c.dim * kv * 2 + 3 * c.dim * c.hidden_dim + 2 * c.dim
    return 4 * (c.n_layers * per_layer + c.dim + c.vocab_size * c.dim)


def test_weight_bytes_count_the_vocab_projection_once():
    for family, tied in (("llama3", False), ("llama3.2", True)):
        c = TINY[family]
        assert c.tie_embeddings is tied
        assert weight_bytes_per_token(random_model(c)) == _config_bytes(c, tied)


def test_bandwidth_probe_is_plausible():
    bw = memory_bandwidth(mib=64, repeat=2)
    assert 1e8 < bw < 1e13  # bytes/s: between 0.1 GB/s and 10 TB/s


def test_herd_bench_runs_on_packed_gguf(tmp_path, capsys):
    c = TINY["llama3"]
    path = tmp_path / "tiny-q8_0.gguf"
    write_llama_gguf(path, c, random_model(c).state_dict(), gguf.GGMLQuantizationType.Q8_0)
    threads = torch.get_num_threads()
    try:
        assert main(["bench", str(path), "-p", "16", "-n", "4", "-r", "1", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "pp16" in out and "tg4" in out and "ceiling" in out
    # Q8_0 weights are counted packed (34 bytes per 32 values), not as float32.
    mb = float(out.split("weights read per token:")[1].split("MB")[0])
    assert mb < _config_bytes(c, False) / 1e6 / 2
