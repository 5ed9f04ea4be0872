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
import os
import secrets
import threading
import time

from ..._checks import is_int, refuse
from ..._compat import listen_fd_store_kwargs, require
from ..net import check_endpoint, valid_host
from .membership import Deadline
from .protocol import (
    FIRST_CONTACT_WINDOW_S,
    KEY_REJECTED,
    MAGIC,
    ProtocolError,
    ReplayGuard,
    Signer,
    deserialize,
    serialize,
    valid_name,
)
from .state import MAX_MEMBERS, CoordinatorState, Outgoing, RoundDeadline, check_quorum

__all__ = ["Coordinator"]

zmq = require("zmq", "the elastic runtime")

log = logging.getLogger(__name__)

#: the fewest senders the replay table may be held to: two channels (main, rpc) for each of the
#: most members a job takes, and room for status clients
MIN_SENDERS = 2 * MAX_MEMBERS + 1024

TICK_S = 0.05  # how often time is let pass: deadlines are O(members), so not on every message
#: unsigned KEY_REJECTED notices sent per second at most (and one a second per peer)
REJECT_NOTICES_PER_S = 50


class Coordinator:
    """Serve one job's membership on ``bind`` until :meth:`stop`.

    Args:
        bind: ZeroMQ endpoint, e.g. "tcp://127.0.0.1:29400" (port 0 picks a free one; see ``endpoint``).
        job: the job's name (reported by status).
        key: the job's shared secret.
        deadline: when a silent member is declared dead.
        store_host: address workers use to reach the TCPStore (default: the bind host).
        min_workers, grace, round_deadline: see :class:`~.state.CoordinatorState`.
        max_senders: distinct senders remembered within the replay window (at least
            ``MIN_SENDERS``); past it a new sender is refused by name until older ones fall out of
            the window, so a flood of forged senders costs bounded memory.
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
        max_senders: int = 100_000,
    ):
        if not isinstance(job, str) or not valid_name(job, 64):
            raise ValueError(f"job={job!r} is not allowed: printable ASCII without spaces, 1..64 characters")
        if not is_int(max_senders, MIN_SENDERS):
            raise ValueError(
                f"max_senders={max_senders!r} is not allowed: an integer >= {MIN_SENDERS} (two senders "
                f"for each of the {MAX_MEMBERS} members a job takes, and room for status clients)"
            )
        self.signer = Signer(key)
        self.instance = secrets.token_hex(8)  # replies carry it; requests for another one are refused
        self._notices: dict[bytes, float] = {}  # peer -> when it was last told its key is rejected
        self._notice_budget = (0.0, 0)
        self.guard = ReplayGuard(max_senders=max_senders)
        self.dropped = 0
        self._seq = time.time_ns()
        check_quorum(min_workers, grace)  # before a socket or the store exists
        check_endpoint(bind, "bind", "tcp://0.0.0.0:29400", bind=True)
        if store_host is not None and not (isinstance(store_host, str) and valid_host(store_host)):
            raise refuse("store_host", store_host, "an IP address or host name of this machine")
        # the store first: a refused address then leaves no socket of libzmq's, which closes them
        # in its own thread (the port was still taken when a corrected coordinator bound it)
        try:
            self._store, store_addr = self._start_store(store_host, bind.split("//", 1)[-1].rsplit(":", 1)[0])
        except OSError as e:  # an address of another host, a name that does not resolve
            name, value = ("store_host", store_host) if store_host else ("bind", bind)
            raise refuse(name, value, f"an address of this host ({e.strerror or e})") from None
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)  # libzmq drops the peer past this
        try:
            if bind.endswith(":0"):
                port = self._sock.bind_to_random_port(bind[: bind.rindex(":")])
                self.endpoint = f"{bind[: bind.rindex(':')]}:{port}"
            else:
                self._sock.bind(bind)
                self.endpoint = bind
        except zmq.ZMQError as e:  # a port in use, an address not on this host, a bad port
            self._sock.close(0)
            self._store = None  # (its listening socket goes with it)
            raise ValueError(f"bind={bind!r} is not allowed: {e}") from None
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

    def _start_store(self, store_host: str | None, bind_host: str):
        """The job's TCPStore, listening where the coordinator binds (``bind_host``, or on
        ``store_host``): a socket bound to that address is handed to the store, which otherwise
        listens on every interface. Returns ``(store, "host:port")`` (the address workers are
        given)."""
        import socket

        import torch.distributed as dist

        host = store_host or bind_host
        wildcard = host in ("0.0.0.0", "*", "")
        listen = "0.0.0.0" if wildcard else host
        if wildcard:
            log.warning(
                "the TCPStore listens on every interface (bind %s); workers are told 127.0.0.1: give "
                "--store-host for workers on other hosts",
                bind_host,
            )
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((socket.gethostbyname(listen), 0))
        sock.listen(512)
        self.store_bound, port = sock.getsockname()[:2]
        fd = sock.detach()  # the store owns the socket from here and closes it when it goes
        try:
            store = dist.TCPStore(
                listen,
                port,
                is_master=True,
                wait_for_workers=False,
                master_listen_fd=fd,
                **listen_fd_store_kwargs(),
            )
        except BaseException:
            os.close(fd)
            raise
        return store, f"{'127.0.0.1' if wildcard else host}:{port}"

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
            del self._store  # the store closes its listening socket

    def _on_frames(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            self.dropped += 1
            return
        ident, payload = frames[0], frames[1:]
        try:
            msg = deserialize(payload, self.signer, self.guard)
        except ProtocolError as e:
            self.dropped += 1
            if e.authenticated:  # named by its id, so the client sees the refusal, not a silence
                self._send(
                    Outgoing((ident, e.request_id), "error", {"reason": str(e)[:1000], "code": "bad_request"})
                )
            else:
                log.info("dropped a message: %s", e)
                if len(payload) == 4 and payload[0] == MAGIC and len(payload[1]) == 32:
                    self._notice_rejected_key(ident)
            return
        except Exception as e:  # never let one message take the server down
            self.dropped += 1
            log.error("unexpected error on a message: %r", e)
            return
        stale = self._stale(msg)
        if stale:
            self._send(Outgoing((ident, msg.id), "error", {"reason": stale[1], "code": stale[0]}))
            return
        try:
            out = self.state.handle(msg.type, msg.body, (ident, msg.id), time.monotonic())
        except Exception as e:  # a bug in a rule: answer, log, keep serving
            log.exception("unexpected error handling %s from %s", msg.type, msg.sender)
            reason = f"{msg.type} failed on the coordinator: {e!r}"[:1000]
            out = [Outgoing((ident, msg.id), "error", {"reason": reason, "code": "internal"})]
        self._send_all(out)

    def _stale(self, msg) -> tuple[str, str] | None:
        """``(code, reason)`` when a request is not for this coordinator process: one meant for
        another instance (replayed across a restart: the client resends it), or a first contact
        further from this clock than the first-contact window (a replay, or a skewed clock)."""
        if msg.inst and msg.inst != self.instance:
            return "stale_instance", f"{msg.type} was meant for another coordinator process: resend it"
        skew = time.time() - msg.ts
        if not msg.inst and abs(skew) > FIRST_CONTACT_WINDOW_S:
            return "clock", (
                f"a first {msg.type} from {msg.sender!r} is {skew:+.0f}s off the coordinator's clock "
                f"(at most {FIRST_CONTACT_WINDOW_S:.0f}s allowed): a replay, or this host's clock is wrong"
            )
        return None

    def _notice_rejected_key(self, ident: bytes) -> None:
        """Tell a peer whose signature failed that its key is not the job's (unsigned: it cannot
        prove anything to the peer, only spare it a silent wait; rate-limited so it cannot be used
        to amplify traffic)."""
        now = time.monotonic()
        second, sent = self._notice_budget
        if now - second >= 1.0:
            second, sent = now, 0
        if sent >= REJECT_NOTICES_PER_S or now - self._notices.get(ident, -1.0) < 1.0:
            return
        if len(self._notices) > 10_000:
            self._notices.clear()
        self._notices[ident] = now
        self._notice_budget = (second, sent + 1)
        self._sock.send_multipart([ident, MAGIC, KEY_REJECTED])

    def _send_all(self, out: list[Outgoing]) -> None:
        for o in out:
            try:
                self._send(o)
            except Exception as e:  # a reply that cannot be built is dropped, never the server
                log.error("could not send %s: %r", o.kind, e)
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
            inst=self.instance,
        )
        self._sock.send_multipart([identity, *frames])
