"""The coordinator's rules as state transitions: no sockets, no clock of its own.

:class:`CoordinatorState` takes each verified request (its type, body and an opaque reply
address) and the passing of time (:meth:`~CoordinatorState.tick`, with the monotonic time passed
in) and returns the messages to send, as :class:`Outgoing` records. The server
(:mod:`lowcomm.runtime.elastic.server`) only moves bytes: it feeds requests in and sends what comes
out. Every rule below is therefore testable as a plain function call (tests/test_coordinator_rules.py).

Rounds. Every collective of the job has a number (its *round*). For each, the workers ask for a
quorum; when every live, synced member has asked, all get the same answer: their rank, the world,
the address of the TCPStore and a fresh *generation* number, so the group is built from
``PrefixStore(f"g{generation}/", store)`` and a re-formed group never meets the keys of a failed
one. After the collective each worker reports ``commit`` (ok or failed); the round is committed
when every participant reported ok, and aborted when one failed, died or left first. Workers
apply a round's result only once it is committed, and redo an aborted round with the survivors
from the pseudo-gradient they still hold, so every survivor applies the same result. Heartbeat
replies carry the aborted generations, so a worker blocked in a collective with a dead peer gives
it up within a heartbeat of the coordinator noticing the death.

Stragglers. A round waits for its last member at most the *round deadline* after its first ask:
``clamp(5 x the observed spread of arrivals, floor 10 s, ceiling 120 s)``; a member that misses it
is left out of the round, marked out of sync and resynchronizes like a joiner. A member that a
majority of the others found missing from a failed round (it never entered it) is left out too.

Joiners. A worker that registers after the first round (or that fell out of sync) is a joiner. It
asks ``join``; the coordinator names a donor (the first synced member by id that has not failed
it) and a transfer id; the donor learns it from its next heartbeat reply, sends its state at its
next step boundary with no round in flight, and reports ``transfer_done``, which makes the
joiner a synced member before the donor's next round can form. A transfer that fails on either
side is cancelled (heartbeat replies carry the cancelled ids, so the other side stops waiting);
the joiner asks again and gets another donor, and once every donor failed it, all are tried again.

Restarts. A restarted coordinator knows nothing; for ``grace`` seconds it forms no quorum while
the workers re-register, claiming their state (synced or not, and the next round they will run).
Before the first quorum the newest claimed state wins: members whose next round is behind it
resynchronize. A claim beyond the committed round + 1 is believed only in the grace or from a
worker that holds that state (its checkpoint, or the state it kept through the restart; the
``holds_state`` field); a bare claim (round 2^62, say) is not, and its claimant joins. A
commit for a generation it never formed is decided from the claims: committed if any member has
moved past that round, else by the usual rule over the members the request names. After its
grace a restarted coordinator goes on with the members that re-registered in sync, however few
(waiting for ``min_workers`` could wait for a worker that died meanwhile and now needs one of them
as its donor).

Resumes. When no member holds the job's state (every worker was lost, the coordinator lived, and
no worker finished the job: a worker that registers after the job's workers left at its last
step is told the job finished) a worker that brings its state (a checkpoint) is believed: the
newest wins, the committed round is rolled back to it (logged), and the others resynchronize
from it. Its first round waits ``RESUME_HOLD_S`` (or the grace) for the others to bring their
states and, as any resumed job's, for ``min_workers`` registered workers. A state in which no progress is
possible (joiners with no member to donate, a first round short of ``min_workers``) is logged
with what is missing, every ``STUCK_WARNING_S``.
"""

from __future__ import annotations

import collections
import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..._checks import is_int, is_number, refuse
from .membership import (
    Deadline,
    Membership,
    check_deadline,
    expire,
    heartbeat,
    leave,
    ranks,
    register,
    set_synced,
)

__all__ = [
    "check_quorum",
    "CoordinatorState",
    "Outgoing",
    "Refusal",
    "RoundDeadline",
    "Ask",
    "Generation",
    "JoinRequest",
    "Transfer",
]

log = logging.getLogger(__name__)

