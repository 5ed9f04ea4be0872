"""The runtime's files: written for its user only (run records, checkpoints), read back by whole
lines (JSONL records)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

from .._compat import tomllib

__all__ = ["check_folder", "private_open", "read_config_file", "read_jsonl"]


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


def read_config_file(path: str | os.PathLike | Path, what: str = "config file") -> dict[str, Any]:
    """A TOML (``.toml``) or JSON (``.json``) file's table of keys; ``what`` names the file in
    the errors.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a folder, another suffix, text that does not parse (naming the file and
            where), or a document that is not a table.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {str(p)!r} does not exist")
    if p.is_dir():
        raise ValueError(f"{what} {str(p)!r} is a directory; give a .toml or .json file")
    if p.suffix not in (".toml", ".json"):
        raise ValueError(f"{what} {str(p)!r} must end in .toml or .json")
    text = p.read_text()
    try:
        data = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {str(p)!r} is not valid {p.suffix[1:].upper()}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {str(p)!r} must hold a table of keys")
    return data
