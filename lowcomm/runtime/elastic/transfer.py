"""State transfers to joiners: the state format of :mod:`lowcomm.runtime.statefile`, signed.

Over the network (:func:`send_state` / :func:`recv_state`) the header and the bytes travel on a
two-process torch.distributed group (donor rank 0, joiner rank 1), the bytes in messages of at
most ``CHUNK_BYTES`` copied from the donor's tensors one at a time, followed by an HMAC-SHA256 of
both under the job key: the joiner reads each tensor into its own memory as the bytes arrive and
verifies the HMAC before it returns or uses any, so a state that did not come from a key holder
is refused (:class:`ForgedStateError`) rather than trained on. The joiner answers with an
acknowledgement, so the donor knows the joiner holds the state. The format and the files on disk
(``pack``, ``unpack``, ``save_state``, ``load_state``) are re-exported here.
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
    _parse,
    _tree,
    load_state,
    messages,
    pack,
    read_tensors,
    save_state,
    signed,
    unpack,
)

__all__ = [
    "CorruptStateError",
    "ForgedStateError",
    "pack",
    "unpack",
    "send_state",
    "send_signed",
    "signed",
    "recv_state",
    "save_state",
    "load_state",
]


class ForgedStateError(CorruptStateError):
    """A transferred state whose signature does not verify under the job key: it was not sent by a
    member of this job (an attack) or was changed on the way."""


def _mac(key: bytes, header: bytes) -> hmac.HMAC:
    """The transfer's HMAC, the header taken; the bytes are added as they go."""
    return hmac.new(key, struct.pack("<Q", len(header)) + header, hashlib.sha256)


_TAG = 7141

#: the bytes go in messages of at most this many: the donor holds one (not a copy of the state),
#: the joiner reads each into the tensors it builds (holding one message more than the state)
CHUNK_BYTES = 64 << 20


def send_state(pg, tree: Any, dst: int = 1, *, key: bytes) -> bool:
    """Send a state tree, signed with the job ``key``, to ``dst`` on ``pg``; returns the
    receiver's acknowledgement. The tensors are read where they are, a message at a time (a
    piece at a time from a GPU): the sender holds one message, not a copy of the state. They
    must not change until this returns."""
    return send_signed(pg, *signed(tree), dst, key=key)


def send_signed(
    pg, header: bytes, tensors: list[torch.Tensor], nbytes: int, dst: int = 1, *, key: bytes
) -> bool:
    """:func:`send_state` of a state :func:`signed` gave (header, tensors, bytes' count)."""
    sizes = torch.tensor([len(header), nbytes], dtype=torch.int64)
    pg.send([sizes], dst, _TAG).wait()
    pg.send([torch.frombuffer(bytearray(header), dtype=torch.uint8)], dst, _TAG + 1).wait()
    mac = _mac(key, header)
    for message in messages(tensors, nbytes, CHUNK_BYTES):
        mac.update(_buffer(message))
        pg.send([message], dst, _TAG + 2).wait()
    pg.send([torch.frombuffer(bytearray(mac.digest()), dtype=torch.uint8)], dst, _TAG + 4).wait()
    ack = torch.zeros(1, dtype=torch.int64)
    pg.recv([ack], dst, _TAG + 3).wait()
    return bool(ack.item() == 1)


class _Received:
    """The state's bytes as a stream (``readinto``), received in the sender's messages and added
    to the transfer's HMAC as they come."""

    def __init__(self, pg, src: int, nbytes: int, mac: hmac.HMAC) -> None:
        self.pg, self.src, self.left, self.mac = pg, src, nbytes, mac
        self.chunk, self.at = torch.empty(0, dtype=torch.uint8), 0

    def _next(self) -> None:
        self.chunk, self.at = torch.empty(min(CHUNK_BYTES, self.left), dtype=torch.uint8), 0
        self.pg.recv([self.chunk], self.src, _TAG + 2).wait()
        self.left -= self.chunk.numel()
        self.mac.update(_buffer(self.chunk))

    def readinto(self, buf: memoryview) -> int:
        done = 0
        while done < len(buf):
            if self.at == self.chunk.numel():
                if not self.left:
                    break
                self._next()
            k = min(len(buf) - done, self.chunk.numel() - self.at)
            buf[done : done + k] = _buffer(self.chunk)[self.at : self.at + k]
            done, self.at = done + k, self.at + k
        return done

    def drain(self) -> None:
        """Receive the rest (a state refused part way: the sender still sends it, and its HMAC
        tells a stranger's state from a damaged one)."""
        while self.left:
            self._next()


def recv_state(pg, src: int = 0, key: bytes | None = None, max_bytes: int = 1 << 40) -> Any:
    """Receive a state from ``src``, verify its signature under the job ``key``, check and unpack
    it; acknowledges success or failure to the sender. Each tensor is read into its own memory as
    the bytes arrive; nothing is returned, nor acknowledged, before the signature verifies.

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
    head = header.numpy().tobytes()
    mac = _mac(key, head)
    received = _Received(pg, src, n, mac)
    error, tree = None, None
    try:
        h, specs = _parse(head, n)
        tree = _tree(h, read_tensors(received.readinto, h, specs, n))
    except CorruptStateError as e:
        error = e
    received.drain()
    sent = torch.empty(32, dtype=torch.uint8)
    pg.recv([sent], src, _TAG + 4).wait()
    if not hmac.compare_digest(sent.numpy().tobytes(), mac.digest()):
        refuse(
            ForgedStateError("the state's signature does not verify under the job key: not sent by a member")
        )
    if error is not None:
        refuse(error)
    pg.send([torch.ones(1, dtype=torch.int64)], src, _TAG + 3).wait()
    return tree
