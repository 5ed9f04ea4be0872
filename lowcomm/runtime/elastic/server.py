"""The coordinator's server: one ZeroMQ ROUTER socket feeding :class:`CoordinatorState`.

    lowcomm coordinator --bind tcp://0.0.0.0:29400 --job NAME      # key from $LOWCOMM_KEY
    lowcomm status tcp://host:29400

This module only moves bytes. Each frame set is verified (:func:`~.protocol.deserialize`: size,
signature, replay window, schema, in that order), handed to the state with the peer's identity
and the request id as its reply address, and whatever the state returns is signed and sent. Every
50 ms the state is told the time (expiry, round deadlines, joiners). Bad input never stops it:
unauthenticated or malformed frames are dropped and logged (no reply, so it cannot be used to
amplify traffic); authenticated messages that fail their schema get an ``error`` reply.

The coordinator also hosts the TCPStore the workers build their gloo groups from; it holds no
training tensors.
"""

from __future__ import annotations

import logging
import threading
import time

import zmq

from .membership import Deadline
from .protocol import ProtocolError, ReplayGuard, Signer, deserialize, serialize
from .state import CoordinatorState, Outgoing, RoundDeadline

__all__ = ["Coordinator"]

log = logging.getLogger(__name__)

TICK_S = 0.05  # how often time is let pass: deadlines are O(members), so not on every message


class Coordinator:
    """Serve one job's membership on ``bind`` until :meth:`stop`.

    Args:
        bind: ZeroMQ endpoint, e.g. "tcp://127.0.0.1:29400" (port 0 picks a free one; see ``endpoint``).
        job: the job's name (reported by status).
        key: the job's shared secret.
        deadline: when a silent member is declared dead.
        store_host: address workers use to reach the TCPStore (default: the bind host).
        min_workers, grace, round_deadline: see :class:`~.state.CoordinatorState`.
    """

    def __init__(
        self,
        bind: str,
        job: str,
        key: bytes,
        deadline: Deadline | None = None,
        store_host: str | None = None,
        *,
        min_workers: int = 1,
        grace: float = 0.0,
        round_deadline: RoundDeadline | None = None,
    ):
        self.signer = Signer(key)
        self.guard = ReplayGuard()
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
        self._store, store_addr = self._start_store(store_host)
        # generations are unique across restarts of the coordinator (microseconds since the epoch)
        self.state = CoordinatorState(
            job,
            store_addr,
            now=time.monotonic(),
            generation=time.time_ns() // 1000,
            deadline=deadline,
            min_workers=min_workers,
            grace=grace,
            round_deadline=round_deadline,
        )
        self._stop = threading.Event()

    def _start_store(self, store_host: str | None):
        import torch.distributed as dist

        host = store_host or self.endpoint.split("//", 1)[-1].rsplit(":", 1)[0]
        host = "127.0.0.1" if host in ("0.0.0.0", "*") else host
        store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
        return store, f"{host}:{store.port}"

    def stop(self) -> None:
        self._stop.set()

    def serve(self) -> None:
        """Handle messages until :meth:`stop`."""
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        last_tick = 0.0
        try:
            while not self._stop.is_set():
                if dict(poller.poll(int(TICK_S * 1000))).get(self._sock):
                    for _ in range(1000):  # drain what is there, then look at the clock
                        try:
                            frames = self._sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_frames(frames)
                now = time.monotonic()
                if now - last_tick >= TICK_S:
                    last_tick = now
                    self._send_all(self.state.tick(now))
        finally:
            self._sock.close(0)
            del self._store

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
                self._send(Outgoing((ident, None), "error", {"reason": str(e)[:1000], "code": "bad_request"}))
            else:
                log.info("dropped a message: %s", e)
            return
        except Exception as e:  # never let one message take the server down
            self.dropped += 1
            log.error("unexpected error on a message: %r", e)
            return
        try:
            out = self.state.handle(msg.type, msg.body, (ident, msg.id), time.monotonic())
        except Exception as e:  # a bug in a rule: answer, log, keep serving
            log.exception("unexpected error handling %s from %s", msg.type, msg.sender)
            reason = f"{msg.type} failed on the coordinator: {e!r}"[:1000]
            out = [Outgoing((ident, msg.id), "error", {"reason": reason, "code": "internal"})]
        self._send_all(out)

    def _send_all(self, out: list[Outgoing]) -> None:
        for o in out:
            self._send(o)
        for wid in self.state.departed:  # their replay entries go with them
            self.guard.forget(wid)
        self.state.departed.clear()

    def _send(self, o: Outgoing) -> None:
        identity, re = o.to
        self._seq += 1
        frames = serialize(
            self.signer,
            o.kind,
            o.body,
            sender="coordinator",
            seq=self._seq,
            epoch=self.state.membership.epoch,
            re=re,
        )
        self._sock.send_multipart([identity, *frames])
