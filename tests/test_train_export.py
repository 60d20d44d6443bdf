"""herd export --merge: a trained adapter folded into its base, written as HF (checked with transformers + PEFT's own
merge), Meta and GGUF (read back by llamaherd and by llama.cpp's gguf-py reader)."""

from __future__ import annotations

import pytest
import torch

import llamaherd
from llamaherd.cli import main
from llamaherd.lora.peft import save_adapter
from llamaherd.lora.layer import LoRAConfig, apply_lora, lora_modules

from .train_fixtures import CONFIG, tiny_folder

TOKENS = torch.randint(0, CONFIG.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base folder, adapter folder, transformers base model, our model with the adapter applied)."""
    root = tmp_path_factory.mktemp("export")
    folder, ref = tiny_folder(root / "base")
    model = llamaherd.load(folder)
    lora = LoRAConfig(rank=4, alpha=8.0, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    apply_lora(model.net, lora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model.net).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)
    adapter = save_adapter(model.net, model.config, lora, root / "adapter")
    return folder, adapter, ref, model


def test_merged_hf_equals_peft_merge_and_unload(trained, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    folder, adapter, ref, model = trained
    assert main(["export", str(folder), str(tmp_path / "hf"), "--adapter", str(adapter), "--merge", "--to", "hf"]) == 0
    ours = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    theirs = PeftModel.from_pretrained(ref, str(adapter)).merge_and_unload().eval()
    with torch.no_grad():
        a, b = ours(input_ids=TOKENS).logits, theirs(input_ids=TOKENS).logits
        c = model.net(TOKENS)
    assert (a - b).abs().max() <= 1e-4
    assert (a - c).abs().max() <= 1e-4


def test_merged_meta_and_gguf_read_back(trained, tmp_path):
    folder, adapter, _, model = trained
    with torch.no_grad():
        want = model.net(TOKENS)
    assert main(["export", str(folder), str(tmp_path / "meta"), "--adapter", str(adapter), "--merge", "--to", "meta"]) == 0
    with torch.no_grad():
        assert (llamaherd.load(tmp_path / "meta").net(TOKENS) - want).abs().max() <= 1e-4
    gguf = tmp_path / "m.gguf"
    assert main(["export", str(folder), str(gguf), "--adapter", str(adapter), "--merge", "--to", "gguf",
                 "--type", "f32"]) == 0
    with torch.no_grad():
        assert (llamaherd.load(gguf).net(TOKENS) - want).abs().max() <= 1e-4
    q = tmp_path / "q.gguf"
    assert main(["export", str(folder), str(q), "--adapter", str(adapter), "--merge", "--to", "gguf",
                 "--type", "q8_0"]) == 0
    from gguf import GGUFReader

    types = {t.name: t.tensor_type.name for t in GGUFReader(str(q)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0"


def test_export_refuses_a_foreign_adapter(trained, tmp_path, capsys):
    _, adapter, _, _ = trained
    other, _ = tiny_folder(tmp_path / "other", CONFIG.replace(dim=128))
    assert main(["export", str(other), str(tmp_path / "x"), "--adapter", str(adapter), "--merge", "--to", "hf"]) == 1
    assert "another base model" in capsys.readouterr().err


def test_herd_run_with_adapter_generates_what_the_adapted_model_does(trained, capsys):
    folder, adapter, _, model = trained
    want = model.generate("hello there", max_tokens=8, temperature=0)
    plain = llamaherd.load(folder).generate("hello there", max_tokens=8, temperature=0)
    assert want != plain  # the adapter changes the continuation, so the check below can fail
    assert main(["run", str(folder), "--adapter", str(adapter), "--temperature", "0", "--max-tokens", "8",
                 "hello there"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == want.rstrip("\n")


def test_herd_chat_with_adapter_replies_as_the_adapted_model(trained, tmp_path, monkeypatch, capsys):
    import io

    folder, adapter, _, _ = trained
    want, plain = _reply(llamaherd.load(folder, adapter=adapter)), _reply(llamaherd.load(folder))
    assert want != plain  # the adapter changes the reply, so the check below can fail
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n/bye\n"))
    assert main(["chat", str(folder), "--adapter", str(adapter), "--chat-format", "gemma3", "--temperature", "0",
                 "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip("\n") == want.strip("\n")
    other, _ = tiny_folder(tmp_path / "other", CONFIG.replace(dim=128))
    assert main(["chat", str(other), "--adapter", str(adapter), "--chat-format", "gemma3"]) == 1
    assert "another base model" in capsys.readouterr().err


def _reply(model) -> str:
    """The model's greedy 8-token reply to one user turn in the gemma3 format (what herd chat prints). "hi" because
    the tiny model has 272 rows for a 261-token byte tokenizer: its replies to some prompts leave the vocabulary."""
    model.checkpoint.metadata["chat_format"] = "gemma3"
    pieces = model.chat([{"role": "user", "content": "hi"}], stream=True, max_tokens=8, temperature=0)
    return "".join(pieces)