#: heartbeat replies name members lost within this many seconds
LOST_MEMORY_S = 120.0
#: the most members a job may have (a registration beyond it is refused)
MAX_MEMBERS = 4096
#: the most members one status reply lists (a page; ``offset`` asks for the next)
STATUS_PAGE = 200
#: seconds between two warnings about the same state in which no progress is possible
STUCK_WARNING_S = 10.0
#: after a resume from checkpoints (every worker had been lost), no quorum forms for this long (or
#: the grace, if longer) while the other workers bring theirs: the newest must win, not the first
RESUME_HOLD_S = 5.0
#: decided generations kept (a late commit report of one still gets its decision)
KEEP_GENERATIONS = 256


@dataclass
class RoundDeadline:
    """How long a round waits for its last member after the first asked:
    ``clamp(factor x smoothed spread of arrivals, floor, ceiling)`` seconds."""

    floor: float = 10.0
    ceiling: float = 120.0
    factor: float = 5.0
    spread: float | None = None

    def __post_init__(self) -> None:
        check_deadline("round_deadline", self.floor, self.ceiling, self.factor)

    def seconds(self) -> float:
        return Deadline(self.floor, self.ceiling, self.factor).seconds(self.spread)

    def observe(self, spread: float) -> None:
        self.spread = spread if self.spread is None else 0.8 * self.spread + 0.2 * spread


@dataclass(frozen=True)
class Outgoing:
    """A message to send: ``to`` is the opaque reply address a request came with."""

    to: Any
    kind: str
    body: dict


class Refusal(Exception):
    """A request the rules refuse; becomes an ``error`` reply with ``code`` and the reason."""

    def __init__(self, reason: str, code: str = "refused") -> None:
        super().__init__(reason)
        self.code = code


@dataclass
class Ask:
    """A member waiting for the quorum of ``round`` since ``asked_at``."""

    reply_to: Any
    round: int
    asked_at: float


@dataclass
class Generation:
    """One attempt at a round with a fixed member list."""

    round: int
    members: tuple[str, ...]
    rendezvous: str = ""  # the secret store prefix of its gloo group (only in signed replies)
    done: set[str] = field(default_factory=set)  # members that reported success
    suspects: dict[str, set[str]] = field(default_factory=dict)  # member -> who found it missing
    waiters: dict[str, Any] = field(default_factory=dict)  # member -> reply address for the decision
    decided: bool | None = None  # True committed, False aborted


@dataclass
class JoinRequest:
    reply_to: Any
    failed: set[str]  # donors that failed this joiner


@dataclass(frozen=True)
class Transfer:
    """A state transfer a donor owes a joiner."""

    transfer_id: int
    joiner: str
    store: str
    rendezvous: str  # the secret store prefix of the transfer's two-process group

    def to_wire(self) -> dict:
        return {
            "transfer_id": self.transfer_id,
            "joiner": self.joiner,
            "store": self.store,
            "rendezvous": self.rendezvous,
        }


def check_quorum(min_workers: int, grace: float) -> None:
    """Refuse (ValueError, naming the value) a ``min_workers`` that is not an int in [1,
    MAX_MEMBERS] (more is a quorum no job can reach) or a ``grace`` that is not a finite number of
    seconds >= 0."""
    if not (is_int(min_workers, 1) and min_workers <= MAX_MEMBERS):
        raise refuse("min_workers", min_workers, f"an int in [1, {MAX_MEMBERS}], the members a job takes")
    if not (is_number(grace) and grace >= 0):
        raise refuse("grace", grace, "a finite number of seconds >= 0")


