"""llama.cpp's own `llama-quantize` and `llama-imatrix`, built once from the llama-cpp-python sdist we test against.

llama-cpp-python ships the llama.cpp runtime as a library but none of its command-line tools. Its source
distribution vendors the exact llama.cpp tree of that runtime (vendor/llama.cpp, with tools/quantize and
tools/imatrix), so building those two targets from it gives the tools of the same llama.cpp version as the
runtime the interop tests load. `python bench/llamacpp_tools.py` downloads the sdist of the installed
version (when not cached), builds the two tools on the CPU (portable: `-DGGML_NATIVE=OFF`, two compile jobs)
into a cache directory outside the repository, and prints where they are. Running it again does nothing.

The cache is `$LLAMAHERD_LLAMACPP_TOOLS` when set, else `$XDG_CACHE_HOME/llamaherd/llamacpp-tools` (default
`~/.cache/llamaherd/llamacpp-tools`), one subdirectory per llama-cpp-python version. cmake and ninja come
from the system or from the `llamacpp-tools` extra (`pip install cmake ninja`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

TOOLS = ("llama-quantize", "llama-imatrix")
DISTRIBUTION = "llama-cpp-python"
MAKE_TARGET = "make llamacpp-tools"

# Only the two tools, their `common` library and ggml's CPU backend; nothing that downloads or needs TLS.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=OFF",
    "-DGGML_OPENMP=OFF",
    "-DGGML_CCACHE=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
)


def installed_version() -> str:
    """The installed llama-cpp-python's version: the tools are built from that same llama.cpp tree."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise SystemExit(f"{DISTRIBUTION} is not installed: `make install-test` installs it") from None


def cache_root() -> Path:
    if os.environ.get("LLAMAHERD_LLAMACPP_TOOLS"):
        return Path(os.environ["LLAMAHERD_LLAMACPP_TOOLS"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llamaherd" / "llamacpp-tools"


def tool_dir(version: str | None = None) -> Path:
    return cache_root() / (version or installed_version())


def find_tools(version: str | None = None) -> dict[str, Path] | None:
    """The built tools' paths by name, or None when any is missing (then `make llamacpp-tools` builds them)."""
    bin_dir = tool_dir(version) / "bin"
    paths = {name: bin_dir / name for name in TOOLS}
    return paths if all(p.is_file() and os.access(p, os.X_OK) for p in paths.values()) else None


def _run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def _program(name: str) -> str:
    """A build program from PATH or from this interpreter's environment (the pip `cmake`/`ninja` wheels)."""
    here = Path(sys.executable).parent / name
    found = shutil.which(name) or (str(here) if here.is_file() else None)
    if found is None:
        raise SystemExit(f"{name} not found: install it (`pip install {name}` or the system package)")
    return found


def _sdist(version: str, root: Path) -> Path:
    """The sdist of `version`, downloaded with pip into the cache when not there yet."""
    downloads = root / "sdist"
    name = f"llama_cpp_python-{version}.tar.gz"
    if not (downloads / name).is_file():
        downloads.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
              "--no-binary", ":all:", "-d", str(downloads), f"{DISTRIBUTION}=={version}"])
    if not (downloads / name).is_file():
        raise SystemExit(f"pip did not produce {downloads / name}")
    return downloads / name


def _extract_llama_cpp(sdist: Path, dest: Path) -> Path:
    """Only vendor/llama.cpp of the sdist, into `dest`; returns the llama.cpp source root."""
    prefix = sdist.name.removesuffix(".tar.gz") + "/vendor/llama.cpp/"
    source = dest / "llama.cpp"
    if (source / "CMakeLists.txt").is_file():
        return source
    shutil.rmtree(source, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            if m.name.startswith(prefix) and m.name != prefix:
                m.name = "llama.cpp/" + m.name[len(prefix):]
                members.append(m)
        tar.extractall(dest, members=members, filter="data")
    return source


def build(version: str | None = None, jobs: int = 2) -> dict[str, Path]:
    """Build the tools for `version` (default: the installed one) unless already built; their paths."""
    version = version or installed_version()
    found = find_tools(version)
    if found:
        return found
    root = tool_dir(version)
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)
    source = _extract_llama_cpp(_sdist(version, cache_root()), work)
    build_dir = work / "build"
    _run([_program("cmake"), "-S", str(source), "-B", str(build_dir), "-G", "Ninja",
          f"-DCMAKE_MAKE_PROGRAM={_program('ninja')}", *CMAKE_OPTIONS])
    _run([_program("cmake"), "--build", str(build_dir), "-j", str(jobs), "--target", *TOOLS])
    bin_dir = root / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in TOOLS:
        shutil.copy2(build_dir / "bin" / name, bin_dir / name)
    # The binaries are static (BUILD_SHARED_LIBS=OFF): the sources and objects are no longer needed.
    shutil.rmtree(work)
    found = find_tools(version)
    assert found, f"build finished without {TOOLS} in {bin_dir}"
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", help=f"{DISTRIBUTION} version (default: the installed one)")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="compile jobs (default 2: the machine is shared)")
    args = ap.parse_args(argv)
    for name, path in build(args.version, args.jobs).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
