"""Round trips between formats (Meta -> HF -> Meta bit-identical), sharded writing, HF metadata, `herd convert`."""

from __future__ import annotations

import json

import pytest
import torch

from llamaherd.checkpoint import Checkpoint, hf, meta_pth
from llamaherd.checkpoint.save import WRITERS, save
from llamaherd.cli import main as herd
from tests.checkpoint_fixtures import meta_params, save_meta_folder
from tests.conftest import TINY, random_model


def _meta_state_dict(c, seed=0, dtype=torch.float32):
    """A state dict in Meta's file layout (tied models carry output = tok_embeddings, as Meta ships them)."""
    sd = {k: v.detach().to(dtype).clone() for k, v in random_model(c, seed=seed).state_dict().items()}
    if c.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"].clone()
    return sd


def _pth(folder, i=0):
    return torch.load(folder / f"consolidated.{i:02d}.pth", weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", sorted(TINY))
def test_meta_hf_meta_bit_identical(family, dtype, tmp_path):
    c = TINY[family]
    original = _meta_state_dict(c, dtype=dtype)
    save_meta_folder(original, meta_params(c), tmp_path / "a")
    save(meta_pth.read(tmp_path / "a"), tmp_path / "hf", "hf")
    save(hf.read(tmp_path / "hf"), tmp_path / "b", "meta")
    again = _pth(tmp_path / "b")
    assert set(again) == set(original)
    for name, t in original.items():
        assert again[name].dtype == dtype and torch.equal(again[name], t), name
    back = meta_pth.read(tmp_path / "b").config
    assert back.hidden_dim == c.hidden_dim and back.rope_scaling == c.rope_scaling
    assert back.tie_embeddings == c.tie_embeddings


@pytest.mark.parametrize("family,embedding_dim", [("llama3", 0), ("llama2", 1)])
def test_meta_writer_shards_like_fairscale(family, embedding_dim, tmp_path):
    """Our --shards output equals a split done by the reference rules in checkpoint_fixtures, file by file."""
    c = TINY[family]
    sd = _meta_state_dict(c)
    save_meta_folder(sd, meta_params(c), tmp_path / "expected", shards=2, embedding_dim=embedding_dim)
    ckpt = meta_pth.read(tmp_path / "expected")
    save(ckpt, tmp_path / "ours", "meta", shards=2, embedding_dim=embedding_dim)
    for i in range(2):
        ours, expected = _pth(tmp_path / "ours", i), _pth(tmp_path / "expected", i)
        assert set(ours) == set(expected)
        for name in expected:
            assert torch.equal(ours[name], expected[name]), (i, name)
    merged = meta_pth.read(tmp_path / "ours").state_dict
    for name, t in sd.items():
        assert torch.equal(merged[name], t), name


def test_hf_sharded_output_with_index(tmp_path):
    c = TINY["llama3"]
    ckpt = Checkpoint(config=c, state_dict=random_model(c).state_dict(), source=tmp_path)
    hf.write(ckpt, tmp_path / "hf", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((tmp_path / "hf" / f).exists() for f in files)
    back = hf.read(tmp_path / "hf")
    for name, t in ckpt.state_dict.items():
        assert torch.equal(back.state_dict[name], t), name


def _tiny_hf_folder(tmp_path, config_overrides=None, files=None):
    """A folder transformers itself wrote, with extra files (generation config, tokenizer config) on top."""
    from tests.checkpoint_fixtures import hf_reference

    ref = hf_reference(TINY["llama3.2"])
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(config_overrides or {})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for name, text in (files or {}).items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_hf_generation_config_and_chat_template(tmp_path):
    folder = _tiny_hf_folder(tmp_path, files={
        "generation_config.json": json.dumps({"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
                                              "temperature": 0.6, "top_p": 0.9}),
        "tokenizer_config.json": json.dumps({"chat_template": "{{ messages[0]['content'] }}"}),
    })
    ckpt = hf.read(folder)
    g = ckpt.generation
    assert (g.eos_token_ids, g.bos_token_id, g.temperature, g.top_p) == ((128001, 128008, 128009), 128000, 0.6, 0.9)
    assert ckpt.chat_template == "{{ messages[0]['content'] }}"
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    (folder / "chat_template.jinja").write_text("jinja file wins")
    ckpt = hf.read(folder)
    assert ckpt.generation.eos_token_ids == (2,) and ckpt.chat_template == "jinja file wins"
    hf.write(ckpt, tmp_path / "out")
    out = hf.read(tmp_path / "out")
    assert out.generation.eos_token_ids == (2,) and out.chat_template == "jinja file wins"


def test_hf_rope_factor_from_file_legacy_spelling(tmp_path):
    """Llama 3.2 1B/3B configs say factor 32 in transformers-4 spelling; the file's factor is used."""
    legacy = {"rope_parameters": None, "rope_theta": 500000.0,
              "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    c = hf.read(_tiny_hf_folder(tmp_path, legacy)).config
    assert c.rope_theta == 500000.0 and c.rope_scaling.factor == 32.0 and c.rope_scaling.kind == "llama3"


def test_meta_params_scaling_defaults_to_factor_8(tmp_path):
    c = TINY["llama3.2"]
    save_meta_folder(_meta_state_dict(c), meta_params(c), tmp_path)
    assert meta_pth.read(tmp_path).config.rope_scaling.factor == 8.0


def test_meta_tied_output_written_back(tmp_path):
    c = TINY["llama3.2"]
    ckpt = Checkpoint(config=c, state_dict=random_model(c).state_dict(), source=tmp_path)
    assert "output.weight" not in ckpt.state_dict
    meta_pth.write(ckpt, tmp_path / "m")
    sd = _pth(tmp_path / "m")
    assert torch.equal(sd["output.weight"], sd["tok_embeddings.weight"])


def test_herd_convert_cli(tmp_path, capsys):
    c = TINY["llama3"]
    save_meta_folder(_meta_state_dict(c), meta_params(c), tmp_path / "meta")
    assert herd(["convert", str(tmp_path / "meta"), str(tmp_path / "hf"), "--to", "hf", "--dtype", "bf16"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert herd(["convert", str(tmp_path / "hf"), str(tmp_path / "m2"), "--to", "meta", "--shards", "2"]) == 0
    assert (tmp_path / "m2" / "consolidated.01.pth").exists()
    back = meta_pth.read(tmp_path / "m2")
    original = _pth(tmp_path / "meta")
    for name, t in original.items():
        assert torch.equal(back.state_dict[name], t.to(torch.bfloat16)), name
    assert herd(["convert", str(tmp_path / "meta"), str(tmp_path / "x"), "--to", "meta", "--shards", "3"]) == 1
    assert "--shards 3" in capsys.readouterr().err


def test_gguf_entry_in_writers_table():
    from llamaherd.checkpoint import gguf_write

    assert WRITERS["gguf"] is gguf_write.write


def test_llama4_through_meta_and_hf_readers(tmp_path):
    """Llama 4 folders go through the same readers/writers (names from checkpoint/llama4.py); transformers runs ours."""
    from transformers import Llama4ForCausalLM

    from tests.test_llama4 import CONFIG, PARAMS

    net = random_model(CONFIG, seed=2)
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "params.json").write_text(json.dumps(PARAMS))
    torch.save(sd, tmp_path / "meta" / "consolidated.00.pth")
    ckpt = meta_pth.read(tmp_path / "meta")
    assert ckpt.config == CONFIG
    save(ckpt, tmp_path / "hf", "hf")
    back = hf.read(tmp_path / "hf")
    assert back.config.moe == CONFIG.moe and set(back.state_dict) == set(sd)
    for name, t in sd.items():
        assert torch.equal(back.state_dict[name], t), name
    ref = Llama4ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = torch.randint(0, CONFIG.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (net(tokens) - ref(tokens).logits.float()).abs().max().item()
    assert diff <= 1e-4


def test_tokenizer_attached_and_carried_across_formats(tmp_path):
    """Meta's official Llama 3 tokenizer.model beside the weights is attached, and copied on conversion."""
    import shutil
    from pathlib import Path

    import llama_models

    pytest.importorskip("llamaherd.tokenizer")
    official = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    c = TINY["llama3"]
    save_meta_folder(_meta_state_dict(c), meta_params(c), tmp_path / "meta")
    shutil.copyfile(official, tmp_path / "meta" / "tokenizer.model")
    ckpt = meta_pth.read(tmp_path / "meta")
    assert ckpt.tokenizer is not None and ckpt.tokenizer.kind == "tiktoken"
    # "<|begin_of_text|>" is 128000 in Meta's Llama 3 tokenizer (llama-models llama3/tokenizer.py).
    assert ckpt.tokenizer.special_id("<|begin_of_text|>") == 128000
    save(ckpt, tmp_path / "hf", "hf")
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == official.read_bytes()
    assert hf.read(tmp_path / "hf").tokenizer.encode("hello world") == ckpt.tokenizer.encode("hello world")


def test_hf_pytorch_bin_weights(tmp_path):
    """Older HF folders ship pytorch_model.bin; read with weights_only like Meta's .pth."""
    from tests.checkpoint_fixtures import hf_reference

    ref = hf_reference(TINY["llama3"])
    ref.save_pretrained(tmp_path / "a")
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    (tmp_path / "a" / "model.safetensors").unlink()
    torch.save(sd, tmp_path / "a" / "pytorch_model.bin")
    ckpt = hf.read(tmp_path / "a")
    assert torch.equal(ckpt.state_dict["norm.weight"], sd["model.norm.weight"])
    assert "output.weight" in ckpt.state_dict and len(ckpt.state_dict) == 3 + 9 * TINY["llama3"].n_layers


def test_llama2_params_vocab_minus_one(tmp_path):
    """Llama 2's params.json says vocab_size -1; the vocabulary comes from tok_embeddings."""
    c = TINY["llama2"]
    save_meta_folder(_meta_state_dict(c), {**meta_params(c), "vocab_size": -1}, tmp_path)
    assert meta_pth.read(tmp_path).config.vocab_size == c.vocab_size


def test_herd_convert_to_gguf_and_back(tmp_path):
    """The gguf row of WRITERS reaches the GGUF writer; the GGUF reader gives the same logits."""
    pytest.importorskip("llamaherd.checkpoint.gguf_write")
    pytest.importorskip("llamaherd.checkpoint.gguf")
    from llamaherd.checkpoint import materialize, read

    c = TINY["llama3.2"]
    sd = _meta_state_dict(c)
    save_meta_folder(sd, meta_params(c), tmp_path / "meta")
    assert herd(["convert", str(tmp_path / "meta"), str(tmp_path / "m.gguf"), "--to", "gguf", "--dtype", "f32"]) == 0
    net, back = materialize(meta_pth.read(tmp_path / "meta")), materialize(read(tmp_path / "m.gguf"))
    tokens = torch.randint(0, c.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(net(tokens), back(tokens))
