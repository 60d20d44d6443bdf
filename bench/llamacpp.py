"""llama.cpp (llama-cpp-python) as a reference on every CPU: weight repacking off where its AMX kernel crashes.

On CPUs with AMX (Sapphire Rapids and later; `amx_tile` in /proc/cpuinfo), llama-cpp-python 0.3.36 built with
`-march=native` repacks Q4_0/Q8_0/k-quant weights into AMX "extra buffer types", and
`ggml_backend_amx_mul_mat` segfaults inside `Llama.eval` (seen on the suite's tiny models and on the default
Gemma 3 270M Q4_K_M file). With `use_extra_bufts` off llama.cpp runs its plain CPU kernels, which compute
the same products on the unpacked layout. Benchmarks print `note()` so a reader knows which llama.cpp ran.
"""

from __future__ import annotations

from pathlib import Path


def has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def without_weight_repacking() -> bool:
    """Make every later `llama_cpp.Llama(...)` load without extra buffer types; False when llama_cpp is absent."""
    try:
        import llama_cpp.llama_cpp as capi
    except ImportError:
        return False
    default = capi.llama_model_default_params
    if getattr(default, "_no_repack", False):
        return True

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    params._no_repack = True
    capi.llama_model_default_params = params
    return True


def prepare() -> str:
    """Apply the workaround where it is needed; the line a benchmark prints about it."""
    if has_amx() and without_weight_repacking():
        return "llama.cpp: weight repacking off (its AMX kernel crashes on this CPU; plain CPU kernels run)"
    return "llama.cpp: default settings"
