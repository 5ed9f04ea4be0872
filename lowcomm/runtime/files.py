"""The runtime's files: written for its user only (run records, checkpoints), read back by whole
lines (JSONL records)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import IO

__all__ = ["check_folder", "hold_folder", "private_open", "read_jsonl", "timeline"]


def check_folder(name: str, folder: str | os.PathLike | Path) -> None:
    """Refuse, before any work, a folder a command would write in but cannot: a file where it (or
    a folder above it) should be, or the nearest existing folder not writable.

    Raises:
        ValueError: ``name=folder is not allowed: ...``, naming the file or folder in the way.
    """
    p = Path(folder)
    for q in (p, *p.parents):
        if q.exists() and not q.is_dir():
            raise ValueError(f"{name}={str(folder)!r} is not allowed: {str(q)!r} is a file, not a folder")
        if q.exists():
            if not os.access(q, os.W_OK | os.X_OK):
                raise ValueError(f"{name}={str(folder)!r} is not allowed: {str(q)!r} is not writable")
            return


def private_open(path: str | os.PathLike | Path, mode: str) -> IO:
    """``open(path, mode)`` for writing ("w", "a", "wb", "ab"), a new file created owner-only (0600):
    records name a job's members, addresses and transfers, checkpoints hold its weights."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    return os.fdopen(os.open(path, flags, 0o600), mode, **({} if "b" in mode else {"buffering": 1}))


def read_jsonl(path: str | os.PathLike | Path) -> list[dict]:
    """All complete lines of a JSONL file (a torn last line, if any, is ignored)."""
    out = []
    with open(path) as f:
        for line in f:
            if line.endswith("\n"):
                out.append(json.loads(line))
    return out


def timeline(run_dir: str | Path) -> list[dict]:
    """``run_dir/events.jsonl`` as the run's history stands: the events of steps that a resume
    redid are left out. A run killed at step 37 and resumed from its checkpoint of step 20
    recorded steps 21-37 twice (and their rounds and evaluations); the first ones belong to no
    model the run went on from. The file keeps them (a ``checkpoint`` event, ``what`` "resumed",
    marks each resume); plot and fit from this."""
    events = read_jsonl(Path(run_dir) / "events.jsonl")
    kept, redone_after = [], math.inf  # (read from the end: the earliest resume after an event rules)
    for e in reversed(events):
        if e["kind"] == "checkpoint" and e.get("what") == "resumed":
            redone_after = min(redone_after, e["step"])
        elif isinstance(e.get("step"), int) and e["step"] > redone_after:
            continue
        kept.append(e)
    return kept[::-1]


def hold_folder(name: str, folder: str | os.PathLike | Path) -> int | None:
    """Make ``folder`` (owner-only) if it does not exist and hold it for this process: an
    exclusive ``flock`` on the folder itself, which the kernel drops when the returned descriptor
    is closed or the process ends (a killed run leaves no stale lock). None where the system or
    the folder's file system has no ``flock`` (the folder is then not held).

    Raises:
        ValueError: another process holds it (the same command started twice: their records and
            checkpoints would be interleaved and overwritten).
    """
    try:
        import fcntl
    except ImportError:  # (not a POSIX system)
        return None
    p = Path(folder)
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(p, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(
            f"{name}={str(folder)!r} is in use: another process is running there (the same command "
            "started twice?); nothing was changed: wait for it to end, or give another folder"
        ) from None
    except OSError:  # a file system without locks (ENOLCK, EINVAL): the folder is not held
        os.close(fd)
        return None
    return fd
