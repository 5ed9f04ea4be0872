"""State as bytes: one format for state transfers to joiners and for checkpoints on disk.

A state is a tree of dicts, lists, numbers, strings and tensors (a DiLoCo ``state_dict()``, an
optimizer's, ...). :func:`pack` turns it into a JSON header and one flat ``uint8`` tensor holding
every tensor's bytes; the header records each tensor's dtype, shape and offset and the SHA-256 of
the flat bytes. :func:`unpack` checks sizes, dtypes (an allow-list) and the checksum before it
builds anything. Nothing is pickled, so a corrupt or hostile payload is an error, never code.

On disk (:func:`save_state` / :func:`load_state`) the file is ``MAGIC``, the header length, the
header and the bytes, written to a temporary file, fsynced and renamed over the old one, so a
failed write leaves the previous checkpoint intact. Over the network an elastic job sends the same
header and bytes, signed (:mod:`lowcomm.runtime.elastic.transfer`). Needs nothing beyond torch:
static jobs checkpoint with it too.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .files import private_open

__all__ = ["CorruptStateError", "pack", "unpack", "save_state", "load_state"]

FORMAT = "lowcomm-state/1"
MAGIC = b"LCSTATE1"
MAX_HEADER_BYTES = 64 << 20
_DTYPES = {
    str(d): d
    for d in (
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


class CorruptStateError(ValueError):
    """A state (transfer or checkpoint) that fails its checks: size, format, dtype or checksum."""


def _digest(flat: torch.Tensor) -> str:
    return hashlib.sha256(flat.numpy().tobytes() if flat.numel() else b"").hexdigest()


def pack(tree: Any) -> tuple[bytes, torch.Tensor]:
    """(header, flat bytes) of a state tree; tensors are copied to CPU."""
    parts: list[torch.Tensor] = []
    meta: list[dict] = []
    offset = 0

    def enc(o):
        nonlocal offset
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            if str(t.dtype) not in _DTYPES:
                raise TypeError(f"cannot pack a tensor of dtype {t.dtype}; allowed: {sorted(_DTYPES)}")
            raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
            meta.append({"dtype": str(t.dtype), "shape": list(t.shape), "offset": offset})
            parts.append(raw)
            offset += raw.numel()
            return {"__t__": len(meta) - 1}
        if isinstance(o, dict):
            return {"__d__": [[enc(k), enc(v)] for k, v in o.items()]}
        if isinstance(o, (list, tuple)):
            return {"__l__": [enc(v) for v in o]}
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        raise TypeError(f"cannot pack a {type(o).__name__} into a state")

    tree_json = enc(tree)
    flat = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
    header = {
        "format": FORMAT,
        "tree": tree_json,
        "tensors": meta,
        "nbytes": flat.numel(),
        "sha256": _digest(flat),
    }
    return json.dumps(header, separators=(",", ":")).encode(), flat


def unpack(header: bytes, flat: torch.Tensor) -> Any:
    """The tree :func:`pack` made; raises CorruptStateError on any mismatch."""
    try:
        h = json.loads(header.decode())
        if not isinstance(h, dict) or h.get("format") != FORMAT:
            raise CorruptStateError(f"not a {FORMAT} header")
        if int(h["nbytes"]) != flat.numel():
            raise CorruptStateError(f"state holds {flat.numel()} bytes, its header says {h['nbytes']}")
        if _digest(flat) != h["sha256"]:
            raise CorruptStateError(
                "state bytes do not match their SHA-256 (corrupted in transit or on disk)"
            )
        tensors = []
        for i, m in enumerate(h["tensors"]):
            dtype = _DTYPES.get(m["dtype"])
            if dtype is None:
                raise CorruptStateError(f"tensor {i} has dtype {m['dtype']!r}; allowed: {sorted(_DTYPES)}")
            shape = [int(s) for s in m["shape"]]
            n = (torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
            lo = int(m["offset"])
            if lo < 0 or lo + n > flat.numel():
                raise CorruptStateError(f"tensor {i} lies outside the state's bytes")
            raw = flat[lo : lo + n].clone()
            tensors.append(raw.view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype))
    except CorruptStateError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RuntimeError) as e:
        raise CorruptStateError(f"malformed state header: {type(e).__name__}: {e}") from None

    def dec(o):
        if isinstance(o, dict):
            if "__t__" in o:
                return tensors[int(o["__t__"])]
            if "__d__" in o:
                return {dec(k): dec(v) for k, v in o["__d__"]}
            if "__l__" in o:
                return [dec(v) for v in o["__l__"]]
            raise CorruptStateError("malformed state tree")
        return o

    try:
        return dec(h["tree"])
    except (IndexError, TypeError, ValueError) as e:
        raise CorruptStateError(f"malformed state tree: {e}") from None


def save_state(
    path: str | os.PathLike, tree: Any, *, opener: Callable[[str, str], Any] = private_open
) -> int:
    """Write ``tree`` to ``path`` atomically (temp file, fsync, rename); returns the bytes written.

    ``opener(path, mode)`` opens the temporary file (owner-only by default; the fault injector
    passes one that fails part way). If anything fails, the temporary file is removed and the
    previous file at ``path`` is untouched. The temporary files of earlier writers of ``path``
    (processes killed mid-write: a whole state each) are removed first.
    """
    header, flat = pack(tree)
    data = [MAGIC, struct.pack("<Q", len(header)), header, flat.numpy().tobytes()]
    tmp = f"{os.fspath(path)}.tmp.{os.getpid()}"
    target = Path(path)
    for stale in target.parent.glob(glob.escape(target.name) + ".tmp.*"):
        if stale.name != Path(tmp).name:
            stale.unlink(missing_ok=True)
    try:
        with opener(tmp, "wb") as f:
            for chunk in data:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return sum(len(c) for c in data)


def load_state(path: str | os.PathLike) -> Any:
    """Read a state :func:`save_state` wrote; raises CorruptStateError naming what is wrong."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < len(MAGIC) + 8 or data[: len(MAGIC)] != MAGIC:
        raise CorruptStateError(f"{path} is not a lowcomm state file (bad magic or truncated)")
    (hlen,) = struct.unpack("<Q", data[len(MAGIC) : len(MAGIC) + 8])
    start = len(MAGIC) + 8
    if hlen > MAX_HEADER_BYTES or start + hlen > len(data):
        raise CorruptStateError(f"{path}: header length {hlen} runs past the end of the file")
    header = data[start : start + hlen]
    flat = (
        torch.frombuffer(bytearray(data[start + hlen :]), dtype=torch.uint8)
        if len(data) > start + hlen
        else (torch.empty(0, dtype=torch.uint8))
    )
    try:
        return unpack(header, flat)
    except CorruptStateError as e:
        raise CorruptStateError(f"{path}: {e}") from None
