"""Nothing half-written: each writer SIGKILLed at random moments leaves the old state or the complete new one.

A helper process (this file run as a script) builds two versions (A, B) of every writer's input once, then
forks one child per write so each kill costs no interpreter start. For every writer: one uninterrupted write
of B gives the reference and the write's duration; then 20 writes of B over an absent or an old (A) destination
are killed with SIGKILL at a random moment inside that duration. Afterwards the destination must be absent,
equal A, or load and equal B, as read by the package's own readers (a torn file fails to load or differs); the
next write must then succeed over whatever was left.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

KILLS = 20
WRITERS = ("hf", "meta", "gguf", "pull", "train_state", "adapter")
HERE = Path(__file__).resolve().parent


# ---- the inputs, two versions of each --------------------------------------------------------------------------


def _config():
    from llamaherd.config import ModelConfig

    return ModelConfig(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=1024, multiple_of=64, max_seq_len=64)


def _random_state(seed: int) -> dict:
    import torch

    from llamaherd.model import build

    torch.manual_seed(seed)
    net = build(_config())
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.2)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _fake_package(root: Path, version: str) -> None:
    """A packaged model as `herd pull` installs one (chunk_paths + EXPECTED_SHA256), 4 MiB in 4 chunks."""
    pkg = root / "fake_pull_pkg"
    pkg.mkdir(parents=True, exist_ok=True)
    data = hashlib.sha256(version.encode()).digest() * (4 << 20 >> 5)
    for i in range(4):
        (pkg / f"part{i}").write_bytes(data[i << 20:(i + 1) << 20])
    (pkg / "__init__.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        EXPECTED_SHA256 = {hashlib.sha256(data).hexdigest()!r}
        def chunk_paths():
            return [Path(__file__).parent / f"part{{i}}" for i in range(4)]
    """))


class Inputs:
    """Everything the writers need, built once in the helper process before any fork."""

    def __init__(self, root: Path) -> None:
        import torch

        from tests.checkpoint_fixtures import meta_params, save_meta_folder
        from llamaherd.checkpoint import read
        from llamaherd.lora.layer import LoRAConfig, apply_lora
        from llamaherd.model import build
        from llamaherd import store

        c = _config()
        self.ckpt, self.train, self.adapter = {}, {}, {}
        for version, seed in (("A", 1), ("B", 2)):
            state = _random_state(seed)
            src = save_meta_folder(state, meta_params(c), root / f"src{version}")
            self.ckpt[version] = read(src)
            self.train[version] = {"weights": state, "step": seed, "position": seed * 7}
            net = build(c)
            net.load_state_dict(state)
            mods = apply_lora(net, LoRAConfig(rank=8), seed=seed)
            with torch.no_grad():
                for m in mods.values():
                    m.lora_B.weight.normal_(0.0, 0.1)
            self.adapter[version] = net
            _fake_package(root / f"pkg{version}", version)
        self.config, self.lora, self.store = c, LoRAConfig(rank=8), store
        store.PACKAGED["fake-pull"] = store.Packaged(requirement="fake-pull-pkg==1", module="fake_pull_pkg",
                                                     filename="fake.gguf", description="fake")
        self.root = root

    def write(self, writer: str, dst: Path, version: str) -> None:
        from llamaherd.checkpoint.gguf_write import write as write_gguf
        from llamaherd.checkpoint.save import save
        from llamaherd.lora.peft import save_adapter
        from llamaherd.train import state

        if writer == "hf":
            save(self.ckpt[version], dst, "hf", max_shard_bytes=2 << 20)  # several shards and an index
        elif writer == "meta":
            save(self.ckpt[version], dst, "meta", shards=2)
        elif writer == "gguf":  # `herd quantize`'s call
            write_gguf(self.ckpt[version], dst, qtype="q8_0")
        elif writer == "pull":  # `herd pull` of a packaged model into the store at dst
            os.environ["LLAMAHERD_HOME"] = str(dst)
            sys.path.insert(0, str(self.root / f"pkg{version}"))
            self.store.install_packaged("fake-pull")
        elif writer == "train_state":
            state.atomic_save(self.train[version], dst / state.FILE)
        elif writer == "adapter":
            save_adapter(self.adapter[version], self.config, self.lora, dst)
        else:
            raise ValueError(writer)


