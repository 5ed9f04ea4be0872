"""State as bytes: one format for state transfers to joiners and for checkpoints on disk.

A state is a tree of dicts, lists, numbers, strings and tensors (a DiLoCo ``state_dict()``, an
optimizer's, ...). :func:`pack` turns it into a JSON header and one flat ``uint8`` tensor holding
every tensor's bytes; the header records each tensor's dtype, shape and offset and the SHA-256 of
the flat bytes. :func:`unpack` checks sizes, dtypes (an allow-list) and the checksum before it
builds anything. Nothing is pickled, so a corrupt or hostile payload is an error, never code.

On disk (:func:`save_state` / :func:`load_state`) the file is ``MAGIC``, the header length, the
header and the bytes, written to a temporary file, fsynced and renamed over the old one, so a
failed write leaves the previous checkpoint intact. Neither holds a copy of the whole state:
:func:`save_state` writes each tensor from where it is (one at a time on the CPU) and then the
header again with the SHA-256 it hashed on the way; :func:`load_state` checks the header's sizes
and dtypes against the file, reads each tensor into its own memory, hashing, and checks the
SHA-256 before it returns anything. Over the network an elastic job sends the same
header and bytes, signed (:mod:`lowcomm.runtime.elastic.transfer`). Needs nothing beyond torch:
static jobs checkpoint with it too.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator
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


def _buffer(flat: torch.Tensor) -> memoryview:
    """The bytes of a CPU ``uint8`` tensor, without a copy (hashlib, files and HMAC take it)."""
    return memoryview(flat.numpy()) if flat.numel() else memoryview(b"")


def _digest(flat: torch.Tensor) -> str:
    return hashlib.sha256(_buffer(flat)).hexdigest()


def _encode(tree: Any) -> tuple[bytes, list[torch.Tensor], int]:
    """The header of a state tree (its SHA-256 left as zeros, of the same length), its tensors
    (where they are: nothing copied yet; their bytes one after the other) and their bytes' count."""
    tensors: list[torch.Tensor] = []
    meta: list[dict] = []
    offset = 0

    def enc(o):
        nonlocal offset
        if isinstance(o, torch.Tensor):
            if str(o.dtype) not in _DTYPES:
                raise TypeError(f"cannot pack a tensor of dtype {o.dtype}; allowed: {sorted(_DTYPES)}")
            meta.append({"dtype": str(o.dtype), "shape": list(o.shape), "offset": offset})
            tensors.append(o.detach())
            offset += o.numel() * o.element_size()
            return {"__t__": len(meta) - 1}
        if isinstance(o, dict):
            return {"__d__": [[enc(k), enc(v)] for k, v in o.items()]}
        if isinstance(o, (list, tuple)):
            return {"__l__": [enc(v) for v in o]}
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        raise TypeError(f"cannot pack a {type(o).__name__} into a state")

    header = {"format": FORMAT, "tree": enc(tree), "tensors": meta, "nbytes": offset, "sha256": "0" * 64}
    return json.dumps(header, separators=(",", ":")).encode(), tensors, offset


def _signed(header: bytes, digest: str) -> bytes:
    """``header`` (from :func:`_encode`, whose last key is the digest) holding ``digest``: the
    same length."""
    zeros = b'"sha256":"' + b"0" * 64 + b'"}'
    assert header.endswith(zeros) and len(digest) == 64
    return header[: -len(zeros)] + f'"sha256":"{digest}"}}'.encode()


#: a tensor on another device reaches the host in pieces of at most this many bytes
PIECE_BYTES = 64 << 20


def _pieces(tensors: list[torch.Tensor], size: int = PIECE_BYTES) -> Iterator[torch.Tensor]:
    """The tensors' bytes one after the other, as CPU ``uint8`` tensors of at most ``size`` bytes:
    views of a contiguous CPU tensor, copies of a piece at a time of one elsewhere (a GPU's)."""
    for t in tensors:
        flat = t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else None
        for lo in range(0, 0 if flat is None else flat.numel(), size):
            yield flat[lo : lo + size].cpu()


