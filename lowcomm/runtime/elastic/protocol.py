"""The coordinator's wire protocol: msgpack frames, an HMAC over every message, one schema per type.

A message is four ZeroMQ frames (a ROUTER socket adds the peer identity in front):

    [b"LC1", signature, header, body]

``header`` and ``body`` are msgpack maps. ``signature`` is HMAC-SHA256(key, header || body), 32
raw bytes. The header carries ``v`` (protocol version), ``type``, ``id`` (message id), ``sender``,
``seq`` (per-sender, strictly increasing), ``epoch``, ``ts`` (sender's wall clock), on a reply
``re`` (the request's id), and ``inst``: on a reply, the coordinator process's random instance
id; on a request, the instance the client last heard from. A coordinator refuses a request meant
for another instance (a message captured before a restart and replayed), and a request with no
instance (a first contact) older than :data:`FIRST_CONTACT_WINDOW_S`.

Names (worker ids, senders, the job) are printable ASCII without spaces, at most 128 characters,
so no name can forge a log line.

Authentication: a shared secret per job (``lowcomm keys`` makes one), not ZMQ CURVE: the control
plane carries no tensors and no secrets, so it needs integrity and authenticity, not secrecy; one
secret in the environment is easier to deploy across providers than a CURVE key pair per node and
a libzmq built with libsodium; and the signed header gives replay protection, which CURVE alone
does not.

Incoming frames are checked in a fixed order before anything is interpreted: frame count, total
size, magic, signature length, constant-time signature check, header unpack with size limits,
header schema, version, replay window (seq and ts), body unpack, body schema. Nothing is
unpickled; msgpack is unpacked with strict limits and no extension types.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..._compat import require
from ..net import valid_name

msgpack = require("msgpack", "the elastic runtime")

__all__ = [
    "MAGIC",
    "VERSION",
    "MAX_MESSAGE_BYTES",
    "SCHEMAS",
    "ProtocolError",
    "Message",
    "Signer",
    "ReplayGuard",
    "serialize",
    "deserialize",
    "new_key",
    "load_key",
]

MAGIC = b"LC1"
VERSION = 2
MAX_MESSAGE_BYTES = 64 * 1024
REPLAY_WINDOW_S = 300.0
FIRST_CONTACT_WINDOW_S = 30.0
#: the two unsigned frames ``[MAGIC, KEY_REJECTED]`` a coordinator sends a peer whose signature
#: fails (rate-limited), so a worker with the wrong key reports that instead of waiting silently
KEY_REJECTED = b"KEY-REJECTED"
_STR = 256  # longest string field
NAME = "name"  # the bound of a name field: printable ASCII, no spaces, 1..128 characters


class ProtocolError(ValueError):
    """A message that failed a check; ``authenticated`` tells whether its signature was valid, and
    ``request_id`` is its id when its header could be read (a refusal then names the request)."""

    def __init__(self, reason: str, authenticated: bool = False, request_id: str | None = None):
        super().__init__(reason)
        self.authenticated, self.request_id = authenticated, request_id


# field -> (python types, required, bound); bound: max length for str/list, (lo, hi) for numbers
_Field = tuple[tuple[type, ...], bool, Any]
HEADER: dict[str, _Field] = {
    "v": ((int,), True, (0, 1 << 16)),
    "type": ((str,), True, 32),
    "id": ((str,), True, 64),
    "sender": ((str,), True, NAME),
    "seq": ((int,), True, (0, 1 << 62)),
    "epoch": ((int,), True, (-1, 1 << 62)),
    "ts": ((float, int), True, (0.0, 1e11)),
    "re": ((str,), False, 64),  # a reply: the id of the request it answers
    "inst": ((str,), False, 64),  # the coordinator instance (see the module docstring)
}
_WID = ((str,), True, NAME)
_ROUND = ((int,), True, (-1, 1 << 62))
_GEN = ((int,), True, (0, 1 << 62))
_BOOL = ((bool,), True, None)
SCHEMAS: dict[str, dict[str, _Field]] = {
    "register": {
        "worker_id": _WID,
        "advertise_addr": ((str,), True, _STR),
        "step": ((int,), True, (0, 1 << 62)),
        # the elastic worker agent's fields; a bare client (tests, tools) may leave them out
        "incarnation": ((str,), False, 64),
        "fingerprint": ((str,), False, 64),
        "synced": ((bool,), False, None),
        "round": ((int,), False, (0, 1 << 62)),
        # the claimed round is backed by state this worker holds (its checkpoint, or what it kept
        # through a coordinator restart); a bare claim beyond the job's round is not believed
        "holds_state": ((bool,), False, None),
    },
    "heartbeat": {
        "worker_id": _WID,
        "step": ((int,), True, (0, 1 << 62)),
        "round": _ROUND,
    },
    "quorum": {"worker_id": _WID, "round": ((int,), True, (0, 1 << 62))},
    "commit": {
        "worker_id": _WID,
        "round": ((int,), True, (0, 1 << 62)),
        "generation": _GEN,
        "ok": _BOOL,
        "members": ((list,), True, 4096),
        "suspects": ((list,), False, 4096),  # members that never entered the failed round
    },
    "join": {"worker_id": _WID, "failed": ((list,), True, 64)},
    "transfer_done": {
        "worker_id": _WID,
        "joiner": _WID,
        "transfer_id": _GEN,
        "ok": _BOOL,
        "round": ((int,), True, (0, 1 << 62)),
        "step": ((int,), True, (0, 1 << 62)),
    },
    "leave": {"worker_id": _WID, "finished": ((bool,), False, None)},
    "status": {"offset": ((int,), False, (0, 1 << 20)), "limit": ((int,), False, (1, 500))},
    # replies
    "ok": {"epoch": ((int,), True, (-1, 1 << 62)), "members": ((list,), False, 4096)},
    "register_reply": {
        "epoch": ((int,), True, (0, 1 << 62)),
        "synced": _BOOL,
        "size": ((int,), True, (0, 1 << 20)),  # members after this registration
    },
    "heartbeat_reply": {
        "epoch": ((int,), True, (0, 1 << 62)),
        "synced": _BOOL,
        "aborted": ((list,), True, 64),  # generations (rounds' attempts) given up
        "cancelled": ((list,), True, 64),  # state transfers given up by one side
        "lost": ((list,), True, 64),
        "serve": ((list,), True, 16),
    },
    "quorum_reply": {
        "round": ((int,), True, (0, 1 << 62)),
        "action": ((str,), True, 16),
        "epoch": ((int,), True, (0, 1 << 62)),
        "rank": ((int,), True, (-1, 1 << 20)),
        "world": ((int,), True, (0, 1 << 20)),
        "members": ((list,), True, 4096),
        "store": ((str,), True, _STR),
        "generation": _GEN,
        "rendezvous": ((str,), True, 64),  # the group's secret store prefix
    },
    "decision": {"round": ((int,), True, (0, 1 << 62)), "generation": _GEN, "commit": _BOOL},
    "join_reply": {
        "donor": _WID,
        "donor_addr": ((str,), True, _STR),
        "transfer_id": _GEN,
        "store": ((str,), True, _STR),
        "rendezvous": ((str,), True, 64),
    },
    "status_reply": {  # one page of members: offset .. offset + len(members) of total
        "job": ((str,), True, NAME),
        "epoch": ((int,), True, (-1, 1 << 62)),
        "round": ((int,), True, (-1, 1 << 62)),
        "total": ((int,), True, (0, 1 << 20)),
        "offset": ((int,), True, (0, 1 << 20)),
        "members": ((list,), True, 500),
        "finished": ((bool,), False, None),  # (a coordinator of before 2026-12-08 sends none)
    },
    # a refusal: ``code`` names its kind for the client (lowcomm.runtime.errors.REFUSAL_CODES)
    "error": {"reason": ((str,), True, 1024), "code": ((str,), True, 32)},
}


def _check(obj: Any, schema: dict[str, _Field], what: str) -> None:
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} must be a map, got {type(obj).__name__}", True)
    unknown = set(obj) - set(schema)
    if unknown:
        raise ProtocolError(f"{what} has unknown fields {sorted(map(str, unknown))[:5]}", True)
    for name, (types, required, bound) in schema.items():
        if name not in obj:
            if required:
                raise ProtocolError(f"{what} lacks field {name!r}", True)
            continue
        v = obj[name]
        if isinstance(v, bool) != (bool in types) or not isinstance(v, types):
            raise ProtocolError(
                f"{what}.{name} must be {'/'.join(t.__name__ for t in types)}, got {type(v).__name__}", True
            )
        if bound is None:
            continue
        if bound == NAME:
            if not valid_name(v):
                raise ProtocolError(
                    f"{what}.{name} must be printable ASCII without spaces, 1..128 characters", True
                )
            continue
        if isinstance(v, (str, list)) and len(v) > bound:
            raise ProtocolError(f"{what}.{name} is longer than {bound}", True)
        if isinstance(v, (int, float)) and not bound[0] <= v <= bound[1]:
            raise ProtocolError(f"{what}.{name}={v} is outside [{bound[0]}, {bound[1]}]", True)


@dataclass(frozen=True)
class Message:
    """A decoded, verified message."""

    type: str
    sender: str
    seq: int
    epoch: int
    body: dict
    id: str = ""
    ts: float = 0.0
    re: str = ""
    inst: str = ""


class Signer:
    """HMAC-SHA256 with the job's secret."""

    def __init__(self, key: bytes):
        if not isinstance(key, bytes) or len(key) < 16:
            raise ValueError("the job key must be at least 16 bytes (use `lowcomm keys` to make one)")
        self._key = key

    def sign(self, header: bytes, body: bytes) -> bytes:
        return hmac.new(self._key, header + body, hashlib.sha256).digest()

    def verify(self, signature: bytes, header: bytes, body: bytes) -> bool:
        return hmac.compare_digest(signature, self.sign(header, body))


