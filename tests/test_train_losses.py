"""DPO against TRL's DPOTrainer loss on one batch (value and adapter gradients); the distillation loss against its
formula computed independently; the teacher cache."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import llamaherd
from llamaherd.lora.peft import hf_module_name, save_adapter
from llamaherd.train.data import IGNORE
from llamaherd.train.loop import TrainConfig, Trainer
from llamaherd.train.losses import kd_loss_sum, teacher_topk
from llamaherd.lora.layer import LoRAConfig, lora_modules

from .train_fixtures import CONFIG, tiny_folder, write_jsonl

PAIRS = [{"prompt": "Is the sky blue?", "chosen": " Yes, on clear days.", "rejected": " No."},
         {"prompt": "2+2=", "chosen": "4", "rejected": "five, I think"},
         {"prompt": "Capital of France:", "chosen": " Paris", "rejected": " Lyon or maybe Rome"}]


def _trl_dpo_loss(peft_model, batch, beta):
    """TRL's `DPOTrainer._compute_loss` on the batch (chosen rows then rejected rows), reference = adapters off."""
    from trl import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(peft_model.get_base_model(), outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    accel = SimpleNamespace(device=torch.device("cpu"), unwrap_model=lambda m: m, gather_for_metrics=lambda x: x,
                            gather=lambda x: x)
    trainer = SimpleNamespace(
        model=peft_model, accelerator=accel, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=False,
        ref_model=None, args=SimpleNamespace(gradient_checkpointing_kwargs=None), f_divergence_type="reverse_kl",
        loss_types=["sigmoid"], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    lengths = (batch.labels != IGNORE).long()
    # TRL's completion_mask marks completion tokens; ours marks positions whose *next* token is trained.
    completion = torch.zeros_like(batch.tokens)
    completion[:, 1:] = lengths[:, :-1]
    attention = torch.zeros_like(batch.tokens)
    for b in range(batch.tokens.shape[0]):
        last = int(completion[b].nonzero().max()) + 1
        attention[b, :last] = 1
    inputs = {"input_ids": batch.tokens, "attention_mask": attention, "completion_mask": completion}
    out = DPOTrainer._compute_loss(trainer, peft_model, inputs, return_outputs=False)
    return out[0] if isinstance(out, tuple) else out


def test_dpo_loss_and_gradients_equal_trl(tmp_path):
    from peft import PeftModel

    folder, ref = tiny_folder(tmp_path / "base")
    model = llamaherd.load(folder)
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    lora = LoRAConfig(rank=4, alpha=8.0, targets=("wq", "wv", "w1", "w2"))
    trainer = Trainer(model, data, tmp_path / "out", TrainConfig(method="dpo", lora=lora, beta=0.2, chat_format="gemma3"))
    trainer._prepare_model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora_modules(model.net).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)
    adapter = save_adapter(model.net, model.config, lora, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(ref, str(adapter), is_trainable=True).float()

    pairs = trainer.train_set
    batch = trainer._make(pairs)
    ours_sum, n = trainer._loss_sum(batch, pairs, list(range(len(pairs))))
    ours = ours_sum / n
    ours.backward()
    theirs = _trl_dpo_loss(peft_model, batch, beta=0.2)
    theirs.backward()
    assert abs(float(ours) - float(theirs)) <= 1e-5
    assert abs(float(ours) - 0.6931) > 1e-3  # not the trivial log 2 of an adapter equal to the reference
    params = dict(peft_model.named_parameters())
    for name, m in lora_modules(model.net).items():
        hf = hf_module_name(name, model.config)
        theirs_a = params[f"base_model.model.{hf}.lora_A.default.weight"].grad
        scale = max(1.0, theirs_a.abs().max().item())
        assert (m.lora_A.weight.grad - theirs_a).abs().max() <= 1e-5 * scale, name
        if not name.endswith("wq"):  # wq's lora_B rows are permuted in HF order; A is compared for it
            theirs_b = params[f"base_model.model.{hf}.lora_B.default.weight"].grad
            assert (m.lora_B.weight.grad - theirs_b).abs().max() <= 1e-5 * max(1.0, theirs_b.abs().max().item()), name


def _kd_reference(student, labels, t_logits, k, temperature):
    """KL(p || q) over the teacher's top-k, one position at a time in float64 with explicit sums."""
    total = 0.0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            if labels[b, t] == IGNORE:
                continue
            tl = t_logits[b, t].double()
            top = sorted(range(tl.numel()), key=lambda i: -float(tl[i]))[:k]
            z = [float(tl[i]) / temperature for i in top]
            m = max(z)
            p = [pow(2.718281828459045, v - m) for v in z]
            s = sum(p)
            p = [v / s for v in p]
            sl = student[b, t].double() / temperature
            log_norm = float(torch.logsumexp(sl, 0))
            for pi, i in zip(p, top):
                total += pi * (torch.log(torch.tensor(pi, dtype=torch.float64)).item() - (float(sl[i]) - log_norm))
    return total * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_loss_equals_its_formula(temperature):
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 5, 40, generator=g) * 3, torch.randn(2, 5, 40, generator=g) * 3
    labels = torch.full((2, 5), IGNORE)
    labels[0, 1:4] = 7
    labels[1, 0] = 3
    values, ids = teacher_topk(teacher, labels, k=6)
    ours = float(kd_loss_sum(student, labels, values, ids, temperature))
    assert abs(ours - _kd_reference(student, labels, teacher, 6, temperature)) <= 1e-5 * max(1, abs(ours))
    # With k = vocabulary size it is the full KL divergence (torch's kl_div as a second reference).
    values, ids = teacher_topk(teacher, labels, k=40)
    mask = labels != IGNORE
    full = torch.nn.functional.kl_div((student[mask] / temperature).log_softmax(-1),
                                      (teacher[mask] / temperature).log_softmax(-1), log_target=True,
                                      reduction="sum") * temperature**2
    assert abs(float(kd_loss_sum(student, labels, values, ids, temperature)) - float(full)) <= 1e-4


def test_distillation_caches_teacher_logits_once(tmp_path):
    folder, _ = tiny_folder(tmp_path / "student", seed=0)
    tfolder, _ = tiny_folder(tmp_path / "teacher", seed=1, std=0.2)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "completion": f" answer {i}"} for i in range(6)])
    cfg = TrainConfig(method="distill", max_steps=3, batch_size=2, kd_topk=8, lr=1e-2)
    first = Trainer(llamaherd.load(folder), data, tmp_path / "out", cfg, teacher=llamaherd.load(tfolder), log=lambda s: None)
    summary = first.run()
    cache = tmp_path / "out" / "teacher_topk.pt"
    assert cache.is_file() and summary["step"] == 3
    stamp = cache.stat().st_mtime_ns
    second = Trainer(llamaherd.load(folder), data, tmp_path / "out", cfg, teacher=llamaherd.load(tfolder), log=lambda s: None)
    second.run()
    assert cache.stat().st_mtime_ns == stamp  # reused, not recomputed
    ex = first.train_set[0]
    assert second.teacher_cache["values"][0].shape == (sum(ex.trained[1:]), 8)
