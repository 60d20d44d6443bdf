"""The training loop: it learns, packing equals unpacked training, checkpointing options change nothing,
kill -9 and --resume give bit-identical weights, bad input and mismatched resumes leave the checkpoint intact."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llamaherd
from llamaherd.cli import main
from llamaherd.errors import DatasetError, TrainingError
from llamaherd.train.data import collate
from llamaherd.train.loop import TrainConfig, Trainer
from llamaherd.train.losses import token_nll_sum
from llamaherd.lora.layer import LoRAConfig

from .train_fixtures import qa, tiny_folder, write_jsonl

FACTS = [qa(f"What is the code word number {i}?", f"The code word is {w}.")
         for i, w in enumerate(["amber", "birch", "cobalt", "delta", "ember", "fjord", "garnet", "harbor"])]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("base"))[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "facts.jsonl", FACTS)


def _quiet(**kw) -> TrainConfig:
    return TrainConfig(chat_format="gemma3", **kw)


def test_lora_training_lowers_the_loss_and_writes_outputs(base, data, tmp_path):
    cfg = _quiet(lr=2e-2, max_steps=30, batch_size=4, warmup_steps=3, val_fraction=0.25, eval_every=10,
                 lora=LoRAConfig(rank=8, alpha=16, targets=("wq", "wv", "w1", "w2", "w3")))
    lines = []
    summary = Trainer(llamaherd.load(base), data, tmp_path, cfg, log=lines.append).run()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30 and losses[-1] < 0.7 * losses[0]
    assert [r["step"] for r in rows if "val_loss" in r][:3] == [10, 20, 30]
    assert rows[0]["lr"] < rows[3]["lr"] and rows[-2]["lr"] < rows[10]["lr"]  # warmup, then cosine decay
    assert "tok/s" in lines[-1] and "ETA" in lines[-1] and "lr" in lines[-1]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    assert summary["step"] == 30 and summary["val_loss"] is not None
    tuned = llamaherd.load(base, adapter=tmp_path)
    assert any("lora_A" in n for n, _ in tuned.net.named_parameters())


@pytest.mark.parametrize("scheme", ["int8", "int4-g32"])
def test_lora_over_a_weight_only_quantized_base_learns(base, data, tmp_path, scheme):
    """`herd finetune --quantize`: the adapter trains over the frozen int8/int4 codes and loads back over them."""
    from llamaherd.quant.weight_only import Int4Linear, Int8Linear

    assert main(["finetune", str(base), str(data), "--out", str(tmp_path),
                 "--quantize", scheme, "--chat-format", "gemma3", "--lr", "2e-2", "--max-steps", "20",
                 "--target", "wq", "--target", "wv", "--target", "w2", "--log-every", "5"]) == 0
    losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert losses[-1] < 0.7 * losses[0]
    tuned = llamaherd.load(base, adapter=tmp_path, quantize=scheme)
    kind = Int8Linear if scheme == "int8" else Int4Linear
    assert isinstance(tuned.net.layers[0].attention.wq.base, kind)
    with pytest.raises(TrainingError, match="weight-only quantized"):
        llamaherd.train.finetune(base, data, tmp_path / "full", method="full", quantize=scheme,
                                 chat_format="gemma3", max_steps=1)


def test_packing_gives_the_unpacked_losses(base, data):
    """Packed rows (positions reset, block-diagonal attention) give each example exactly its own loss."""
    model = llamaherd.load(base)
    trainer = Trainer(model, data, "/nonexistent-unused", _quiet(pack=True, max_len=256))
    exs = trainer.train_set
    with torch.no_grad():
        packed = trainer._make(exs)
        assert packed.tokens.shape[0] < len(exs)
        together = float(token_nll_sum(trainer._forward(model.net, packed), packed.labels))
        apart = sum(float(token_nll_sum(model.net(b.tokens), b.labels)) for b in (collate([e]) for e in exs))
        wrong = packed.segments.clone().fill_(1)  # one segment per row: examples see each other
        leaked = float(token_nll_sum(model.net(packed.tokens, positions=packed.positions,
                                               key_mask=wrong[:, :, None] == wrong[:, None, :]), packed.labels))
    assert abs(together - apart) <= 1e-4 * apart
    assert abs(leaked - apart) > 1e-3 * apart


@pytest.mark.parametrize("option", ["activation_checkpointing", "grad_accum"])
def test_options_that_must_not_change_the_result(base, data, tmp_path, option):
    def final(**kw):
        out = tmp_path / f"run{len(kw)}{kw.get('batch_size', 4)}"
        cfg = _quiet(lr=1e-2, max_steps=4, seed=5, lora=LoRAConfig(targets=("wq", "w2")), **kw)
        Trainer(llamaherd.load(base), data, out, cfg, log=lambda s: None).run()
        return load_file(str(out / "adapter_model.safetensors"))

    if option == "activation_checkpointing":
        a, b = final(batch_size=4), final(batch_size=4, activation_checkpointing=True)
        tol = 0.0
    else:  # one batch of 8 == two accumulated micro-batches of 4 (same examples: a single bucket window)
        a, b = final(batch_size=8, epochs=4), final(batch_size=4, grad_accum=2, epochs=8)
        tol = 1e-5
    for k in a:
        assert (a[k] - b[k]).abs().max() <= tol, k


def test_bf16_autocast_trains(base, data, tmp_path):
    cfg = _quiet(lr=3e-3, max_steps=3, bf16=True)
    s = Trainer(llamaherd.load(base), data, tmp_path, cfg, log=lambda s: None).run()
    assert s["step"] == 3 and s["loss"] == s["loss"]  # finite, not NaN


def _cli(base, data, out, *extra):
    return [sys.executable, "-m", "llamaherd", "finetune", str(base), str(data), "--out", str(out),
            "--chat-format", "gemma3", "--max-steps", "24", "--batch-size", "2", "--grad-accum", "2", "--lr", "5e-3",
            "--dropout", "0.1", "--target", "wq", "--target", "w1", "--save-every", "1", "--warmup-steps", "2",
            "--seed", "11", *extra]


def test_kill_9_then_resume_is_bit_identical(base, data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli(base, data, tmp_path / "straight"), check=True, env=env, capture_output=True)
    expected = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))

    kill_at = random.Random().randint(3, 18)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(base, data, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_at:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter_model.safetensors").exists(), "the run finished before it was killed"
    done = subprocess.run(_cli(base, data, out, "--resume"), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resumed at step" in done.stderr
    got = load_file(str(out / "adapter_model.safetensors"))
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), f"{k} differs after kill at step ~{kill_at}"
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if "loss" in x]
    assert steps == list(range(1, 25))


def test_bad_input_and_mismatched_resume_keep_the_checkpoint(base, data, tmp_path, capsys):
    out = tmp_path / "run"
    Trainer(llamaherd.load(base), data, out, _quiet(max_steps=2), log=lambda s: None).run()
    ckpt = out / "checkpoint.pt"
    before = ckpt.read_bytes()
    bad = write_jsonl(tmp_path / "bad.jsonl", [FACTS[0], "{oops"])
    with pytest.raises(DatasetError, match=r"bad\.jsonl:2"):
        Trainer(llamaherd.load(base), bad, out, _quiet(max_steps=2)).run(resume=True)
    with pytest.raises(TrainingError, match="other settings"):
        Trainer(llamaherd.load(base), data, out, _quiet(max_steps=2, lr=1.0), log=lambda s: None).run(resume=True)
    assert ckpt.read_bytes() == before
    assert main(["finetune", str(base), str(bad), "--out", str(out), "--chat-format", "gemma3", "--resume"]) == 1
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert ckpt.read_bytes() == before
    long = write_jsonl(tmp_path / "long.jsonl", [qa("q", "a " * 300)])
    assert main(["finetune", str(base), str(long), "--out", str(out), "--chat-format", "gemma3"]) == 1
    assert "long.jsonl:1: example is" in capsys.readouterr().err


def test_dry_run_prints_the_trained_spans(base, data, tmp_path, capsys):
    assert main(["finetune", str(base), str(data), "--out", str(tmp_path / "o"), "--chat-format", "gemma3",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "<start_of_turn>model\n[[The code word is" in out and "<end_of_turn>\n]]" in out
    assert not (tmp_path / "o").exists()


def test_full_finetuning_writes_a_loadable_model(base, data, tmp_path):
    cfg = _quiet(method="full", lr=1e-3, max_steps=3)
    Trainer(llamaherd.load(base), data, tmp_path, cfg, log=lambda s: None).run()
    tuned = llamaherd.load(tmp_path / "model")
    orig = llamaherd.load(base)
    w = "layers.0.attention.wq.weight"
    assert not torch.equal(tuned.net.state_dict()[w], orig.net.state_dict()[w])
