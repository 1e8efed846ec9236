"""Atomic file writes: every file moe-ep writes whole (images, stats, summaries, checkpoints,
plots, reports, benchmark results) goes through `atomic_write`. Two exceptions: metrics.jsonl is
an append log (one JSON object per line, flushed per step; readers skip a torn last line) and
wandb/ is written by wandb itself. It lives in eplb, the lower layer, so that eplb (which never
imports moe_ep) and the runtime share one implementation; `moe_ep.atomic` re-exports it.

The data goes to a temp file in the destination's folder (`.tmp-<random><suffix>`), is
flushed and fsync'ed, and then renamed over the destination with `os.replace` (atomic on
POSIX and Windows within one file system); the folder is fsync'ed afterwards where the OS
allows it. A reader sees either the old file or the complete new one, never a truncated
file, however the writer dies (exception, SIGTERM, SIGKILL, power loss after the rename).
On an exception the temp file is removed; a SIGKILL can leave a `.tmp-*` file behind,
which no reader opens (`is_temp_file` tells them apart).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import IO, Any, Iterator

TMP_PREFIX = ".tmp-"
def _read_umask() -> int:
    """The process umask (mkstemp makes 0600 files; a written file gets 0666 & ~umask). Linux
    reports it in /proc/self/status, which reads it without the set-and-restore that would race
    with other threads creating files; elsewhere, set and restore once at import."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def is_temp_file(name: str) -> bool:
    """True for the name of a temp file left by an interrupted `atomic_write`."""
    return os.path.basename(name).startswith(TMP_PREFIX)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems / OSes do not fsync folders
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """`with atomic_write(path, "w") as f: f.write(...)`: `path` appears complete or not at all.

    Creates the folder if needed. `mode` is "wb" or "w" (text, `encoding` default utf-8)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": encoding or "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def write_bytes_atomic(path: str, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_json_atomic(path: str, data: Any, indent: int | None = 1) -> None:
    """json.dump `data` to `path` atomically (a trailing newline)."""
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=indent)
        f.write("\n")
