"""The coordinator: one small ZeroMQ ROUTER server that knows the job's members. It holds no tensors.

    lowcomm coordinator --bind tcp://0.0.0.0:29400 --job NAME      # key from $LOWCOMM_KEY
    lowcomm status tcp://host:29400

Workers register, heartbeat and leave; the coordinator expires silent ones (adaptive deadlines,
see :mod:`lowcomm.runtime.membership`) and answers status queries. Bad input never stops it:
unauthenticated or malformed frames are dropped and logged (no reply, so it cannot be used to
amplify traffic), authenticated messages that fail their schema get an ``error`` reply.

Quorums: a worker asks for a quorum for a round; when every live member has asked, all get the
same answer: the epoch, their rank and the world size, and the address of a TCPStore the
coordinator hosts plus a fresh generation number, so that the group is built from
``PrefixStore(f"g{generation}/", store)`` and a re-formed group never meets the keys of a failed
one. A member that dies while the others wait is expired and the quorum forms without it.

Not yet here (the elastic-membership issue continues): state transfer to joiners and the worker
agent that rebuilds groups and redoes failed rounds.
"""

from __future__ import annotations

import logging
import threading
import time

import zmq

from .membership import Deadline, Membership, expire, heartbeat, leave, ranks, register
from .protocol import ProtocolError, ReplayGuard, Signer, deserialize, serialize

__all__ = ["Coordinator", "CoordinatorClient", "CoordinatorError"]

log = logging.getLogger(__name__)


class CoordinatorError(RuntimeError):
    """The coordinator answered with an error, or did not answer in time."""