class CoordinatorState:
    """The membership and round rules of one job.

    Args:
        job: the job's name (reported by status).
        store: ``host:port`` of the TCPStore the workers rendezvous on.
        now: the monotonic time at start.
        generation: the first generation number (unique across restarts: the server passes
            microseconds since the epoch).
        deadline: when a silent member is declared dead.
        min_workers: the first round of a fresh job (or one resumed from checkpoints) waits until
            this many workers registered (members behind the newest state among them resynchronize
            from it after that round: a donor blocked in a round it cannot start would wait for
            ever for joiners that wait for it).
        grace: seconds after start during which no quorum forms (a restarted coordinator lets the
            workers re-register first); 0 for a fresh job.
        round_deadline: how long a round waits for stragglers.
        nonce: makes the secret rendezvous name of each round and transfer (default: 128 random
            bits); a store key no one outside the job can guess, so no stranger reaches a group.
    """

    def __init__(
        self,
        job: str,
        store: str,
        *,
        now: float,
        generation: int = 0,
        deadline: Deadline | None = None,
        min_workers: int = 1,
        grace: float = 0.0,
        round_deadline: RoundDeadline | None = None,
        nonce: Callable[[], str] = lambda: secrets.token_hex(16),
    ) -> None:
        check_quorum(min_workers, grace)
        self.job, self.store = job, store
        self.deadline = deadline or Deadline()
        self.min_workers, self.grace = min_workers, float(grace)
        self.round_deadline = round_deadline or RoundDeadline()
        self.started = now
        self.generation = generation
        self.membership = Membership()
        self.asks: dict[str, Ask] = {}
        self.generations: dict[int, Generation] = {}
        self.aborted: collections.deque[int] = collections.deque(maxlen=64)  # generations
        self.cancelled: collections.deque[int] = collections.deque(maxlen=64)  # transfer ids
        self.lost: collections.deque[tuple[float, str]] = collections.deque(maxlen=64)
        self.joins: dict[str, JoinRequest] = {}
        self.owed: dict[str, list[Transfer]] = {}  # donor -> transfers it owes
        self.committed = -1  # highest committed round
        self.formed_any = False
        self.hold_until = -math.inf  # no quorum before this (a resume's window)
        self.resumed = False  # the job was resumed from checkpoints brought to this coordinator
        self.finished = False  # a synced worker left after the job's last step
        self.fingerprint: str | None = None  # the job's configuration, from its workers
        self.fingerprint_pinned = False  # set by a worker that holds the job's state
        self.fingerprints: dict[str, str] = {}  # member -> the configuration it registered with
        self.round = -1  # highest round a heartbeat reported
        self.departed: list[str] = []  # members gone since the server last drained it
        self.nonce = nonce
        self._warned: dict[str, float] = {}  # stuck-state warning -> when it was last given
        self._out: list[Outgoing] = []

    # ---- inputs -----------------------------------------------------------------------------------

    def handle(self, kind: str, body: dict, reply_to: Any, now: float) -> list[Outgoing]:
        """Apply one verified request; returns the messages to send (a quorum ask or a commit is
        answered later, when decided; a refused request gets an ``error`` with its code)."""
        try:
            reply = self._dispatch(kind, body, reply_to, now)
        except Refusal as e:
            reply = "error", {"reason": f"{kind} refused: {e}"[:1000], "code": e.code}
        if reply is not None:
            self._send(reply_to, *reply)
        return self._take()

    def tick(self, now: float) -> list[Outgoing]:
        """Let time pass: expire silent members, form due quorums, assign donors to joiners."""
        self._expire(now)
        self._try_quorum(now)
        self._try_joins()
        self._warn_if_stuck(now)
        return self._take()

    def status(self, now: float, offset: int = 0, limit: int = STATUS_PAGE) -> dict:
        """The job, its epoch and round, and one page of its members (``offset``, at most ``limit``)."""
        rk = ranks(self.membership)
        members = self.membership.members
        page = members[offset : offset + min(limit, STATUS_PAGE)]
        return {
            "job": self.job,
            "epoch": self.membership.epoch,
            "round": max(self.round, self.committed),
            "total": len(members),
            "offset": offset,
            # its workers reached the last step and left: a worker that comes now is refused
            "finished": self.finished and not any(m.synced for m in members),
            "members": [
                {
                    "worker_id": m.worker_id,
                    "addr": m.addr,
                    "rank": rk[m.worker_id],
                    "step": m.step,
                    "round": m.round,
                    "synced": m.synced,
                    "last_seen_s": round(now - m.last_seen, 3),
                }
                for m in page
            ],
        }

    def _warn_if_stuck(self, now: float) -> None:
        """Log each state in which no progress is possible, with what is missing (rate-limited)."""
        synced = [m for m in self.membership.members if m.synced]
        stuck = {}
        if self.joins and not synced:
            stuck["no-donor"] = (
                f"joiner(s) {sorted(self.joins)[:8]} wait for a donor: no member holds the job's state "
                "(a worker that brings its checkpoint, --resume auto, can restore it)"
            )
        if self.asks and self._short_of_min_workers():
            members = sorted(m.worker_id for m in self.membership.members)
            stuck["min-workers"] = (
                f"the first round waits for min_workers={self.min_workers}: {len(members)} worker(s) "
                f"registered so far ({members[:8]})"
            )
        for key, message in stuck.items():
            if now - self._warned.get(key, -STUCK_WARNING_S) >= STUCK_WARNING_S:
                self._warned[key] = now
                log.warning("no progress possible: %s", message)

    # ---- plumbing -----------------------------------------------------------------------------

    def _send(self, to: Any, kind: str, body: dict) -> None:
        self._out.append(Outgoing(to, kind, body))

    def _take(self) -> list[Outgoing]:
        out, self._out = self._out, []
        return out

    def _member(self, wid: str):
        m = self.membership.get(wid)
        if m is None:
            raise Refusal(f"worker {wid!r} is not registered (register again)", "not_registered")
        return m

    def _dispatch(self, kind: str, b: dict, reply_to: Any, now: float) -> tuple[str, dict] | None:
        if kind == "register":
            return self._register(b, now)
        if kind == "heartbeat":
            return self._heartbeat(b, now)
        if kind == "leave":
            return self._leave(b, now)
        if kind == "quorum":
            return self._quorum(b, reply_to, now)
        if kind == "commit":
            self._member(b["worker_id"])
            return self._commit(b, reply_to, now)
        if kind == "join":
            return self._join(b, reply_to)
        if kind == "transfer_done":
            return self._transfer_done(b)
        if kind == "status":
            return "status_reply", self.status(now, b.get("offset", 0), b.get("limit", STATUS_PAGE))
        raise Refusal(f"message type {kind!r} is not served by the coordinator", "bad_request")

    # ---- membership ---------------------------------------------------------------------------

    def _register(self, b: dict, now: float) -> tuple[str, dict]:
        wid, fp = b["worker_id"], b.get("fingerprint", "")
        holds_state = bool(b.get("holds_state", False))
        if fp and fp != self.fingerprint:
            if self.fingerprint is None or (holds_state and not (self.fingerprint_pinned or self.formed_any)):
                self._adopt_configuration(wid, fp, now)
            else:
                raise Refusal(
                    f"worker {wid!r} runs another configuration (fingerprint {fp[:12]}, the job's "
                    f"{self.fingerprint[:12]}): same model, schedule, codec and fragments are required",
                    "configuration",
                )
        if self.finished and not any(m.synced for m in self.membership.members):
            # the job's result is what its workers left with; a worker cut off before the end (and
            # back after it) must not carry on alone from its own state (found by benchmarks/soak.py)
            raise Refusal("the job has finished: its workers reached the last step and left", "job_finished")
        old = self.membership.get(wid)
        if old is None and len(self.membership.index) >= MAX_MEMBERS:
            raise Refusal(
                f"the job has {MAX_MEMBERS} members, the most it takes; {wid!r} cannot join", "full"
            )
        incarnation = b.get("incarnation", "")
        if old is not None and old.incarnation != incarnation:
            log.warning("%s restarted (new incarnation); its old process is gone", wid)
            self.membership = leave(self.membership, wid)
            self._gone(wid, now)
        claims, nxt = b.get("synced", True), b.get("round", 0)
        self.fingerprint_pinned |= bool(fp) and holds_state
        if fp:
            self.fingerprints[wid] = fp
        if self.formed_any and claims and holds_state and not any(m.synced for m in self.membership.members):
            # nobody holds the job's state any more: the newest state brought wins, as on a fresh start
            log.warning(
                "no member holds the job's state; %s brings the state of round %d: the job continues "
                "from the newest state brought (committed round rolled back from %d)",
                wid,
                nxt,
                self.committed,
            )
            self.committed = -1
            self.formed_any = False
            self.resumed = True  # as a resumed job: min_workers holds its first round again
            self.hold_until = now + max(self.grace, RESUME_HOLD_S)
        if claims and nxt > self.committed + 1 and not (holds_state or self._in_grace(now)):
            log.warning(
                "%s claims round %d, the job is at %d: not believed, it joins", wid, nxt, self.committed
            )
            claims = False
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
        self.lost = collections.deque(((t, w) for t, w in self.lost if w != wid), maxlen=64)
        self.membership = register(
            self.membership,
            wid,
            b["advertise_addr"],
            b["step"],
            now,
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
            "size": len(self.membership.index),
        }

    def _heartbeat(self, b: dict, now: float) -> tuple[str, dict]:
        wid = b["worker_id"]
        self._member(wid)
        self.membership = heartbeat(self.membership, wid, b["step"], b["round"], now)
        self.round = max(self.round, b["round"])
        return "heartbeat_reply", {
            "epoch": self.membership.epoch,
            "synced": self.membership.get(wid).synced,
            "aborted": list(self.aborted),
            "cancelled": list(self.cancelled),
            "lost": [w for t, w in self.lost if now - t < LOST_MEMORY_S],
            "serve": [t.to_wire() for t in self.owed.get(wid, [])[:16]],
        }

    def _leave(self, b: dict, now: float) -> tuple[str, dict]:
        m = self.membership.get(b["worker_id"])
        if m is not None:
            if b.get("finished"):
                self.finished = self.finished or m.synced
            self.membership = leave(self.membership, m.worker_id)
            self._gone(m.worker_id, now)
        return "ok", {"epoch": self.membership.epoch}

    def _expire(self, now: float) -> None:
        ms, dead = expire(self.membership, now, self.deadline)
        if dead:
            log.warning(
                "members %s missed their heartbeat deadline; epoch %d -> %d",
                dead,
                self.membership.epoch,
                ms.epoch,
            )
            self.membership = ms
            for d in dead:
                self._gone(d, now)

    def _adopt_configuration(self, wid: str, fp: str, now: float) -> None:
        """``fp`` becomes the job's configuration: the first one, or that of a worker holding the
        job's state, which defines it. Members that came first (to a restarted coordinator, holding
        nothing) with another one are removed, and are refused when they register again. The
        seventh soak run's case: after a coordinator restart a worker with another model
        registered first and every worker of the job was refused."""
        for other in [w for w, f in self.fingerprints.items() if f != fp]:
            log.warning(
                "%s brings the job's state with configuration %s: %s, registered before it with "
                "configuration %s, is removed",
                wid,
                fp[:12],
                other,
                self.fingerprints[other][:12],
            )
            if self.membership.get(other) is not None:
                self.membership = leave(self.membership, other)
                self._gone(other, now)
            self.fingerprints.pop(other, None)
        self.fingerprint = fp

    def _gone(self, wid: str, now: float) -> None:
        """``wid`` died, left or was replaced: abort its undecided rounds, forget its requests."""
        self.departed.append(wid)
        self.fingerprints.pop(wid, None)
        self.asks.pop(wid, None)
        self.joins.pop(wid, None)
        # what it owed as a donor and was owed as a joiner: cancelled, so the other side stops
        # waiting at its next heartbeat reply (a donor back at once under a new incarnation is never
        # reported lost: its joiners would wait their whole transfer timeout)
        for t in self.owed.pop(wid, []):
            self.cancelled.append(t.transfer_id)
        self._cancel_transfers(wid)
        self.lost.append((now, wid))
        for g, gen in list(self.generations.items()):
            if gen.decided is None and wid in gen.members and wid not in gen.done:
                log.warning("round %d (generation %d) aborted: %s is gone", gen.round, g, wid)
                self._decide(g, False)

    def _unsync(self, wid: str) -> None:
        """Mark ``wid`` out of sync; a quorum ask it has pending is answered at once."""
        self.membership = set_synced(self.membership, wid, False)
        ask = self.asks.pop(wid, None)
        if ask is not None:
            self._send(ask.reply_to, "quorum_reply", _resync(ask.round, self.membership.epoch))

    def _unsync_behind(self) -> None:
        """Members whose state is older than the committed round resynchronize: those whose next
        round is below it, and those asking for a quorum of a round already done (a member whose
        next round is the committed one may only await that round's decision: it stays)."""
        for m in self.membership.members:
            ask = self.asks.get(m.worker_id)
            asks_done_round = ask is not None and ask.round <= self.committed
            if m.synced and (m.round < self.committed or asks_done_round):
                log.warning(
                    "%s holds the state of round %d, the job is past round %d: it must resynchronize",
                    m.worker_id,
                    m.round,
                    self.committed,
                )
                self._unsync(m.worker_id)

    # ---- rounds -------------------------------------------------------------------------------

    def _in_grace(self, now: float) -> bool:
        return now - self.started < self.grace

    def _short_of_min_workers(self) -> bool:
        """The first round of a fresh or resumed job waits for ``min_workers`` registered workers
        (not for a restarted coordinator's: after its grace it goes on with those that came back)."""
        if self.formed_any or (self._restarted() and not self.resumed):
            return False
        return len(self.membership.members) < self.min_workers

    def _restarted(self) -> bool:
        """A restarted coordinator (``grace`` > 0) of a job that has run rounds."""
        return self.grace > 0 and self.committed >= 0

    def _quorum(self, b: dict, reply_to: Any, now: float) -> tuple[str, dict] | None:
        m = self._member(b["worker_id"])
        rnd = b["round"]
        if not m.synced or rnd <= self.committed:
            if m.synced:
                self.membership = set_synced(self.membership, m.worker_id, False)
            log.info("%s asked for round %d: out of sync, it must resynchronize", m.worker_id, rnd)
            return "quorum_reply", _resync(rnd, self.membership.epoch)
        prev = self.asks.get(m.worker_id)  # a re-sent ask keeps its first arrival time
        asked = prev.asked_at if prev is not None and prev.round == rnd else now
        self.asks[m.worker_id] = Ask(reply_to, rnd, asked)
        self._try_quorum(now)
        return None

    def _try_quorum(self, now: float) -> None:
        if not self.asks or self._in_grace(now) or now < self.hold_until:
            return
        if self._short_of_min_workers():
            return
        synced = [m for m in self.membership.members if m.synced]
        asks = {m.worker_id: self.asks[m.worker_id] for m in synced if m.worker_id in self.asks}
        if not asks:
            return
        rnd = min(a.round for a in asks.values())
        askers = {w for w, a in asks.items() if a.round == rnd}
        first = min(asks[w].asked_at for w in askers)
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
        order = sorted(askers, key=rk.get)
        self.generations[g] = gen = Generation(rnd, tuple(order), self.nonce())
        if len(self.generations) > KEEP_GENERATIONS:
            for old in sorted(self.generations)[:-KEEP_GENERATIONS]:
                if self.generations[old].decided is not None:
                    del self.generations[old]
        self.formed_any = True
        log.info("quorum: round %d, generation %d, %d members", rnd, g, len(order))
        for rank, wid in enumerate(order):
            ask = self.asks.pop(wid)
            self._send(
                ask.reply_to,
                "quorum_reply",
                {
                    "round": rnd,
                    "action": "run",
                    "epoch": self.membership.epoch,
                    "rank": rank,
                    "world": len(order),
                    "members": order,
                    "store": self.store,
                    "generation": g,
                    "rendezvous": gen.rendezvous,
                },
            )

    def _decide(self, g: int, commit: bool) -> None:
        gen = self.generations[g]
        gen.decided = commit
        if commit:
            self.committed = max(self.committed, gen.round)
        else:
            self.aborted.append(g)
        for to in gen.waiters.values():
            self._send(to, "decision", {"round": gen.round, "generation": g, "commit": commit})
        gen.waiters.clear()

    def _commit(self, b: dict, reply_to: Any, now: float) -> tuple[str, dict] | None:
        wid, rnd, g = b["worker_id"], b["round"], b["generation"]
        gen = self.generations.get(g)
        if gen is None:
            if rnd <= self.committed:  # someone moved past this round: it was committed
                return "decision", {"round": rnd, "generation": g, "commit": True}
            members = [str(m) for m in b["members"]]
            if not self._in_grace(now) and any(self.membership.get(m) is None for m in members):
                return "decision", {"round": rnd, "generation": g, "commit": False}
            gen = self.generations[g] = Generation(rnd, tuple(members))  # formed before a restart
        if gen.decided is not None:
            if not b["ok"]:
                self._suspect(gen, wid, [str(x) for x in b.get("suspects", [])])
            return "decision", {"round": gen.round, "generation": g, "commit": gen.decided}
        if wid not in gen.members:
            raise Refusal(f"{wid!r} is not a member of generation {g}")
        if not b["ok"]:
            self._suspect(gen, wid, [str(x) for x in b.get("suspects", [])])
            if gen.decided is None:
                log.warning("round %d (generation %d) aborted: it failed on %s", gen.round, g, wid)
                self._decide(g, False)
            return "decision", {"round": gen.round, "generation": g, "commit": False}
        gen.done.add(wid)
        gen.waiters[wid] = reply_to
        if gen.done >= set(gen.members):
            self._decide(g, True)
        return None

    def _suspect(self, gen: Generation, reporter: str, suspects: list[str]) -> None:
        """A member that a majority of the others found missing from a failed round is left out of
        the next and resynchronizes (it hangs, drops its contributions or is cut off from them).

        Only members in sync are believed, so the last ones in sync are never left out by each
        other: the job always keeps a member that holds its state."""
        need = (len(gen.members) - 1) // 2 + 1
        log.info("round %d: %s failed it and found %s missing", gen.round, reporter, suspects or "nobody")
        if reporter in suspects:  # its own arrival is missing: the rendezvous failed, not its peers
            return  # (a coordinator restart mid-round; the soak run's case that left nobody synced)
        m = self.membership.get(reporter)
        if m is None or not m.synced:  # left out itself meanwhile: its view no longer counts
            return
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

    # ---- joiners ------------------------------------------------------------------------------

    def _join(self, b: dict, reply_to: Any) -> None:
        m = self._member(b["worker_id"])
        if m.synced:
            if not any(x.synced and x.worker_id != m.worker_id for x in self.membership.members):
                # it holds the job's state alone: nobody could give it state
                raise Refusal(f"{m.worker_id!r} is synced; only a joiner asks for state")
            # it gave up a transfer its donor then finished (the donor's report made it synced):
            # it says it lacks the state, and only it knows
            log.warning(
                "%s asks for state though marked in sync (a transfer it gave up): it joins", m.worker_id
            )
            self._unsync(m.worker_id)
        if self.finished and not any(x.synced for x in self.membership.members):
            raise Refusal("the job has finished: its workers reached the last step and left", "job_finished")
        self._cancel_transfers(m.worker_id)  # an earlier transfer it gave up on
        self.joins[m.worker_id] = JoinRequest(reply_to, {str(d) for d in b["failed"]})
        self._try_joins()
        return None

    def _cancel_transfers(self, joiner: str) -> None:
        """Forget the transfers owed to ``joiner`` (it gave up on them, or is gone) and cancel
        them: a donor waiting for the joiner to connect gives up at its next heartbeat reply."""
        for transfers in self.owed.values():
            for t in transfers:
                if t.joiner == joiner:
                    self.cancelled.append(t.transfer_id)
            transfers[:] = [t for t in transfers if t.joiner != joiner]

    def _try_joins(self) -> None:
        for joiner, req in list(self.joins.items()):
            synced = sorted((m for m in self.membership.members if m.synced), key=lambda m: m.worker_id)
            # every donor failed this joiner: the failures may have been passing (a partition, a
            # restart), so all are tried again; the joiner backs off between attempts
            donors = [m for m in synced if m.worker_id not in req.failed] or synced
            if not donors:
                continue
            donor = donors[0]
            self.generation += 1  # transfer ids come from the same counter: unique across restarts
            t = Transfer(self.generation, joiner, self.store, self.nonce())
            self.owed.setdefault(donor.worker_id, []).append(t)
            del self.joins[joiner]
            log.info("joiner %s gets its state from %s (transfer %d)", joiner, donor.worker_id, t.transfer_id)
            self._send(
                req.reply_to,
                "join_reply",
                {
                    "donor": donor.worker_id,
                    "donor_addr": donor.addr,
                    "transfer_id": t.transfer_id,
                    "store": t.store,
                    "rendezvous": t.rendezvous,
                },
            )

    def _transfer_done(self, b: dict) -> tuple[str, dict]:
        # from the donor (sent, or failed), or from the joiner (it could not receive)
        reporter, tid = b["worker_id"], b["transfer_id"]
        if b["ok"] and reporter == b["joiner"]:
            raise Refusal("a joiner cannot report its own transfer done: its donor does")
        for transfers in self.owed.values():
            transfers[:] = [t for t in transfers if t.transfer_id != tid]
        if not b["ok"]:  # the other side, perhaps still waiting to connect, gives up at once
            self.cancelled.append(tid)
        joiner = self.membership.get(b["joiner"])
        if b["ok"] and joiner is not None:
            self.membership = set_synced(self.membership, b["joiner"], True, b["round"])
            log.info(
                "%s is in sync (round %d, step %d) from %s", b["joiner"], b["round"], b["step"], reporter
            )
        return "ok", {"epoch": self.membership.epoch}


def _resync(rnd: int, epoch: int) -> dict:
    """The quorum reply that sends a member to fetch the job's state."""
    return {
        "round": rnd,
        "action": "resync",
        "epoch": epoch,
        "rank": -1,
        "world": 0,
        "members": [],
        "store": "",
        "generation": 0,
        "rendezvous": "",
    }
