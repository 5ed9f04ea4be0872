"""The coordinator's client: one DEALER socket, signed requests, verified replies, typed errors."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

from ..._compat import require
from ..errors import CoordinatorTimeout, KeyRejected, refusal
from ..net import check_endpoint
from .protocol import KEY_REJECTED, MAGIC, ProtocolError, ReplayGuard, Signer, deserialize, serialize

msgpack = require("msgpack", "the elastic runtime")
zmq = require("zmq", "the elastic runtime")

__all__ = ["CoordinatorClient"]

log = logging.getLogger(__name__)

#: seconds a request waits for a signed reply once the coordinator said it cannot verify this
#: client's key (an unsigned notice: the job's key would be needed to sign it)
KEY_REJECTED_WAIT_S = 1.0
#: the longest wait one ZeroMQ poll takes (its timeout is a C int of milliseconds)
_POLL_MAX_MS = 2**31 - 1


class CoordinatorClient:
    """Request/reply client of a coordinator (not thread-safe: one per thread).

    Args:
        endpoint: "tcp://host:port" (anything else: ValueError).
        key: the job's shared secret.
        sender: this client's name (a worker's clients are ``worker/role``).
        timeout_s: default seconds to wait for a reply.
        blocked: a callable that is true while the coordinator cannot be reached (a partition
            injected by a fault plan); requests then time out without being sent.

    Raises (from requests): :class:`~lowcomm.runtime.errors.CoordinatorTimeout` when no reply
    comes in time, a :class:`~lowcomm.runtime.errors.CoordinatorRefused` subclass named by the
    reply's code when the coordinator refuses.
    """

    def __init__(
        self,
        endpoint: str,
        key: bytes,
        sender: str,
        timeout_s: float = 5.0,
        blocked: Callable[[], bool] | None = None,
    ):
        self.endpoint = check_endpoint(endpoint, "endpoint", "tcp://host:29400")
        self.sender, self.timeout_s = sender, timeout_s
        self.signer = Signer(key)
        self.guard = ReplayGuard()
        self._blocked = blocked
        self._seq = time.time_ns()  # survives restarts of this sender: the coordinator wants seq to grow
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)
        self._sent_ids: collections.deque[str] = collections.deque(maxlen=64)
        self.inst: str | None = None  # the coordinator process last heard from
        self.last_reply_at: float | None = None  # time.monotonic() of the last verified reply
        self._key_rejected = False

    @property
    def key_rejected(self) -> bool:
        """Whether the coordinator said it cannot verify this client's key (and sent no reply)."""
        return self._key_rejected

    def _send(self, kind: str, body: dict, epoch: int) -> str:
        self._seq = max(self._seq + 1, time.time_ns())
        frames = serialize(
            self.signer, kind, body, sender=self.sender, seq=self._seq, epoch=epoch, inst=self.inst
        )
        self._sock.send_multipart(frames)
        self._sent_ids.append(msgpack.unpackb(frames[2])["id"])
        return self._sent_ids[-1]

    def _recv(self, timeout_s: float):
        deadline = time.monotonic() + timeout_s
        while True:  # ZeroMQ's poll takes a C int of ms: a wait of 25 days or more, in slices
            ms = min(max(int((deadline - time.monotonic()) * 1000), 0), _POLL_MAX_MS)
            if self._sock.poll(ms):
                break
            if ms < _POLL_MAX_MS:
                return None
        frames = self._sock.recv_multipart()
        if frames == [MAGIC, KEY_REJECTED]:  # unsigned: a reason to report if no reply comes soon
            self._key_rejected = True
            return None
        try:
            reply = deserialize(frames, self.signer, self.guard)
        except ProtocolError as e:  # a forged or replayed reply is dropped, never believed
            log.warning("dropped a reply from %s: %s", self.endpoint, e)
            return None
        self.inst = reply.inst or self.inst
        self.last_reply_at = time.monotonic()  # a refusal too: the coordinator is alive
        return reply

    def request(self, kind: str, body: dict, epoch: int = -1, timeout_s: float | None = None, match=None):
        """Send one message and return the verified reply.

        A reply names the request it answers; replies to other requests (late answers to earlier
        ones) are discarded, except that ``match(reply)`` may accept an answer to an earlier send
        of the same long-poll (:meth:`call`).
        """
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if self._blocked is not None and self._blocked():
            time.sleep(timeout_s)
            raise CoordinatorTimeout(
                f"no reply from the coordinator at {self.endpoint} (partitioned by a fault)"
            )
        mine = self._send(kind, body, epoch)
        end = time.monotonic() + timeout_s
        while True:
            reply = self._recv(end - time.monotonic())
            if self._key_rejected:  # a signed reply still wins if one comes within KEY_REJECTED_WAIT_S
                end = min(end, time.monotonic() + KEY_REJECTED_WAIT_S)
            if reply is None:
                if time.monotonic() >= end:
                    if self._key_rejected:
                        raise KeyRejected(
                            f"the coordinator at {self.endpoint} rejects this key (its signature "
                            "check fails): this process holds another job's key; check LOWCOMM_KEY "
                            "or LOWCOMM_KEY_FILE"
                        )
                    raise CoordinatorTimeout(
                        f"no reply from the coordinator at {self.endpoint} within {timeout_s}s"
                    )
                continue
            if reply.re == mine or (match is not None and reply.re in self._sent_ids and match(reply)):
                if reply.type == "error" and reply.body["code"] == "stale_instance":
                    self.inst = None  # a restarted coordinator: say it again, to the new process
                    mine = self._send(kind, body, epoch)
                    continue
                if reply.type == "error":
                    raise refusal(reply.body["code"], reply.body["reason"])
                return reply

    def call(self, kind: str, body: dict, *, match=None, resend_s: float = 1.0, cancel=None):
        """A long-poll: send and re-send every ``resend_s`` (a restarted coordinator lost the first
        one) until a matching reply arrives or ``cancel()`` is true (then returns None)."""
        while cancel is None or not cancel():
            try:
                return self.request(kind, body, timeout_s=resend_s, match=match)
            except CoordinatorTimeout:
                continue
        return None

    def close(self) -> None:
        self._sock.close(0)