def _sha256(tensors: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for piece in _pieces(tensors):
        digest.update(_buffer(piece))
    return digest.hexdigest()


def pack(tree: Any) -> tuple[bytes, torch.Tensor]:
    """(header, flat bytes) of a state tree; tensors are copied to CPU, into the flat bytes (one
    :func:`messages` message of them all)."""
    header, tensors, nbytes = _encode(tree)
    flat = next(messages(tensors, nbytes, nbytes), torch.empty(0, dtype=torch.uint8))
    return _signed(header, _digest(flat)), flat


def signed(tree: Any) -> tuple[bytes, list[torch.Tensor], int]:
    """(header, tensors, bytes' count) of a state tree: :func:`pack`'s header, the tensors left
    where they are (their bytes are hashed a piece at a time, not copied). Send the bytes with
    :func:`messages` before the tensors change."""
    header, tensors, nbytes = _encode(tree)
    return _signed(header, _sha256(tensors)), tensors, nbytes


def messages(tensors: list[torch.Tensor], nbytes: int, size: int) -> Iterator[torch.Tensor]:
    """The tensors' ``nbytes`` bytes (:func:`signed`'s) in CPU ``uint8`` messages of exactly
    ``size`` bytes, the last shorter: views of one staging buffer, each valid until the next is
    asked for (a state is sent holding one message, not a copy of the state)."""
    staging, fill = torch.empty(min(size, nbytes), dtype=torch.uint8), 0
    for piece in _pieces(tensors, size):
        at = 0
        while at < piece.numel():
            k = min(piece.numel() - at, size - fill)
            staging[fill : fill + k] = piece[at : at + k]
            fill, at = fill + k, at + k
            if fill == size:
                yield staging
                fill = 0
    if fill:
        yield staging[:fill]


def _parse(header: bytes, nbytes: int) -> tuple[dict, list[tuple[torch.dtype, list[int], int, int]]]:
    """The header of a state of ``nbytes`` bytes, and each tensor's (dtype, shape, offset, bytes),
    checked against an allow-list of dtypes and the bytes there are (nothing allocated yet)."""
    try:
        h = json.loads(header.decode())
        if not isinstance(h, dict) or h.get("format") != FORMAT:
            raise CorruptStateError(f"not a {FORMAT} header")
        if int(h["nbytes"]) != nbytes:
            raise CorruptStateError(f"state holds {nbytes} bytes, its header says {h['nbytes']}")
        if not isinstance(h.get("sha256"), str) or "tree" not in h:
            raise CorruptStateError("the header has no SHA-256 of the bytes or no tree")
        specs = []
        for i, m in enumerate(h["tensors"]):
            dtype = _DTYPES.get(m["dtype"])
            if dtype is None:
                raise CorruptStateError(f"tensor {i} has dtype {m['dtype']!r}; allowed: {sorted(_DTYPES)}")
            shape = [int(s) for s in m["shape"]]
            n = (torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
            lo = int(m["offset"])
            if lo < 0 or lo + n > nbytes:
                raise CorruptStateError(f"tensor {i} lies outside the state's bytes")
            specs.append((dtype, shape, lo, n))
        return h, specs
    except CorruptStateError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RuntimeError) as e:
        raise CorruptStateError(f"malformed state header: {type(e).__name__}: {e}") from None


def _tree(h: dict, tensors: list[torch.Tensor]) -> Any:
    """The state tree of a checked header, its tensors built."""

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
    except (IndexError, KeyError, TypeError, ValueError) as e:
        raise CorruptStateError(f"malformed state tree: {e}") from None


def _mismatch() -> CorruptStateError:
    return CorruptStateError("state bytes do not match their SHA-256 (corrupted in transit or on disk)")


def unpack(header: bytes, flat: torch.Tensor) -> Any:
    """The tree :func:`pack` made; raises CorruptStateError on any mismatch, before it builds
    anything."""
    h, specs = _parse(header, flat.numel())
    if _digest(flat) != h["sha256"]:
        raise _mismatch()
    tensors = [
        flat[lo : lo + n].clone().view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)
        for dtype, shape, lo, n in specs
    ]
    return _tree(h, tensors)


