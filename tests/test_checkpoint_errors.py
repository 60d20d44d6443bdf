"""Bad checkpoints raise CheckpointError naming the file and the problem; pickled code never runs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from llamaherd.checkpoint import Checkpoint, hf, materialize, meta_pth, read
from llamaherd.errors import CheckpointError
from tests.checkpoint_fixtures import meta_params, save_meta_folder
from tests.conftest import TINY, random_model

C = TINY["llama3"]


@pytest.fixture
def meta_dir(tmp_path):
    sd = {k: v.clone() for k, v in random_model(C).state_dict().items()}
    return save_meta_folder(sd, meta_params(C), tmp_path / "meta")


@pytest.fixture
def hf_dir(tmp_path):
    ckpt = Checkpoint(config=C, state_dict=random_model(C).state_dict(), source=tmp_path)
    return hf.write(ckpt, tmp_path / "hf")


def _raises(match, fn, *args):
    with pytest.raises(CheckpointError, match=match) as info:
        fn(*args)
    return info.value


def _load(path):
    return materialize(read(path))


# -- missing files / config ----------------------------------------------------------------------


def test_missing_params_json(meta_dir):
    (meta_dir / "params.json").unlink()
    err = _raises("params.json is missing", meta_pth.read, meta_dir)
    assert err.path == meta_dir


def test_missing_config_json(hf_dir):
    (hf_dir / "config.json").unlink()
    _raises("config.json is missing", hf.read, hf_dir)


def test_invalid_params_json(meta_dir):
    (meta_dir / "params.json").write_text("{dim: 64")
    err = _raises("not valid JSON", meta_pth.read, meta_dir)
    assert err.path.name == "params.json"


def test_config_missing_field(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    del cfg["intermediate_size"]
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    _raises("lacks 'intermediate_size'", hf.read, hf_dir)


def test_unsupported_rope_type(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    _raises("rope type 'yarn' is not supported", hf.read, hf_dir)


# -- tensors missing, extra, mis-shaped ----------------------------------------------------------


def test_meta_missing_tensor(meta_dir):
    sd = torch.load(meta_dir / "consolidated.00.pth", weights_only=True)
    del sd["layers.1.feed_forward.w3.weight"]
    torch.save(sd, meta_dir / "consolidated.00.pth")
    _raises(r"missing layers\.1\.feed_forward\.w3\.weight", _load, meta_dir)


def test_meta_extra_tensor(meta_dir):
    sd = torch.load(meta_dir / "consolidated.00.pth", weights_only=True)
    sd["layers.9.attention.wq.weight"] = torch.zeros(64, 64)
    torch.save(sd, meta_dir / "consolidated.00.pth")
    _raises(r"unexpected layers\.9\.attention\.wq\.weight", _load, meta_dir)


def test_meta_misshaped_tensor(meta_dir):
    sd = torch.load(meta_dir / "consolidated.00.pth", weights_only=True)
    sd["layers.0.feed_forward.w1.weight"] = torch.zeros(10, 64)
    torch.save(sd, meta_dir / "consolidated.00.pth")
    _raises(r"layers\.0\.feed_forward\.w1\.weight has shape \(10, 64\)", _load, meta_dir)


def test_hf_missing_tensor(hf_dir):
    from safetensors.torch import load_file

    sd = load_file(hf_dir / "model.safetensors")
    del sd["model.norm.weight"]
    save_file(sd, hf_dir / "model.safetensors")
    _raises(r"missing norm\.weight", _load, hf_dir)


def test_hf_unknown_tensor_name(hf_dir):
    from safetensors.torch import load_file

    sd = load_file(hf_dir / "model.safetensors")
    sd["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(sd, hf_dir / "model.safetensors")
    _raises(r"unknown Hugging Face tensor name 'model\.layers\.0\.self_attn\.q_norm\.weight'", hf.read, hf_dir)


def test_hf_misshaped_projection(hf_dir):
    from safetensors.torch import load_file

    sd = load_file(hf_dir / "model.safetensors")
    sd["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(64, 64)  # config: 2 kv heads x 16 = 32 rows
    save_file(sd, hf_dir / "model.safetensors")
    _raises(r"k_proj\.weight has shape \(64, 64\), config\.json implies \(32, 64\)", hf.read, hf_dir)


def test_hf_index_names_missing_file(tmp_path):
    ckpt = Checkpoint(config=C, state_dict=random_model(C).state_dict(), source=tmp_path)
    folder = hf.write(ckpt, tmp_path / "hf", max_shard_bytes=40_000)
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    err = _raises("listed in model.safetensors.index.json but missing", hf.read, folder)
    assert err.path == victim


# -- damaged and hostile files -------------------------------------------------------------------


def test_truncated_pth(meta_dir):
    f = meta_dir / "consolidated.00.pth"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    err = _raises("truncated or corrupt", meta_pth.read, meta_dir)
    assert err.path == f


def test_truncated_safetensors(hf_dir):
    f = hf_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    err = _raises("not a readable safetensors file", hf.read, hf_dir)
    assert err.path == f


def test_not_a_safetensors_file(hf_dir):
    f = hf_dir / "model.safetensors"
    f.write_bytes(b"<html>404 Not Found</html>" * 10)
    _raises("not a readable safetensors file", hf.read, hf_dir)


class _Payload:
    """Unpickling this calls exec, which creates the marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def test_pickled_code_is_refused_and_never_runs(meta_dir):
    marker = meta_dir / "PWNED"
    f = meta_dir / "consolidated.00.pth"
    sd = torch.load(f, weights_only=True)
    sd["evil"] = _Payload(marker)
    torch.save(sd, f)
    err = _raises("refused to unpickle", meta_pth.read, meta_dir)
    assert err.path == f
    assert not marker.exists()
    # The payload is live: a plain unpickle would have run it (so the check above can fail).
    torch.load(f, weights_only=False)
    assert marker.read_text() == "pwned"


