"""Reading a TOML or JSON settings file with errors that name it: the trainer's ``--config``, a
fault plan, and a torchtitan-style job file of the integrations (which sit below the runtime)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ._compat import tomllib

__all__ = ["read_config_file"]


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
    kind = p.suffix[1:].upper()
    try:
        text = p.read_bytes().decode("utf-8")
        data = tomllib.loads(text) if kind == "TOML" else json.loads(text, object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {str(p)!r} is not valid {kind}: not UTF-8 text (byte {e.start})") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, _Duplicate) as e:
        raise ValueError(f"{what} {str(p)!r} is not valid {kind}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {str(p)!r} must hold a table of keys")
    return data


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused when it names a key twice (json keeps the last silently; TOML
    refuses)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(f"key {k!r} is given twice")
        out[k] = v
    return out