class Coordinator:
    """Serve one job's membership on ``bind`` until :meth:`stop`.

    Args:
        bind: ZeroMQ endpoint, e.g. "tcp://127.0.0.1:29400" (port 0 picks a free one; see ``endpoint``).
        job: the job's name (reported by status).
        key: the job's shared secret.
        deadline: when a silent member is declared dead.
    """

    def __init__(
        self, bind: str, job: str, key: bytes, deadline: Deadline | None = None, store_host: str | None = None
    ):
        self.job, self.signer, self.deadline = job, Signer(key), deadline or Deadline()
        self._pending: dict[str, tuple[bytes, int]] = {}  # worker -> (identity, round) waiting for a quorum
        self.generation = 0
        self._store = None
        self._store_host = store_host
        self.guard = ReplayGuard()
        self.membership = Membership()
        self.round = -1
        self.dropped = 0
        self._seq = time.time_ns()
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)  # libzmq drops the peer past this
        if bind.endswith(":0"):
            port = self._sock.bind_to_random_port(bind[: bind.rindex(":")])
            self.endpoint = f"{bind[: bind.rindex(':')]}:{port}"
        else:
            self._sock.bind(bind)
            self.endpoint = bind
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def serve(self) -> None:
        """Handle messages until :meth:`stop` (checks expiry every 100 ms)."""
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if dict(poller.poll(100)).get(self._sock):
                    frames = self._sock.recv_multipart(zmq.NOBLOCK)
                    self._on_frames(frames)
                self._expire()
        finally:
            self._sock.close(0)

    def _expire(self) -> None:
        ms, dead = expire(self.membership, time.monotonic(), self.deadline)
        if dead:
            log.warning(
                "members %s missed their heartbeat deadline; epoch %d -> %d",
                dead,
                self.membership.epoch,
                ms.epoch,
            )
            for d in dead:
                self.guard.forget(d)
                self._pending.pop(d, None)
            self.membership = ms
            self._try_quorum()

    def store_address(self) -> str:
        """host:port of the TCPStore the coordinator hosts (started on first use)."""
        if self._store is None:
            import torch.distributed as dist

            host = self._store_host or self.endpoint.split("//", 1)[-1].rsplit(":", 1)[0]
            host = "127.0.0.1" if host in ("0.0.0.0", "*") else host
            self._store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
            self._store_addr = f"{host}:{self._store.port}"
        return self._store_addr

    def _try_quorum(self) -> None:
        live = set(self.membership.ids)
        if not live or not live <= set(self._pending):
            return
        self.generation += 1
        rk, store = ranks(self.membership), self.store_address()
        top = max(m.step for m in self.membership.members)
        donors = [m.worker_id for m in self.membership.members if m.step == top]
        log.info(
            "quorum: epoch %d, generation %d, %d members", self.membership.epoch, self.generation, len(live)
        )
        for wid in sorted(live, key=rk.get):
            ident, _ = self._pending.pop(wid)
            body = {
                "epoch": self.membership.epoch,
                "rank": rk[wid],
                "world": len(live),
                "members": self.membership.ids,
                "store": store,
                "generation": self.generation,
                "donors": donors,
            }
            self._reply(ident, "quorum_reply", body)

    def _on_frames(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            self.dropped += 1
            return
        ident, payload = frames[0], frames[1:]
        try:
            msg = deserialize(payload, self.signer, self.guard)
        except ProtocolError as e:
            self.dropped += 1
            if e.authenticated:
                self._reply(ident, "error", {"reason": str(e)[:1000]})
            else:
                log.info("dropped a message: %s", e)
            return
        except Exception as e:  # never let one message take the server down
            self.dropped += 1
            log.error("unexpected error on a message: %r", e)
            return
        try:
            reply = self._handle(msg, ident)
        except (KeyError, ValueError) as e:
            reply = "error", {"reason": f"{msg.type} refused: {e}"[:1000]}
        if reply is not None:  # a quorum request is answered when the quorum forms
            self._reply(ident, *reply)

    def _members(self) -> list[dict]:
        now, rk = time.monotonic(), ranks(self.membership)
        return [
            {
                "worker_id": m.worker_id,
                "addr": m.addr,
                "rank": rk[m.worker_id],
                "step": m.step,
                "round": m.round,
                "last_seen_s": round(now - m.last_seen, 3),
            }
            for m in self.membership.members
        ]

    def _handle(self, msg, ident: bytes) -> tuple[str, dict] | None:
        now, b = time.monotonic(), msg.body
        if msg.type == "register":
            self.membership = register(self.membership, b["worker_id"], b["advertise_addr"], b["step"], now)
            log.info(
                "registered %s (%s); epoch %d", b["worker_id"], b["advertise_addr"], self.membership.epoch
            )
            return "ok", {"epoch": self.membership.epoch, "members": self.membership.ids}
        if msg.type == "heartbeat":
            try:
                self.membership = heartbeat(self.membership, b["worker_id"], b["step"], b["round"], now)
            except KeyError:
                raise KeyError(f"worker {b['worker_id']!r} is not registered (register again)") from None
            self.round = max(self.round, b["round"])
            return "ok", {"epoch": self.membership.epoch}
        if msg.type == "leave":
            self.membership = leave(self.membership, b["worker_id"])
            return "ok", {"epoch": self.membership.epoch}
        if msg.type == "quorum":
            if self.membership.get(b["worker_id"]) is None:
                raise KeyError(f"worker {b['worker_id']!r} is not registered (register again)")
            self._pending[b["worker_id"]] = (ident, b["round"])
            self._try_quorum()
            return None
        if msg.type == "status":
            return "status_reply", {
                "job": self.job,
                "epoch": self.membership.epoch,
                "round": self.round,
                "members": self._members(),
            }
        raise ValueError(f"message type {msg.type!r} is not served by the coordinator yet")

    def _reply(self, ident: bytes, kind: str, body: dict) -> None:
        self._seq += 1
        self._sock.send_multipart(
            [
                ident,
                *serialize(
                    self.signer, kind, body, sender="coordinator", seq=self._seq, epoch=self.membership.epoch
                ),
            ]
        )


class CoordinatorClient:
    """Request/reply client of a coordinator (one DEALER socket; not thread-safe)."""

    def __init__(self, endpoint: str, key: bytes, sender: str, timeout_s: float = 5.0):
        self.endpoint, self.sender, self.timeout_s = endpoint, sender, timeout_s
        self.signer = Signer(key)
        self.guard = ReplayGuard()
        self._seq = time.time_ns()  # survives restarts of this sender: the coordinator wants seq to grow
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)

    def request(self, kind: str, body: dict, epoch: int = -1, timeout_s: float | None = None):
        """Send one message and return the verified reply; raises CoordinatorError on error or timeout."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        self._seq = max(self._seq + 1, time.time_ns())
        self._sock.send_multipart(
            serialize(self.signer, kind, body, sender=self.sender, seq=self._seq, epoch=epoch)
        )
        if not self._sock.poll(int(timeout_s * 1000)):
            raise CoordinatorError(f"no reply from the coordinator at {self.endpoint} within {timeout_s}s")
        reply = deserialize(self._sock.recv_multipart(), self.signer, self.guard)
        if reply.type == "error":
            raise CoordinatorError(reply.body["reason"])
        return reply

    def close(self) -> None:
        self._sock.close(0)
