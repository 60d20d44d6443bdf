"""Native CPU kernels: every `native/*.c` built into one shared library with the host compiler, used via ctypes.

Why native code at all: a decode step is memory-bound and made of many small products, and the torch routes
either write and re-read float copies of packed weights or pay a dispatch per tiny op (bench/PROFILE.md). The
C files here read the packed bytes once, in registers.

The library is compiled on first use into `$LLAMAHERD_HOME/kernels/` (`-O3 -march=native -fopenmp`; the
OpenMP runtime resolves to the libgomp torch has already loaded, so both share one thread pool), keyed by a
hash of the sources and flags. No compiler, or a failed build, leaves `library()` None and every caller keeps
its pure-torch path. `ENABLED = False` (or the `disabled()` context) turns the kernels off, to benchmark or
test the fallback.

Each C file exports `lh_*` functions; the Python module that wraps a file declares their ctypes signatures
with `function(name, argtypes)`: `ops.py` (ops.c), `dense.py` (dense.c), `ggml_kernels.py` (ggml.c, ggml_q8.c).
`swaps.py` puts them into a loaded model, as module swaps that `llamaherd.load` applies once.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from ..atomic import replacing

_DIR = Path(__file__).parent
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math",
          # reassociation lets the compiler vectorise the dot-product reductions (order differs from numpy's)
          "-fassociative-math", "-fno-signed-zeros", "-ffp-contract=fast"]

ENABLED = True  # module switch, not an environment variable: the math never depends on the environment

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_bound: dict[str, object] = {}


class _BuildFailed(Exception):
    """The C compiler refused the kernels: run without them."""


def sources() -> list[Path]:
    return sorted(_DIR.glob("*.c"))


def _cache_dir() -> Path:
    from ..store import home

    return home() / "kernels"


def _build() -> ctypes.CDLL | None:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return None
    srcs = sources()
    digest = hashlib.sha256(" ".join([cc, *_FLAGS]).encode())
    for src in [*srcs, *sorted(_DIR.glob("*.h"))]:  # headers too: a changed header must rebuild
        digest.update(src.name.encode() + b"\0" + src.read_bytes())
    target = _cache_dir() / f"llamaherd-native-{digest.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:  # atomic: concurrent builders, or one killed midway, never leave a half-written library
            with replacing(target) as tmp:
                done = subprocess.run([cc, *_FLAGS, *map(str, srcs), "-o", str(tmp)], capture_output=True, text=True)
                if done.returncode != 0:
                    logging.getLogger(__name__).warning("the native kernels did not compile; the torch path runs "
                                                        "instead:\n%s", done.stderr[-4000:])
                    raise _BuildFailed
        except _BuildFailed:
            return None
    return ctypes.CDLL(str(target))


def library() -> ctypes.CDLL | None:
    """The loaded library, building it on first call; None when it cannot be built or is switched off."""
    global _lib, _tried
    if not ENABLED:
        return None
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _lib = _build()
                except OSError:
                    _lib = None
                _tried = True
    return _lib


def function(name: str, argtypes: list, restype=ctypes.c_int):
    """The exported C function `name` with its ctypes signature set; None when the library is unavailable."""
    lib = library()
    if lib is None:
        return None
    fn = _bound.get(name)
    if fn is None:
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
        _bound[name] = fn
    return fn


@contextlib.contextmanager
def switched_off(module, name: str = "ENABLED"):
    """Set a module's boolean switch to False for the enclosed code, restoring it after."""
    before = getattr(module, name)
    setattr(module, name, False)
    try:
        yield
    finally:
        setattr(module, name, before)


def disabled():
    """Run the enclosed code on the pure-torch paths."""
    return switched_off(sys.modules[__name__])