def serve(root: Path) -> None:
    """The helper process: read `writer dst version` lines, fork a child per write, answer `pid` then `exit`."""
    import torch

    torch.set_num_threads(1)  # no thread pool exists before a fork
    sys.path.insert(0, str(HERE))
    inputs = Inputs(root)
    print("ready", flush=True)
    for line in sys.stdin:
        writer, dst, version = line.split()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                inputs.write(writer, Path(dst), version)
            except BaseException as exc:  # noqa: BLE001 - reported to the test, then the child ends
                print(f"child error: {exc!r}", file=sys.stderr, flush=True)
                code = 1
            os._exit(code)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {status}", flush=True)


# ---- what a destination holds, read by the package's own readers -----------------------------------------------


def _tensor_digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def content(writer: str, dst: Path):
    """None when the destination is absent, else a digest of what the package reads back from it."""
    import torch

    from llamaherd.checkpoint import read
    from llamaherd.checkpoint.base import dequantized
    from llamaherd.errors import TrainingError
    from llamaherd.lora.peft import read_adapter
    from llamaherd.train import state

    if writer in ("hf", "meta", "gguf"):
        if not dst.exists():
            return None
        ckpt = dequantized(read(dst), "the kill test")
        return ckpt.config, _tensor_digest(ckpt.state_dict)
    if writer == "pull":
        env = os.environ.get("LLAMAHERD_HOME")
        os.environ["LLAMAHERD_HOME"] = str(dst)
        try:
            from llamaherd import store

            found = [m for m in store.list_models() if m.name == "fake-pull"]
        finally:
            os.environ.pop("LLAMAHERD_HOME") if env is None else os.environ.__setitem__("LLAMAHERD_HOME", env)
        if not found:
            return None
        return hashlib.sha256(found[0].path.read_bytes()).hexdigest(), found[0].digest
    if writer == "train_state":
        f = dst / state.FILE
        if not f.exists():
            return None
        saved = torch.load(f, map_location="cpu", weights_only=True)
        return _tensor_digest(saved["weights"]), saved["step"], saved["position"]
    if writer == "adapter":
        if not dst.exists():
            return None
        if not ((dst / "adapter_model.safetensors").exists() and (dst / "adapter_config.json").exists()):
            # killed between its two files: the reader refuses the folder by name, it never half-loads
            with pytest.raises(TrainingError, match="not a PEFT adapter folder"):
                read_adapter(dst)
            return None
        config, tensors, _ = read_adapter(dst)
        return json.dumps(config, sort_keys=True), _tensor_digest(tensors)
    raise ValueError(writer)


# ---- the test ----------------------------------------------------------------------------------------------------


