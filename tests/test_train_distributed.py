"""FSDP2 on gloo: `herd finetune --nproc 2` (two CPU processes, fully_shard) follows the single-process loss curve
step by step and writes the same adapter; the step is split by rows, so uneven and empty shares are exercised."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from llamaherd.cli import main

from .train_fixtures import qa, tiny_folder, write_jsonl

# 7 examples in batches of 3: micro-batches of 3, 3 and 1 rows, so the ranks get 2/1 rows, and 1/0 (the rank left
# without rows runs at weight 0 to keep the collectives in step).
DATA = [qa(f"Which colour is item {i}?", f"Item {i} is {c}.")
        for i, c in enumerate(["red", "green", "blue", "amber", "violet", "teal", "ochre"])]
STEPS = 20


def _losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_bad_process_counts_are_refused_before_anything_starts(tmp_path, capsys):
    base, _ = tiny_folder(tmp_path / "base")
    data = write_jsonl(tmp_path / "data.jsonl", DATA)
    assert main(["finetune", str(base), str(data), "--out", str(tmp_path / "o"), "--nproc", "0"]) == 1
    assert "--nproc must be at least 1" in capsys.readouterr().err
    assert main(["finetune", str(base), str(data), "--out", str(tmp_path / "o"), "--nproc", "2",
                 "--method", "qlora"]) == 1
    assert "cannot be sharded" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _args(base, data, method: str = "lora") -> list[str]:
    return [str(base), str(data), "--method", method, "--chat-format", "gemma3", "--max-steps", str(STEPS),
            "--batch-size", "3", "--grad-accum", "2", "--lr", "1e-2", "--warmup-steps", "2", "--clip", "1.0",
            "--target", "wq", "--target", "wv", "--target", "w2", "--log-every", "100"]


@pytest.mark.parametrize("method", ["lora", pytest.param("full", marks=pytest.mark.slow)])
def test_two_process_fsdp_follows_the_single_process_curve(tmp_path, method):
    base, _ = tiny_folder(tmp_path / "base")
    data = write_jsonl(tmp_path / "data.jsonl", DATA)
    common = _args(base, data, method)
    assert main(["finetune", *common, "--out", str(tmp_path / "one")]) == 0
    assert main(["finetune", *common, "--out", str(tmp_path / "two"), "--nproc", "2"]) == 0
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == STEPS
    assert one[-1] < 0.8 * one[0]  # it learns, so the curves have a shape to follow
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-4, list(zip(one, two))
    if method == "lora":
        a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("one", "two"))
    else:
        a, b = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("one", "two"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-4


@pytest.mark.slow
def test_a_single_process_checkpoint_resumes_in_two_processes(tmp_path):
    """Checkpoints hold whole tensors (weights and AdamW moments gathered): 10 steps in one process, the other 10
    resumed under FSDP in two, land where 20 steps in one process do."""
    import llamaherd
    from llamaherd.lora.layer import LoRAConfig
    from llamaherd.train.loop import TrainConfig, Trainer

    base, _ = tiny_folder(tmp_path / "base")
    data = write_jsonl(tmp_path / "data.jsonl", DATA)
    assert main(["finetune", *_args(base, data), "--out", str(tmp_path / "straight")]) == 0
    config = TrainConfig(lora=LoRAConfig(targets=("wq", "wv", "w2")), lr=1e-2, max_steps=STEPS, batch_size=3,
                         grad_accum=2, warmup_steps=2, clip=1.0, log_every=100, chat_format="gemma3")
    Trainer(llamaherd.load(base), data, tmp_path / "split", config, log=lambda _: None).run(stop_after=STEPS // 2)
    assert len(_losses(tmp_path / "split")) == STEPS // 2
    assert main(["finetune", *_args(base, data), "--out", str(tmp_path / "split"), "--nproc", "2", "--resume"]) == 0
    straight, split = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
    assert len(split) == STEPS and max(abs(a - b) for a, b in zip(straight, split)) <= 1e-4
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("straight", "split"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-4