class ReplayGuard:
    """Per-sender strictly increasing ``seq`` and a wall-clock window on ``ts``.

    The table is bounded: a sender silent for longer than the window is forgotten when room is
    needed (any message of it that old fails the window check anyway), so at most ``max_senders``
    senders active within one window exist at a time and no sender is refused for old ones.
    """

    def __init__(self, window_s: float = REPLAY_WINDOW_S, max_senders: int = 100_000):
        self.window_s, self.max_senders = window_s, max_senders
        self._last: dict[str, tuple[int, float]] = {}  # sender -> (last seq, when it was seen)

    def __len__(self) -> int:
        return len(self._last)

    def check(self, sender: str, seq: int, ts: float, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if abs(now - ts) > self.window_s:
            raise ProtocolError(f"message from {sender!r} is {now - ts:+.0f}s off the clock window", True)
        last = self._last.get(sender)
        if last is not None and seq <= last[0]:
            raise ProtocolError(
                f"replayed or reordered message from {sender!r}: seq {seq} <= {last[0]}", True
            )
        if last is None and len(self._last) >= self.max_senders:
            self._prune(now)
            if len(self._last) >= self.max_senders:
                raise ProtocolError(
                    f"too many senders active within {self.window_s:.0f}s ({self.max_senders}); try later",
                    True,
                )
        self._last.pop(sender, None)  # re-inserted last: the table stays in order of last contact
        self._last[sender] = (seq, now)

    def _prune(self, now: float) -> None:
        """Forget the senders silent for longer than the window: the table is in order of last
        contact, so they are at its front (O(forgotten) per call)."""
        while self._last:
            sender, (_, seen) = next(iter(self._last.items()))
            if now - seen <= self.window_s:
                return
            del self._last[sender]

    def forget(self, worker: str) -> None:
        """Drop the entries of ``worker``: the sender itself and its clients ``worker/<role>``."""
        for role in ("", "/main", "/rpc", "/hb"):
            self._last.pop(worker + role, None)


def serialize(
    signer: Signer,
    type: str,
    body: dict,
    *,
    sender: str,
    seq: int,
    epoch: int = -1,
    re: str | None = None,
    inst: str | None = None,
) -> list[bytes]:
    """Build the four frames of a message (the body is checked against its schema first)."""
    if type not in SCHEMAS:
        raise ValueError(f"unknown message type {type!r}; allowed: {sorted(SCHEMAS)}")
    _check(body, SCHEMAS[type], f"{type} body")
    header = {
        "v": VERSION,
        "type": type,
        "id": uuid.uuid4().hex,
        "sender": sender,
        "seq": seq,
        "epoch": epoch,
        "ts": time.time(),
    }
    if re:
        header["re"] = re
    if inst:
        header["inst"] = inst
    h = msgpack.packb(header, use_bin_type=True)
    b = msgpack.packb(body, use_bin_type=True)
    return [MAGIC, signer.sign(h, b), h, b]


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(
        data,
        raw=False,
        strict_map_key=True,
        max_str_len=MAX_MESSAGE_BYTES,
        max_bin_len=MAX_MESSAGE_BYTES,
        max_array_len=4096,
        max_map_len=256,
        max_ext_len=0,
    )


def deserialize(frames: list[bytes], signer: Signer, guard: ReplayGuard | None = None) -> Message:
    """Check ``frames`` in the documented order and return the message, or raise ProtocolError."""
    if len(frames) != 4:
        raise ProtocolError(f"expected 4 frames, got {len(frames)}")
    if sum(len(f) for f in frames) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message larger than {MAX_MESSAGE_BYTES} bytes")
    magic, sig, h, b = frames
    if magic != MAGIC:
        raise ProtocolError("bad magic (not a lowcomm message or another protocol version)")
    if len(sig) != 32:
        raise ProtocolError("signature missing or malformed")
    if not signer.verify(sig, h, b):
        raise ProtocolError("bad signature (wrong key or tampered message)")
    try:
        header = _unpack(h)
    except Exception as e:
        raise ProtocolError(f"header is not valid msgpack: {type(e).__name__}", True) from None
    rid = header.get("id") if isinstance(header, dict) and isinstance(header.get("id"), str) else None
    try:
        _check(header, HEADER, "header")
        if header["v"] != VERSION:
            raise ProtocolError(f"protocol version {header['v']} is not {VERSION}", True)
        if header["type"] not in SCHEMAS:
            raise ProtocolError(f"unknown message type {header['type']!r}", True)
        if guard is not None:
            guard.check(header["sender"], header["seq"], float(header["ts"]))
        try:
            body = _unpack(b)
        except Exception as e:
            raise ProtocolError(f"body is not valid msgpack: {type(e).__name__}", True) from None
        _check(body, SCHEMAS[header["type"]], f"{header['type']} body")
    except ProtocolError as e:  # authenticated: name the request so its sender gets the refusal
        e.request_id = rid if rid and len(rid) <= 64 else None
        raise
    return Message(
        header["type"],
        header["sender"],
        header["seq"],
        header["epoch"],
        body,
        header["id"],
        float(header["ts"]),
        header.get("re", ""),
        header.get("inst", ""),
    )


def new_key() -> str:
    """A fresh job secret, hex (32 random bytes)."""
    return secrets.token_hex(32)


def load_key(spec: str | None = None) -> bytes:
    """The job key from ``spec`` (hex string or @file), else $LOWCOMM_KEY / $LOWCOMM_KEY_FILE.

    Raises:
        ValueError: no key given, or not valid hex.
    """
    spec = (
        spec
        or os.environ.get("LOWCOMM_KEY")
        or ("@" + os.environ["LOWCOMM_KEY_FILE"] if os.environ.get("LOWCOMM_KEY_FILE") else None)
    )
    if not spec:
        raise ValueError(
            "no job key: pass --key, or set LOWCOMM_KEY or LOWCOMM_KEY_FILE (make one with `lowcomm keys`)"
        )
    where = ""
    if spec.startswith("@"):
        where = f" in key file {spec[1:]!r}"
        try:
            with open(spec[1:]) as f:
                mode = os.fstat(f.fileno()).st_mode
                if mode & 0o077:  # as ssh says of a private key others can read
                    logging.getLogger(__name__).warning(
                        "key file %r can be read by other users (mode %o): chmod 600 it",
                        spec[1:],
                        mode & 0o777,
                    )
                spec = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
            raise ValueError(f"key file {spec[1:]!r} cannot be read: {why}") from None
    try:
        return bytes.fromhex(spec)
    except ValueError:
        raise ValueError(f"the job key{where} must be hex (as `lowcomm keys` prints it)") from None