class Helper:
    def __init__(self, root: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
        self.proc = subprocess.Popen([sys.executable, __file__, str(root)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        assert self._line() == "ready"

    def _line(self) -> str:
        line = self.proc.stdout.readline().strip()
        assert line, "the helper process died"
        return line

    def write(self, writer: str, dst: Path, version: str, kill_after: float | None = None) -> tuple[float, int]:
        """Run one write; with kill_after, SIGKILL it that many seconds in. (seconds taken, wait status)."""
        self.proc.stdin.write(f"{writer} {dst} {version}\n")
        self.proc.stdin.flush()
        start = time.perf_counter()
        pid = int(self._line().split()[1])
        if kill_after is not None:
            time.sleep(kill_after)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        status = int(self._line().split()[1])
        return time.perf_counter() - start, status

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def helper(tmp_path_factory):
    h = Helper(tmp_path_factory.mktemp("inputs"))
    yield h
    h.close()


def _dst(writer: str, base: Path) -> Path:
    return base / ("out.gguf" if writer == "gguf" else "out")


# The adapter case (seconds) runs in every suite; the rest, minutes together, with the slow tests.
@pytest.mark.parametrize("writer", [w if w == "adapter" else pytest.param(w, marks=pytest.mark.slow) for w in WRITERS])
def test_kill_9_leaves_old_or_complete_new(helper, writer, tmp_path):
    old_dst, new_dst = _dst(writer, tmp_path / "old"), _dst(writer, tmp_path / "new")
    assert helper.write(writer, old_dst, "A")[1] == 0
    took, status = helper.write(writer, new_dst, "B")
    assert status == 0
    old, new = content(writer, old_dst), content(writer, new_dst)
    assert old is not None and new is not None and old != new
    rng = random.Random(f"{writer}-kills")
    seen = {"absent": 0, "old": 0, "new": 0}
    for i in range(KILLS):
        dst = _dst(writer, tmp_path / f"kill{i}")
        start_old = writer != "pull" and i % 2 == 0  # store entries are never overwritten: always from absent
        if start_old:
            dst.parent.mkdir(parents=True)
            (shutil.copytree if old_dst.is_dir() else shutil.copy2)(old_dst, dst)
        helper.write(writer, dst, "B", kill_after=rng.uniform(0.0, took))
        got = content(writer, dst)
        if got is None:
            seen["absent"] += 1
            assert not start_old, f"kill {i}: the old destination vanished"
        elif got == old:
            assert start_old, f"kill {i}: old content appeared in a fresh destination"
            seen["old"] += 1
        else:
            assert got == new, f"kill {i}: the destination holds neither the old nor the complete new content"
            seen["new"] += 1
        assert helper.write(writer, dst, "B")[1] == 0, f"kill {i}: writing again over the leftovers failed"
        assert content(writer, dst) == new
        assert not [p.name for p in dst.parent.rglob("*") if ".partial-" in p.name or ".old-" in p.name], \
            f"kill {i}: the next write left the killed one's temporary files"
    print(writer, seen)


# ---- the helper itself -----------------------------------------------------------------------------------------


def test_failed_write_keeps_old_file_and_leaves_no_partial(tmp_path):
    from llamaherd.atomic import replacing, write_text

    dst = write_text(tmp_path / "f.json", "old")
    with pytest.raises(RuntimeError):
        with replacing(dst) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert dst.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_folder_swap_keeps_the_users_other_files(tmp_path):
    from llamaherd.atomic import replacing_folder

    dst = tmp_path / "model"
    dst.mkdir()
    (dst / "README.md").write_text("mine")
    (dst / "model.safetensors").write_text("stale")
    with replacing_folder(dst, carry=lambda name: not name.endswith(".safetensors")) as stage:
        (stage / "config.json").write_text("{}")
    assert sorted(p.name for p in dst.iterdir()) == ["README.md", "config.json"]
    assert (dst / "README.md").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _limited_write(tmp: Path, code: str) -> subprocess.CompletedProcess:
    """Run `code` with a 1 MiB file-size limit: the kernel refuses larger writes (EFBIG) as a full disk would."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    return subprocess.run([sys.executable, "-c", code], cwd=tmp, capture_output=True, text=True, preexec_fn=limit,
                          env={**os.environ, "PYTHONPATH": str(HERE.parent)}, timeout=300)


def test_no_room_gives_a_typed_error_and_removes_the_partial_file(tmp_path):
    (tmp_path / "big.bin").write_bytes(b"old")
    done = _limited_write(tmp_path, textwrap.dedent("""
        from llamaherd.atomic import write_bytes
        from llamaherd.errors import WriteError
        try:
            write_bytes("big.bin", b"x" * (4 << 20))
        except WriteError as exc:
            print("WriteError:", exc)
    """))
    assert done.returncode == 0, done.stderr
    assert "WriteError: big.bin: no room to write it" in done.stdout and "Free some space" in done.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["big.bin"] and (tmp_path / "big.bin").read_bytes() == b"old"


def test_no_room_in_a_gguf_write_through_the_cli(tmp_path):
    from tests.checkpoint_fixtures import meta_params, save_meta_folder

    save_meta_folder(_random_state(3), meta_params(_config()), tmp_path / "src")
    done = _limited_write(tmp_path, "import sys; from llamaherd.cli import main; "
                                    "sys.exit(main(['quantize', 'src', 'out.gguf', '--type', 'f32', '--quiet']))")
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert "out.gguf: no room to write it: the file-size limit" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