def save_state(
    path: str | os.PathLike, tree: Any, *, opener: Callable[[str, str], Any] = private_open
) -> int:
    """Write ``tree`` to ``path`` atomically (temp file, fsync, rename); returns the bytes written.

    ``opener(path, mode)`` opens the temporary file (owner-only by default; the fault injector
    passes one that fails part way). If anything fails, the temporary file is removed and the
    previous file at ``path`` is untouched. The temporary files of earlier writers of ``path``
    (processes killed mid-write: a whole state each) are removed first.
    """
    header, tensors, nbytes = _encode(tree)  # (a tree that cannot be written fails here, before any file)
    tmp = f"{os.fspath(path)}.tmp.{os.getpid()}"
    target = Path(path)
    for stale in target.parent.glob(glob.escape(target.name) + ".tmp.*"):
        if stale.name != Path(tmp).name:
            stale.unlink(missing_ok=True)
    try:
        with opener(tmp, "wb") as f:
            # each tensor's bytes straight from it (one at a time on the CPU), hashed on the way;
            # then the header again with their SHA-256 (the same length)
            f.write(MAGIC + struct.pack("<Q", len(header)) + header)
            digest = hashlib.sha256()
            for piece in _pieces(tensors):
                raw = _buffer(piece)
                digest.update(raw)
                f.write(raw)
            f.seek(len(MAGIC) + 8)
            f.write(_signed(header, digest.hexdigest()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return len(MAGIC) + 8 + len(header) + nbytes


def load_state(path: str | os.PathLike) -> Any:
    """Read a state :func:`save_state` wrote; raises CorruptStateError naming what is wrong."""
    try:
        with open(path, "rb") as f:
            return _read(f, os.fstat(f.fileno()).st_size)
    except CorruptStateError as e:
        raise CorruptStateError(f"{path}: {e}") from None


def _read(f, size: int) -> Any:
    """A state file's tree (see :func:`read_tensors`)."""
    head = f.read(len(MAGIC) + 8)
    if len(head) < len(MAGIC) + 8 or head[: len(MAGIC)] != MAGIC:
        raise CorruptStateError("not a lowcomm state file (bad magic or truncated)")
    (hlen,) = struct.unpack("<Q", head[len(MAGIC) :])
    start = len(MAGIC) + 8
    if hlen > MAX_HEADER_BYTES or start + hlen > size:
        raise CorruptStateError(f"header length {hlen} runs past the end of the file")
    h, specs = _parse(f.read(hlen), size - start - hlen)
    return _tree(h, read_tensors(f.readinto, h, specs, size - start - hlen))


def read_tensors(readinto: Callable[[memoryview], int], h: dict, specs: list, nbytes: int) -> list:
    """The tensors of a state whose header :func:`_parse` checked, each read into its own memory
    from a stream of its ``nbytes`` bytes (``readinto`` fills a buffer, as a file's does): no
    copy of the whole state. The bytes are hashed on the way and checked against the header's
    SHA-256 before anything is returned; the stream is read to the end unless that raises."""
    digest, at, tensors = hashlib.sha256(), 0, []

    def read_into(buf: memoryview) -> None:
        if readinto(buf) != len(buf):
            raise CorruptStateError("the state ended early (a file written to while it was read)")
        digest.update(buf)

    for i, (dtype, shape, lo, n) in enumerate(specs):
        if lo < at:  # (pack lays the tensors out one after the other)
            raise CorruptStateError(f"tensor {i} overlaps the one before it")
        read_into(memoryview(bytearray(lo - at)))
        t = torch.empty(shape, dtype=dtype)
        read_into(_buffer(t.reshape(-1).view(torch.uint8)) if n else memoryview(bytearray(0)))
        tensors.append(t)
        at = lo + n
    read_into(memoryview(bytearray(nbytes - at)))
    if digest.hexdigest() != h["sha256"]:
        raise _mismatch()
    return tensors