# -- shards that disagree ------------------------------------------------------------------------


def _two_shards(tmp_path):
    sd = {k: v.clone() for k, v in random_model(C).state_dict().items()}
    return save_meta_folder(sd, meta_params(C), tmp_path / "sharded", shards=2)


def test_shards_with_different_tensor_names(tmp_path):
    folder = _two_shards(tmp_path)
    f = folder / "consolidated.01.pth"
    sd = torch.load(f, weights_only=True)
    del sd["layers.0.attention.wo.weight"]
    torch.save(sd, f)
    err = _raises(r"shard holds different tensors .*missing \['layers\.0\.attention\.wo\.weight'\]", meta_pth.read,
                  folder)
    assert err.path == f


def test_shards_with_mismatched_replicated_norm(tmp_path):
    folder = _two_shards(tmp_path)
    f = folder / "consolidated.01.pth"
    sd = torch.load(f, weights_only=True)
    sd["layers.1.ffn_norm.weight"] = sd["layers.1.ffn_norm.weight"] + 1
    torch.save(sd, f)
    _raises(r"replicated tensor layers\.1\.ffn_norm\.weight differs", meta_pth.read, folder)


def test_wrong_shard_count(tmp_path):
    folder = _two_shards(tmp_path)
    # A third shard (a copy of the second) cannot split 2 key-value heads.
    (folder / "consolidated.02.pth").write_bytes((folder / "consolidated.01.pth").read_bytes())
    _raises(r"3 shards cannot split 4 query / 2 key-value heads", meta_pth.read, folder)


def test_missing_shard_number(tmp_path):
    folder = _two_shards(tmp_path)
    (folder / "consolidated.01.pth").rename(folder / "consolidated.02.pth")
    _raises(r"shard numbers \[0, 2\]", meta_pth.read, folder)
