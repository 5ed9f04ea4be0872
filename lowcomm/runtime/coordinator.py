"""The coordinator: one small ZeroMQ ROUTER server that knows the job's members. It holds no tensors.

    lowcomm coordinator --bind tcp://0.0.0.0:29400 --job NAME      # key from $LOWCOMM_KEY
    lowcomm status tcp://host:29400

Workers register, heartbeat and leave; the coordinator expires silent ones (adaptive deadlines,
see :mod:`lowcomm.runtime.membership`) and answers status queries. Bad input never stops it:
unauthenticated or malformed frames are dropped and logged (no reply, so it cannot be used to
amplify traffic), authenticated messages that fail their schema get an ``error`` reply.

Rounds. Every collective of the job has a number (its *round*). For each, the workers ask for a
quorum; when every live, synced member has asked, all get the same answer: their rank, the world,
the address of a TCPStore the coordinator hosts and a fresh *generation* number, so the group is
built from ``PrefixStore(f"g{generation}/", store)`` and a re-formed group never meets the keys of
a failed one. After the collective each worker reports ``commit`` (ok or failed); the round is
committed when every participant reported ok, and aborted when one failed, died or left first.
Workers apply a round's result only once it is committed, and redo an aborted round with the
survivors from the pseudo-gradient they still hold, so every survivor applies the same result.
Heartbeat replies carry the aborted generations, so a worker blocked in a collective with a dead
peer gives it up within a heartbeat of the coordinator noticing the death.

Stragglers. A round waits for its last member at most the *round deadline* after its first ask:
``clamp(5 x the observed spread of arrivals, floor 10 s, ceiling 120 s)``; a member that misses it
is left out of the round, marked out of sync and resynchronizes like a joiner.

Joiners. A worker that registers after the first round (or that fell out of sync) is a joiner. It
asks ``join``; the coordinator names a donor (a synced member) and a transfer id; the donor learns
it from its next heartbeat reply, sends its state over a two-process torch.distributed group
(``PrefixStore(f"x{transfer_id}/", store)``) at its next step boundary with no round in flight,
and reports ``transfer_done``, which makes the joiner a synced member before the donor's next
round can form. A joiner whose donor dies asks again and gets another.

Restarts. A restarted coordinator knows nothing; for ``grace`` seconds it forms no quorum while
the workers re-register, claiming their state (synced or not, and the next round they will run).
A commit for a generation it never formed is decided from the claims: committed if any member has
moved past that round, else by the usual rule over the members the request names.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import msgpack
import zmq

from .membership import Deadline, Membership, expire, heartbeat, leave, ranks, register, set_synced
from .protocol import ProtocolError, ReplayGuard, Signer, deserialize, serialize

__all__ = ["Coordinator", "CoordinatorClient", "CoordinatorError", "RoundDeadline"]

log = logging.getLogger(__name__)


class CoordinatorError(RuntimeError):
    """The coordinator answered with an error, or did not answer in time."""


@dataclass
class RoundDeadline:
    """How long a round waits for its last member after the first asked:
    ``clamp(factor x smoothed spread of arrivals, floor, ceiling)`` seconds."""

    floor: float = 10.0
    ceiling: float = 120.0
    factor: float = 5.0
    spread: float | None = None

    def __post_init__(self) -> None:
        Deadline(self.floor, self.ceiling, self.factor)  # the same checks, the same messages

    def seconds(self) -> float:
        return Deadline(self.floor, self.ceiling, self.factor).seconds(self.spread)

    def observe(self, spread: float) -> None:
        self.spread = spread if self.spread is None else 0.8 * self.spread + 0.2 * spread


@dataclass
class _Gen:
    round: int
    members: tuple[str, ...]
    done: set = field(default_factory=set)
    suspects: dict = field(default_factory=dict)  # member -> reporters that found it missing
    waiters: dict = field(default_factory=dict)  # worker -> identity waiting for the decision
    decided: bool | None = None  # True committed, False aborted


class Coordinator:
    """Serve one job's membership on ``bind`` until :meth:`stop`.

    Args:
        bind: ZeroMQ endpoint, e.g. "tcp://127.0.0.1:29400" (port 0 picks a free one; see ``endpoint``).
        job: the job's name (reported by status).
        key: the job's shared secret.
        deadline: when a silent member is declared dead.
        store_host: address workers use to reach the TCPStore (default: the bind host).
        min_workers: the first round of a fresh job (or of one resumed from checkpoints) waits
            until this many members are synced.
        grace: seconds after start during which no quorum forms (a restarted coordinator lets the
            workers re-register first; after it, ``min_workers`` no longer applies once a worker
            claims a past round); 0 for a fresh job.
        round_deadline: how long a round waits for stragglers.
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
        if not isinstance(min_workers, int) or min_workers < 1:
            raise ValueError(f"min_workers must be an int >= 1, got {min_workers!r}")
        if not grace >= 0:
            raise ValueError(f"grace must be >= 0 seconds, got {grace!r}")
        self.job, self.signer, self.deadline = job, Signer(key), deadline or Deadline()
        self.min_workers, self.grace = min_workers, float(grace)
        self.round_deadline = round_deadline or RoundDeadline()
        self._pending: dict[str, tuple[bytes, int, float]] = {}  # worker -> (identity, round, asked at)
        # generations are unique across restarts of the coordinator (microseconds since the epoch)
        self.generation = time.time_ns() // 1000
        self._gens: dict[int, _Gen] = {}
        self._aborted: collections.deque[int] = collections.deque(maxlen=64)
        self._lost: collections.deque[tuple[float, str]] = collections.deque(maxlen=64)
        self._joins: dict[str, tuple[bytes, set]] = {}  # joiner -> (identity, donors that failed it)
        self._serve: dict[str, list[dict]] = {}  # donor -> transfers it owes
        self.committed = -1  # highest committed round
        self.formed_any = False
        self.finished = False  # a synced worker left after the last step
        self.fingerprint: str | None = None
        self._store = None
        self._store_host = store_host
        self.guard = ReplayGuard()
        self.membership = Membership()
        self.round = -1
        self.dropped = 0
        self._seq = time.time_ns()
        self._started = time.monotonic()
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
        """Handle messages until :meth:`stop` (checks expiry and deadlines every 50 ms)."""
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        last_check = 0.0
        try:
            while not self._stop.is_set():
                if dict(poller.poll(50)).get(self._sock):
                    for _ in range(1000):  # drain what is there, then look at the clock
                        try:
                            frames = self._sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_frames(frames)
                now = time.monotonic()
                if now - last_check >= 0.05:  # deadlines: O(members), so not on every message
                    last_check = now
                    self._expire()
                    self._try_quorum()
                    self._try_joins()
        finally:
            self._sock.close(0)
            if self._store is not None:
                del self._store

    # ---- membership changes ------------------------------------------------------------------

    def _expire(self) -> None:
        ms, dead = expire(self.membership, time.monotonic(), self.deadline)
        if dead:
            log.warning(
                "members %s missed their heartbeat deadline; epoch %d -> %d",
                dead,
                self.membership.epoch,
                ms.epoch,
            )
            self.membership = ms
            for d in dead:
                self._gone(d)

    def _gone(self, wid: str) -> None:
        """``wid`` died, left or was replaced: abort its undecided rounds, forget its requests."""
        self.guard.forget(wid)
        self._pending.pop(wid, None)
        self._joins.pop(wid, None)
        self._serve.pop(wid, None)
        self._cancel_transfers(wid)
        self._lost.append((time.monotonic(), wid))
        for g, gen in list(self._gens.items()):
            if gen.decided is None and wid in gen.members and wid not in gen.done:
                log.warning("round %d (generation %d) aborted: %s is gone", gen.round, g, wid)
                self._decide(g, False)

    def store_address(self) -> str:
        """host:port of the TCPStore the coordinator hosts (started on first use)."""
        if self._store is None:
            import torch.distributed as dist

            host = self._store_host or self.endpoint.split("//", 1)[-1].rsplit(":", 1)[0]
            host = "127.0.0.1" if host in ("0.0.0.0", "*") else host
            self._store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
            self._store_addr = f"{host}:{self._store.port}"
        return self._store_addr

    def _in_grace(self) -> bool:
        return time.monotonic() - self._started < self.grace

    def _restarted(self) -> bool:
        """A restarted coordinator (``grace`` > 0) of a job that has run rounds: once its grace is
        over it goes on with the members that re-registered in sync, however few; waiting for
        ``min_workers`` could wait for a worker that died meanwhile and now needs one of them as
        its donor."""
        return self.grace > 0 and self.committed >= 0

    # ---- rounds ----------------------------------------------------------------------------------

    def _try_quorum(self) -> None:
        if not self._pending or self._in_grace():
            return
        synced = [m for m in self.membership.members if m.synced]
        if not self.formed_any and len(synced) < self.min_workers and not self._restarted():
            return
        asks = {w: p for w, p in self._pending.items() if any(m.worker_id == w for m in synced)}
        if not asks:
            return
        rnd = min(r for _, r, _ in asks.values())
        askers = {w for w, (_, r, _) in asks.items() if r == rnd}
        first = min(t for w, (_, _, t) in asks.items() if w in askers)
        now = time.monotonic()
        missing = [m.worker_id for m in synced if m.worker_id not in askers]
        if missing and now - first < self.round_deadline.seconds():
            return
        for w in missing:  # stragglers: out of this round, back in by a state transfer
            log.warning("round %d: %s missed the round deadline; it must resynchronize", rnd, w)
            self._unsync(w)
        if not missing:
            self.round_deadline.observe(now - first)
        self.generation += 1
        g = self.generation
        rk = ranks(self.membership)
        order = sorted((m.worker_id for m in synced if m.worker_id in askers), key=rk.get)
        self._gens[g] = _Gen(rnd, tuple(order))
        if len(self._gens) > 256:
            for old in sorted(self._gens)[:-256]:
                if self._gens[old].decided is not None:
                    del self._gens[old]
        self.formed_any = True
        store = self.store_address()
        log.info("quorum: round %d, generation %d, %d members", rnd, g, len(order))
        for rank, wid in enumerate(order):
            ident, _, _ = self._pending.pop(wid)
            self._reply(ident, "quorum_reply", self._quorum_body(rnd, "run", rank, order, store, g))

    def _quorum_body(self, rnd, action, rank, order, store, g) -> dict:
        return {
            "round": rnd,
            "action": action,
            "epoch": self.membership.epoch,
            "rank": rank,
            "world": len(order),
            "members": order,
            "store": store,
            "generation": g,
            "donors": [],
        }

    def _decide(self, g: int, commit: bool) -> None:
        gen = self._gens[g]
        gen.decided = commit
        if commit:
            self.committed = max(self.committed, gen.round)
        else:
            self._aborted.append(g)
        for ident in gen.waiters.values():
            self._reply(ident, "decision", {"round": gen.round, "generation": g, "commit": commit})
        gen.waiters.clear()

    def _commit(self, b: dict, ident: bytes) -> tuple[str, dict] | None:
        wid, rnd, g = b["worker_id"], b["round"], b["generation"]
        gen = self._gens.get(g)
        if gen is None:
            if rnd <= self.committed:  # someone moved past this round: it was committed
                return "decision", {"round": rnd, "generation": g, "commit": True}
            members = [str(m) for m in b["members"]]
            if not self._in_grace() and any(self.membership.get(m) is None for m in members):
                return "decision", {"round": rnd, "generation": g, "commit": False}
            gen = self._gens[g] = _Gen(rnd, tuple(members))  # formed by a coordinator before a restart
        if gen.decided is not None:
            if not b["ok"]:
                self._suspect(gen, wid, [str(x) for x in b.get("suspects", [])])
            return "decision", {"round": gen.round, "generation": g, "commit": gen.decided}
        if wid not in gen.members:
            raise ValueError(f"{wid!r} is not a member of generation {g}")
        if not b["ok"]:
            self._suspect(gen, wid, [str(x) for x in b.get("suspects", [])])
            if gen.decided is None:
                log.warning("round %d (generation %d) aborted: it failed on %s", gen.round, g, wid)
                self._decide(g, False)
            return "decision", {"round": gen.round, "generation": g, "commit": False}
        gen.done.add(wid)
        gen.waiters[wid] = ident
        if gen.done >= set(gen.members):
            self._decide(g, True)
        return None

    def _suspect(self, gen: _Gen, reporter: str, suspects: list[str]) -> None:
        """A member that a majority of the others found missing from a failed round is left out of
        the next and resynchronizes (it hangs, drops its contributions or is cut off from them)."""
        need = (len(gen.members) - 1) // 2 + 1
        log.info("round %d: %s failed it and found %s missing", gen.round, reporter, suspects or "nobody")
        for s in suspects:
            if s == reporter or s not in gen.members:
                continue
            gen.suspects.setdefault(s, set()).add(reporter)
            m = self.membership.get(s)
            if len(gen.suspects[s]) >= need and m is not None and m.synced:
                log.warning(
                    "round %d: %s never entered it (named by %s); it must resynchronize",
                    gen.round,
                    s,
                    sorted(gen.suspects[s]),
                )
                self._unsync(s)

    def _unsync_behind(self) -> None:
        """Members whose state is older than the committed round resynchronize: those whose next
        round is below it, and those asking for a quorum of a round already done (a member whose
        next round is the committed one may only await that round's decision: it stays)."""
        for m in self.membership.members:
            pending = self._pending.get(m.worker_id)
            asks_done_round = pending is not None and pending[1] <= self.committed
            if m.synced and (m.round < self.committed or asks_done_round):
                log.warning(
                    "%s holds the state of round %d, the job is past round %d: it must resynchronize",
                    m.worker_id,
                    m.round,
                    self.committed,
                )
                self._unsync(m.worker_id)

    def _unsync(self, wid: str) -> None:
        """Mark ``wid`` out of sync; a quorum ask it has pending is answered at once."""
        self.membership = set_synced(self.membership, wid, False)
        pending = self._pending.pop(wid, None)
        if pending is not None:
            self._reply(pending[0], "quorum_reply", self._quorum_body(pending[1], "resync", -1, [], "", 0))

    # ---- joiners ---------------------------------------------------------------------------------

    def _cancel_transfers(self, joiner: str) -> None:
        """Forget the transfers owed to ``joiner`` (it gave up on them, or is gone) and abort them:
        a donor waiting for the joiner to connect gives up at its next heartbeat reply (transfer ids
        come from the generation counter, so the aborted list serves both)."""
        for transfers in self._serve.values():
            for t in transfers:
                if t["joiner"] == joiner:
                    self._aborted.append(t["transfer_id"])
            transfers[:] = [t for t in transfers if t["joiner"] != joiner]

    def _try_joins(self) -> None:
        for joiner, (ident, failed) in list(self._joins.items()):
            synced = sorted((m for m in self.membership.members if m.synced), key=lambda m: m.worker_id)
            # every donor failed this joiner: the failures may have been passing (a partition, a
            # restart), so all are tried again; the joiner backs off between attempts
            donors = [m for m in synced if m.worker_id not in failed] or synced
            if not donors:
                continue
            donor = donors[0]
            self.generation += 1
            transfer = {"joiner": joiner, "transfer_id": self.generation, "store": self.store_address()}
            self._serve.setdefault(donor.worker_id, []).append(transfer)
            del self._joins[joiner]
            log.info(
                "joiner %s gets its state from %s (transfer %d)", joiner, donor.worker_id, self.generation
            )
            self._reply(
                ident,
                "join_reply",
                {
                    "donor": donor.worker_id,
                    "donor_addr": donor.addr,
                    "transfer_id": self.generation,
                    "store": transfer["store"],
                },
            )

    # ---- messages --------------------------------------------------------------------------------

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
        ident = (ident, msg.id)  # replies name the request they answer
        try:
            reply = self._handle(msg, ident)
        except (KeyError, ValueError) as e:
            reason = e.args[0] if isinstance(e, KeyError) and e.args else e
            reply = "error", {"reason": f"{msg.type} refused: {reason}"[:1000]}
        except Exception as e:
            log.error("unexpected error handling %s from %s: %r", msg.type, msg.sender, e)
            reply = "error", {"reason": f"{msg.type} failed on the coordinator: {e!r}"[:1000]}
        if reply is not None:  # quorum and commit requests are answered when decided
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
                "synced": m.synced,
                "last_seen_s": round(now - m.last_seen, 3),
            }
            for m in self.membership.members
        ]

    def _member(self, wid: str):
        m = self.membership.get(wid)
        if m is None:
            raise KeyError(f"worker {wid!r} is not registered (register again)")
        return m

    def _register(self, b: dict) -> tuple[str, dict]:
        wid, fp = b["worker_id"], b.get("fingerprint", "")
        if fp:
            if self.fingerprint is None:
                self.fingerprint = fp
            elif fp != self.fingerprint:
                raise ValueError(
                    f"worker {wid!r} runs another configuration (fingerprint {fp[:12]}, the job's "
                    f"{self.fingerprint[:12]}): same model, schedule, codec and fragments are required"
                )
        old = self.membership.get(wid)
        incarnation = b.get("incarnation", "")
        if old is not None and old.incarnation != incarnation:
            log.warning("%s restarted (new incarnation); its old process is gone", wid)
            self.membership = leave(self.membership, wid)
            self._gone(wid)
        claims, nxt = b.get("synced", True), b.get("round", 0)
        if not self.formed_any:  # a fresh job, a restarted coordinator, or a job resumed from checkpoints
            # before the first quorum the newest state wins: workers resumed from older checkpoints
            # (one whose last write failed, say) resynchronize from the one that is furthest on
            # (a member whose next round is the committed one may only await that round's decision)
            synced = claims and nxt >= self.committed  # committed is -1 until a claim of a later round
            if synced and nxt - 1 > self.committed:
                self.committed = nxt - 1
                self._unsync_behind()
        else:
            synced = claims and nxt == self.committed + 1
        self._lost = collections.deque(((t, w) for t, w in self._lost if w != wid), maxlen=64)
        self.membership = register(
            self.membership,
            wid,
            b["advertise_addr"],
            b["step"],
            time.monotonic(),
            incarnation=incarnation,
            synced=synced,
            round=nxt,
        )
        log.info(
            "registered %s (%s, %s); epoch %d",
            wid,
            b["advertise_addr"],
            "synced" if synced else "joiner",
            self.membership.epoch,
        )
        return "register_reply", {
            "epoch": self.membership.epoch,
            "synced": synced,
            "members": self.membership.ids,
        }

    def _handle(self, msg, ident: bytes) -> tuple[str, dict] | None:
        now, b = time.monotonic(), msg.body
        if msg.type == "register":
            return self._register(b)
        if msg.type == "heartbeat":
            self._member(b["worker_id"])
            self.membership = heartbeat(self.membership, b["worker_id"], b["step"], b["round"], now)
            self.round = max(self.round, b["round"])
            return "heartbeat_reply", {
                "epoch": self.membership.epoch,
                "synced": self.membership.get(b["worker_id"]).synced,
                "aborted": list(self._aborted),
                "lost": [w for t, w in self._lost if now - t < 120.0],
                "serve": self._serve.get(b["worker_id"], [])[:16],
            }
        if msg.type == "leave":
            if b.get("finished") and self.membership.get(b["worker_id"]) is not None:
                self.finished = self.finished or self.membership.get(b["worker_id"]).synced
            if self.membership.get(b["worker_id"]) is not None:
                self.membership = leave(self.membership, b["worker_id"])
                self._gone(b["worker_id"])
            return "ok", {"epoch": self.membership.epoch}
        if msg.type == "quorum":
            m = self._member(b["worker_id"])
            if not m.synced or b["round"] <= self.committed:
                if m.synced:
                    self.membership = set_synced(self.membership, m.worker_id, False)
                log.info("%s asked for round %d: out of sync, it must resynchronize", m.worker_id, b["round"])
                return "quorum_reply", self._quorum_body(b["round"], "resync", -1, [], "", 0)
            prev = self._pending.get(b["worker_id"])  # a re-sent ask keeps its first arrival time
            asked = prev[2] if prev is not None and prev[1] == b["round"] else now
            self._pending[b["worker_id"]] = (ident, b["round"], asked)
            self._try_quorum()
            return None
        if msg.type == "commit":
            self._member(b["worker_id"])
            return self._commit(b, ident)
        if msg.type == "join":
            m = self._member(b["worker_id"])
            if m.synced:
                raise ValueError(f"{m.worker_id!r} is synced; only a joiner asks for state")
            if self.finished and not any(x.synced for x in self.membership.members):
                raise ValueError("the job has finished: its workers reached the last step and left")
            self._cancel_transfers(m.worker_id)  # an earlier transfer it gave up on
            self._joins[m.worker_id] = (ident, {str(d) for d in b["failed"]})
            self._try_joins()
            return None
        if msg.type == "transfer_done":
            # from the donor (sent, or failed), or from the joiner (it could not receive)
            donor, tid = b["worker_id"], b["transfer_id"]
            if b["ok"] and donor == b["joiner"]:
                raise ValueError("a joiner cannot report its own transfer done: its donor does")
            for transfers in self._serve.values():
                transfers[:] = [t for t in transfers if t["transfer_id"] != tid]
            if not b["ok"]:  # the other side, perhaps still waiting to connect, gives up at once
                self._aborted.append(tid)
            joiner = self.membership.get(b["joiner"])
            if b["ok"] and joiner is not None:
                self.membership = set_synced(self.membership, b["joiner"], True, b["round"])
                log.info(
                    "%s is in sync (round %d, step %d) from %s", b["joiner"], b["round"], b["step"], donor
                )
            return "ok", {"epoch": self.membership.epoch}
        if msg.type == "status":
            return "status_reply", {
                "job": self.job,
                "epoch": self.membership.epoch,
                "round": max(self.round, self.committed),
                "members": self._members(),
            }
        raise ValueError(f"message type {msg.type!r} is not served by the coordinator")

    def _reply(self, ident: bytes | tuple[bytes, str], kind: str, body: dict) -> None:
        identity, re = ident if isinstance(ident, tuple) else (ident, None)
        self._seq += 1
        frames = serialize(
            self.signer, kind, body, sender="coordinator", seq=self._seq, epoch=self.membership.epoch, re=re
        )
        self._sock.send_multipart([identity, *frames])


