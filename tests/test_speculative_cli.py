"""`herd run --speculative ngram` and `herd run --draft MODEL`: the same greedy text as without, and one-line
errors for flags that cannot work."""

from pathlib import Path

import pytest

from llamaherd.cli import main
from llamaherd.config import ModelConfig

from .conftest import random_model

PROMPT = "one two three four, one two three four, one two three"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A Meta checkpoint folder with the official Llama 3 tokenizer (a real tokenizer: text in, text out)."""
    from llamaherd.checkpoint.base import Checkpoint
    from llamaherd.checkpoint.meta_pth import write
    from llamaherd.tokenizer import Tokenizer

    tok = Tokenizer.llama3()
    config = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tok.vocab_size, multiple_of=32,
                         rope_theta=5e5, max_seq_len=256, tie_embeddings=True)
    dst = tmp_path_factory.mktemp("tiny-llama3")
    write(Checkpoint(config, random_model(config, std=0.5, seed=2).state_dict(), Path(tok.source).parent,
                     tokenizer=tok), dst)
    return dst


def _run(capsys, monkeypatch, tmp_path, *args):
    monkeypatch.setenv("LLAMAHERD_HOME", str(tmp_path))
    code = main(["run", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_speculative_matches_plain(tiny_folder, tmp_path, capsys, monkeypatch):
    base = [str(tiny_folder), "--raw", "--temperature", "0", "--max-tokens", "16"]
    code, plain, err = _run(capsys, monkeypatch, tmp_path, *base, PROMPT)
    assert code == 0, err
    assert plain.strip()
    for extra in (["--speculative", "ngram"], ["--draft", str(tiny_folder), "--num-speculative-tokens", "3"]):
        code, out, err = _run(capsys, monkeypatch, tmp_path, *base, *extra, PROMPT)
        assert code == 0, err
        assert out == plain, extra


def test_run_speculative_flag_errors(tiny_folder, tmp_path, capsys, monkeypatch):
    code, _, err = _run(capsys, monkeypatch, tmp_path, str(tiny_folder), "--num-speculative-tokens", "3", PROMPT)
    assert code == 1 and "--speculative ngram" in err
    code, _, err = _run(capsys, monkeypatch, tmp_path, str(tiny_folder), "--speculative", "ngram",
                        "--num-speculative-tokens", "0", PROMPT)
    assert code == 1 and "num_speculative_tokens" in err and "Traceback" not in err
