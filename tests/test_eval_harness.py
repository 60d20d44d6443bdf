"""lm-evaluation-harness: the `llamaherd` backend, and `herd serve` through lm-eval's `local-completions`, score a
tiny local task (tests/eval_data/tiny_tasks.jsonl: no hub download) the same way.

Three tasks over one JSONL file, one per request type: multiple choice (loglikelihood), word perplexity of
whole texts (loglikelihood_rolling) and greedy answers cut at a newline (generate_until).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="install llamaherd[test] (lm-eval)")

DATA = Path(__file__).parent / "eval_data" / "tiny_tasks.jsonl"

TASKS = {
    "herd_tiny_mc": """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
""",
    "herd_tiny_rolling": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""",
    "herd_tiny_gen": """output_type: generate_until
doc_to_text: "Q: {{question}}\\nA:"
doc_to_target: "{{target}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


def write_tasks(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in TASKS.items():
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {DATA}\n"
            f"test_split: test\n{body}")
    return folder


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from llamaherd.checkpoint.gguf_write import write
    from llamaherd.config import ModelConfig
    from llamaherd.tokenizer import Tokenizer

    from .gguf_write_fixtures import checkpoint

    tok = Tokenizer.llama3()
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, multiple_of=32,
                         rope_theta=5e5, max_seq_len=512)
    return write(checkpoint(config, tokenizer=tok, std=0.3, seed=5), tmp_path_factory.mktemp("m") / "tiny.gguf",
                 qtype="f32")


def evaluate(model: str, model_args: str | dict, tmp_path: Path) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    importlib.import_module("llamaherd.eval.harness")  # registers the backend

    out = simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS),
                          task_manager=TaskManager(include_path=str(write_tasks(tmp_path))), random_seed=0,
                          numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0, log_samples=True)
    return out


def scores(out: dict) -> dict:
    return {task: {k: v for k, v in res.items() if k != "alias" and "stderr" not in k}
            for task, res in out["results"].items()}


def test_backend_scores_the_tiny_task(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = evaluate("llamaherd", f"pretrained={tiny_gguf},batch_size=4", tmp_path)
    got = scores(out)
    assert set(got) == set(TASKS)
    assert 0.0 <= got["herd_tiny_mc"]["acc,none"] <= 1.0
    assert got["herd_tiny_rolling"]["word_perplexity,none"] > 1.0
    # The backend's numbers are the model's: each multiple-choice log-likelihood recomputed from Model.logits.
    import torch

    import llamaherd

    model = llamaherd.load(tiny_gguf)
    tok = model.tokenizer
    for sample in out["samples"]["herd_tiny_mc"]:
        ctx, cont = sample["arguments"][0]
        ids = tok.encode(ctx + cont, bos=True)
        n_ctx = len(tok.encode(ctx, bos=True))
        logp = torch.log_softmax(model.logits(ids[:-1]).double(), -1)
        want = sum(logp[i - 1, ids[i]].item() for i in range(n_ctx, len(ids)))
        assert sample["resps"][0][0][0] == pytest.approx(want, rel=1e-6, abs=1e-6)


def test_lm_eval_command_line(tiny_gguf, tmp_path):
    """`python -m llamaherd.eval.harness` is lm-eval's own command line with `--model llamaherd` registered."""
    run = subprocess.run([sys.executable, "-m", "llamaherd.eval.harness", "--model", "llamaherd", "--model_args",
                          f"pretrained={tiny_gguf}", "--tasks", "herd_tiny_mc", "--include_path",
                          str(write_tasks(tmp_path)), "--limit", "2"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "herd_tiny_mc" in run.stdout and "acc" in run.stdout


def test_served_model_scores_the_same_through_local_completions(tiny_gguf, tmp_path, monkeypatch):
    """`herd serve` (the app, on loopback) with lm-eval's own `local-completions` client: token ids from the
    server's /tokenize, log-probabilities from echo + logprobs on /v1/completions, generations through the
    serving engine. lm-eval's remote tokenizer sends no BOS, so the in-process backend runs without it too."""
    import llamaherd
    from llamaherd.server import ServedModel

    from .server_fixtures import LiveServer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    served = ServedModel(llamaherd.load(tiny_gguf), "tiny", kv_cache_bytes=64 << 20)
    live = LiveServer(served)
    try:
        remote = evaluate("local-completions", f"base_url={live.url}/v1/completions,model=tiny,"
                          "tokenizer_backend=remote,tokenized_requests=True,num_concurrent=1,max_retries=1",
                          tmp_path / "remote")
    finally:
        live.stop()
    local = evaluate("llamaherd", f"pretrained={tiny_gguf},add_bos_token=False", tmp_path / "local")
    for task in TASKS:
        for a, b in zip(remote["samples"][task], local["samples"][task]):
            assert a["arguments"] == b["arguments"]
            if task == "herd_tiny_gen":
                assert a["resps"] == b["resps"]
            else:
                np.testing.assert_allclose(np.array(a["resps"], dtype=float), np.array(b["resps"], dtype=float),
                                           rtol=1e-4, atol=1e-4)
    got, want = scores(remote), scores(local)
    assert got.keys() == want.keys()
    for task in want:
        numbers = {k for k, v in want[task].items() if isinstance(v, float)}
        assert numbers and got[task].keys() == want[task].keys(), task
        assert {k: got[task][k] for k in numbers} == pytest.approx({k: want[task][k] for k in numbers}, rel=1e-4)
