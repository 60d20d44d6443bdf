"""Writes that are never seen half-done: a temporary name in the destination folder, fsync, rename, fsync the folder.

Every file and folder llamaherd writes goes through `replacing` (one file) or `replacing_folder` (a checkpoint
folder). A process killed at any instant leaves the destination as it was before (absent or old) or complete and
new; its leftovers are hidden names (`.NAME.partial-PID`) that the next write to the same destination removes.
A full disk raises `WriteError` (an OSError and a LlamaherdError) naming the path, and the partial file is gone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import WriteError

_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_LOW_SPACE = 16 << 20  # below this many free bytes after a failure, the failure is taken to be a full disk


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old-{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(path: Path, kind: str) -> list[Path]:
    """Hidden partial/old copies of `path` left by writers that are no longer running."""
    out = []
    for p in path.parent.glob(f".{path.name}.{kind}-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            out.append(p)
    return out


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _tidy(path: Path) -> None:
    """Undo what a killed writer left: restore an old folder it had moved aside, delete its partial files."""
    olds = _leftovers(path, "old")
    if olds and not path.exists():  # killed between moving the old folder aside and renaming the new one in
        os.rename(max(olds, key=lambda p: p.stat().st_mtime), path)
        olds = _leftovers(path, "old")
    for p in olds + _leftovers(path, "partial"):
        _remove(p)


def fsync_path(p: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    fd = os.open(p, os.O_RDONLY | (os.O_DIRECTORY if p.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def _no_room(exc: BaseException, path: Path, tmp: Path) -> WriteError | None:
    """A WriteError when `exc` came from a full disk (or the file-size limit), else None."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if isinstance(exc, OSError) and exc.errno in _NO_ROOM:
        reason = os.strerror(exc.errno)
    elif limit != resource.RLIM_INFINITY and tmp.is_file() and tmp.stat().st_size >= limit:
        reason = f"the file-size limit (ulimit -f) of {limit} bytes was reached ({exc})"
    else:  # writers in native code (safetensors) report a full disk in their own words: ask the disk
        try:
            st = os.statvfs(path.parent)
        except OSError:
            return None
        if st.f_bavail * st.f_frsize >= _LOW_SPACE:
            return None
        reason = f"{st.f_bavail * st.f_frsize} bytes left on its disk ({exc})"
    return WriteError(path, f"no room to write it: {reason}; the partial file was removed. Free some space "
                            "or write to another disk")


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it replaces `path` atomically and durably.

    On an exception the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _tidy(path)
    tmp = _partial(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)  # the rename itself reaches the disk
    except BaseException as exc:
        full = _no_room(exc, path, tmp)
        _remove(tmp)
        if full is not None:
            raise full from exc
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    """`Path.write_bytes`, atomically."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """`Path.write_text` (UTF-8), atomically."""
    return write_bytes(path, text.encode("utf-8"))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # the old folder is deleted afterwards: a hard link costs no copy
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def replacing_folder(path: str | Path, carry: Callable[[str], bool] = lambda name: True) -> Iterator[Path]:
    """Yield an empty staging folder beside `path`; on success it takes `path`'s place.

    Entries of an existing `path` that the new folder lacks and `carry(name)` accepts are carried over (hard
    links, copies across file systems), so a user's other files survive. The swap is two renames: a kill
    between them leaves the old folder under a hidden name, which the next write to `path` puts back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _tidy(path)
    stage = _partial(path)
    _remove(stage)
    stage.mkdir()
    try:
        yield stage
        if path.is_dir():
            for entry in path.iterdir():
                if not (stage / entry.name).exists() and carry(entry.name):
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.copytree(entry, stage / entry.name, symlinks=True, copy_function=_link_or_copy)
                    else:
                        _link_or_copy(str(entry), str(stage / entry.name))
        _fsync_tree(stage)
    except BaseException as exc:
        full = _no_room(exc, path, stage)
        _remove(stage)
        if full is not None:
            raise full from exc
        raise
    old = _old(path)
    if path.exists():
        os.rename(path, old)
    os.rename(stage, path)
    fsync_path(path.parent)
    _remove(old)
