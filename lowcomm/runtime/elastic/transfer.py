"""State transfers to joiners: the state format of :mod:`lowcomm.runtime.statefile`, signed.

Over the network (:func:`send_state` / :func:`recv_state`) the header and the bytes travel on a
two-process torch.distributed group (donor rank 0, joiner rank 1), followed by an HMAC-SHA256 of
both under the job key: the joiner verifies it before anything is unpacked, so a state that did
not come from a key holder is refused (:class:`ForgedStateError`) rather than trained on. The
joiner answers with an acknowledgement, so the donor knows the joiner holds the state. The format
and the files on disk (``pack``, ``unpack``, ``save_state``, ``load_state``) are re-exported here.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Any

import torch

from ..statefile import (
    MAX_HEADER_BYTES,
    CorruptStateError,
    _buffer,
    load_state,
    pack,
    save_state,
    unpack,
)

__all__ = [
    "CorruptStateError",
    "ForgedStateError",
    "pack",
    "unpack",
    "send_state",
    "recv_state",
    "save_state",
    "load_state",
]


class ForgedStateError(CorruptStateError):
    """A transferred state whose signature does not verify under the job key: it was not sent by a
    member of this job (an attack) or was changed on the way."""


def _mac(key: bytes, header: bytes, flat: torch.Tensor) -> bytes:
    mac = hmac.new(key, struct.pack("<Q", len(header)) + header, hashlib.sha256)
    mac.update(_buffer(flat))  # (the bytes where they are: no copy of the state)
    return mac.digest()


_TAG = 7141


def send_state(pg, header: bytes, flat: torch.Tensor, dst: int = 1, *, key: bytes) -> bool:
    """Send a packed state, signed with the job ``key``, to ``dst`` on ``pg``; returns the
    receiver's acknowledgement."""
    sizes = torch.tensor([len(header), flat.numel()], dtype=torch.int64)
    pg.send([sizes], dst, _TAG).wait()
    pg.send([torch.frombuffer(bytearray(header), dtype=torch.uint8)], dst, _TAG + 1).wait()
    if flat.numel():
        pg.send([flat], dst, _TAG + 2).wait()
    pg.send([torch.frombuffer(bytearray(_mac(key, header, flat)), dtype=torch.uint8)], dst, _TAG + 4).wait()
    ack = torch.zeros(1, dtype=torch.int64)
    pg.recv([ack], dst, _TAG + 3).wait()
    return bool(ack.item() == 1)


def recv_state(pg, src: int = 0, key: bytes | None = None, max_bytes: int = 1 << 40) -> Any:
    """Receive a state from ``src``, verify its signature under the job ``key``, check and unpack
    it; acknowledges success or failure to the sender.

    Raises:
        ForgedStateError: the signature does not verify (not from a key holder).
        CorruptStateError: the state fails its other checks.
    """
    if key is None:
        raise ValueError("recv_state needs the job key to verify who sent the state")

    def refuse(error: CorruptStateError):
        pg.send([torch.zeros(1, dtype=torch.int64)], src, _TAG + 3).wait()
        raise error

    sizes = torch.zeros(2, dtype=torch.int64)
    pg.recv([sizes], src, _TAG).wait()
    hlen, n = int(sizes[0]), int(sizes[1])
    if not (0 < hlen <= MAX_HEADER_BYTES and 0 <= n <= max_bytes):
        refuse(CorruptStateError(f"state transfer announced {hlen} header bytes and {n} data bytes"))
    header = torch.empty(hlen, dtype=torch.uint8)
    pg.recv([header], src, _TAG + 1).wait()
    flat = torch.empty(n, dtype=torch.uint8)
    if n:
        pg.recv([flat], src, _TAG + 2).wait()
    mac = torch.empty(32, dtype=torch.uint8)
    pg.recv([mac], src, _TAG + 4).wait()
    head = header.numpy().tobytes()
    if not hmac.compare_digest(mac.numpy().tobytes(), _mac(key, head, flat)):
        refuse(
            ForgedStateError("the state's signature does not verify under the job key: not sent by a member")
        )
    try:
        tree = unpack(head, flat)
    except CorruptStateError as e:
        refuse(e)
    pg.send([torch.ones(1, dtype=torch.int64)], src, _TAG + 3).wait()
    return tree