class CoordinatorClient:
    """Request/reply client of a coordinator (one DEALER socket; not thread-safe: one per thread)."""

    def __init__(self, endpoint: str, key: bytes, sender: str, timeout_s: float = 5.0):
        self.endpoint, self.sender, self.timeout_s = endpoint, sender, timeout_s
        self.signer = Signer(key)
        self.guard = ReplayGuard()
        self._seq = time.time_ns()  # survives restarts of this sender: the coordinator wants seq to grow
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)
        self.blocked = None  # fault injection: a callable that is true while the coordinator is unreachable
        self._sent_ids: collections.deque[str] = collections.deque(maxlen=64)

    def _send(self, kind: str, body: dict, epoch: int) -> str:
        self._seq = max(self._seq + 1, time.time_ns())
        frames = serialize(self.signer, kind, body, sender=self.sender, seq=self._seq, epoch=epoch)
        self._sock.send_multipart(frames)
        self._sent_ids.append(msgpack.unpackb(frames[2])["id"])
        return self._sent_ids[-1]

    def _recv(self, timeout_s: float):
        if not self._sock.poll(max(int(timeout_s * 1000), 0)):
            return None
        try:
            return deserialize(self._sock.recv_multipart(), self.signer, self.guard)
        except ProtocolError as e:  # a forged or replayed reply is dropped, never believed
            log.warning("dropped a reply from %s: %s", self.endpoint, e)
            return None

    def request(self, kind: str, body: dict, epoch: int = -1, timeout_s: float | None = None, match=None):
        """Send one message and return the verified reply; raises CoordinatorError on error or timeout.

        A reply names the request it answers; replies to other requests (late answers to earlier
        ones) are discarded, except that ``match(reply)`` may accept an answer to an earlier send
        of the same long-poll (:meth:`call`).
        """
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if self.blocked is not None and self.blocked():
            time.sleep(timeout_s)
            raise CoordinatorError(
                f"no reply from the coordinator at {self.endpoint} (partitioned by a fault)"
            )
        mine = self._send(kind, body, epoch)
        end = time.monotonic() + timeout_s
        while True:
            reply = self._recv(end - time.monotonic())
            if reply is None:
                if time.monotonic() >= end:
                    raise CoordinatorError(
                        f"no reply from the coordinator at {self.endpoint} within {timeout_s}s"
                    )
                continue
            if reply.re == mine or (match is not None and reply.re in self._sent_ids and match(reply)):
                if reply.type == "error":
                    raise CoordinatorError(reply.body["reason"])
                return reply

    def call(self, kind: str, body: dict, *, match=None, resend_s: float = 1.0, cancel=None):
        """A long-poll: send and re-send every ``resend_s`` (a restarted coordinator lost the first
        one) until a matching reply arrives or ``cancel()`` is true (then returns None)."""
        while cancel is None or not cancel():
            try:
                return self.request(kind, body, timeout_s=resend_s, match=match)
            except CoordinatorError as e:
                if "no reply" not in str(e):
                    raise
        return None

    def close(self) -> None:
        self._sock.close(0)
