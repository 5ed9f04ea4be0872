"""ElasticGroup: the ReplicaGroup of an elastic job, over a WorkerAgent.

ElasticGroup runs every collective on a driver thread, in call order. For each one it asks the
coordinator for a quorum, builds (or reuses) a gloo group for that membership from the
coordinator's TCPStore under the generation's prefix, runs the guarded two-phase reduce of
:class:`~lowcomm.comm.DistributedGroup` (the same code as a static job's, with its guards on),
and reports ``commit``. A round whose generation is aborted (a peer died, hung or failed) is
given up at once, even while blocked inside gloo, and redone with the survivors from the
pseudo-gradient the Work still holds; the result is returned only once committed, so every
survivor applies the same bits.

Deadline of a round's reduce: ``clamp(10 x smoothed duration of the last successful ones,
5 s, 120 s)``; gloo's own timeout (the agent's ``pg_timeout_s``) is only a backstop.

A worker whose attempts fail in its own process (an error raised here that names no missing
peer: it cannot build its gloo group, its codec fails) would have the whole job redo the round
for ever, since the others find nothing missing to leave out. After ``max_retries`` such
failures in a row (torchft's Manager has the same knob) it gives the round up with a
CollectiveError and leaves the job, so the others go on without it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..._checks import is_int, one_line
from ...comm.codecs import Codec
from ...comm.distributed import DistributedGroup, LinkEmulator, alone
from ...comm.group import CollectiveError, ReduceStats, ReplicaGroup, Work
from ..hooks import NO_FAULTS, FaultHooks
from .agent import Quorum, ResyncRequired, WorkerAgent
from .gloo import Abandoned, make_gloo_group, run_guarded

__all__ = ["ElasticGroup", "ContributionDropped", "make_gloo_group"]

log = logging.getLogger(__name__)


class ContributionDropped(CollectiveError):
    """A fault hook made this replica's contribution to a round never arrive."""


def _lost_peer(e: BaseException) -> bool:
    """Whether ``e`` is gloo's word that a peer's connection went away ("Connection closed by
    peer", "Connection reset by peer", raised from its pair.cc): the peer's failure, not this
    worker's own (a worker whose rounds fail in its own process exits, and its peers see this)."""
    text = str(e)
    return "by peer" in text or "pair.cc" in text


class _ElasticWork(Work):
    def __init__(self, stats: ReduceStats):
        super().__init__(stats)
        self._done = threading.Event()
        self.attempts = 0
        self.members: list[str] = []

    def _finish(self, result=None, sent=None, error: BaseException | None = None) -> None:
        if error is not None:
            self._fail(error)
        else:
            self._complete(result, sent)
        self._done.set()

    def wait(self) -> torch.Tensor:
        t0 = time.perf_counter()
        self._done.wait()
        if self._error is not None:
            raise self._error
        self.stats.wait_s += time.perf_counter() - t0
        return self._result


@dataclass
class _Job:
    seq: int
    buffer: torch.Tensor
    codec: Codec
    work: _ElasticWork
    session: int


class _RoundTap:
    """The fault hooks of one round, as the reduce's tap (a damaged payload, a death mid-round)."""

    def __init__(self, hooks: FaultHooks, rnd: int, corrupt: bool) -> None:
        self.hooks, self.rnd, self.corrupt = hooks, rnd, corrupt

    def outgoing(self, payload: torch.Tensor) -> None:
        if self.corrupt:
            self.hooks.corrupt(payload)

    def between_phases(self) -> None:
        self.hooks.between_phases(self.rnd)


class ElasticGroup(ReplicaGroup):
    """The replicas of an elastic job as one ReplicaGroup: membership may change between rounds
    (and within one: a round that loses a member is redone without it).

    Args:
        agent: this worker's membership in the job.
        link: emulate a slower network on the rounds.
        hooks: fault hooks (a round's nan, drop, corrupt, mid-round kill; the slow link).
        max_retries: attempts of a round that fail in this worker itself, in a row, after which
            it gives the round up (CollectiveError) rather than have the job redo it again;
            0 = never give up.

    ``rank`` and ``size`` are those of the last round formed. The guarded reduce is two-phase:
    a ``method="all_gather"`` request is refused.
    """

    bucket_elems = 1 << 26  # one quorum per bucket: fewer, larger buckets
    collective_floor_s = 5.0
    collective_ceiling_s = 120.0

    def __init__(
        self,
        agent: WorkerAgent,
        link: LinkEmulator | None = None,
        hooks: FaultHooks = NO_FAULTS,
        max_retries: int = 10,
    ) -> None:
        if not is_int(max_retries, 0):
            raise ValueError(f"max_retries must be an integer >= 0 (0 = never give up); got {max_retries!r}")
        self.agent, self.link, self.hooks, self.max_retries = agent, link, hooks, max_retries
        self._own_failures = 0  # attempts in a row that failed in this worker itself
        self._coll_s: float | None = None
        self._seq = 0
        self._session = 0
        self._rank, self._size = 0, 1
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._group: tuple[tuple, DistributedGroup] | None = None  # (members, store) -> group
        self.rounds_redone = 0
        self._verified: dict[str, dict] = {}  # what -> info, in the fingerprint
        threading.Thread(target=self._drive, daemon=True, name="lowcomm-elastic").start()

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    @property
    def next_round(self) -> int:
        return self._seq

    def verify_same(self, what: str, info: dict) -> None:
        """Hand ``info`` to the agent's fingerprint (with everything given before): the coordinator
        refuses a worker whose fingerprint differs from the job's when it registers, so this must
        happen before :meth:`WorkerAgent.start`. (The job's round numbers keep its rounds in step;
        a joiner gets the job's state, so its initial parameters only have to match the job's
        initial ones, as any member's do when all start from the same seed.)

        Raises:
            RuntimeError: the agent has already registered without it.
        """
        self._verified[what] = info
        fingerprint = hashlib.sha256(json.dumps(self._verified, sort_keys=True).encode()).hexdigest()
        self.agent.set_fingerprint(fingerprint)

    @property
    def collective_s(self) -> float | None:
        """This worker's smoothed time of a round's reduce (None before its first round)."""
        return self._coll_s

    def adopt_collective_s(self, seconds: Any) -> None:
        """Start from the job's observed reduce time (a donor's, or this worker's own from its
        checkpoint) where this process has none yet: the first round of a restarted or joining
        worker is then given up after 10x the job's usual time, not after the 120 s ceiling (the
        soak run's case: a peer whose contribution never came held a restarted worker 130 s).
        A value that is not a finite number of seconds > 0 is ignored."""
        if self._coll_s is None and isinstance(seconds, float) and math.isfinite(seconds) and seconds > 0:
            self._coll_s = seconds

    def reset(self, next_round: int) -> None:
        """Drop every queued round (after a resync) and continue at ``next_round``."""
        self._session += 1
        self._seq = next_round
        self.agent.next_round = next_round
        self._group = None

    def _all_reduce_mean(self, buffer: torch.Tensor, codec: Codec, method: str, tag: int | None) -> Work:
        if method != "two_phase":
            raise ValueError(f"reduce={method!r}: an elastic job's guarded reduce is 'two_phase'")
        work = _ElasticWork(ReduceStats())
        self._queue.put(_Job(self._seq, buffer, codec, work, self._session))
        self._seq += 1
        return work

    def _drive(self) -> None:
        while True:
            job = self._queue.get()
            if job.session != self._session:
                job.work._finish(error=ResyncRequired("round dropped: this worker resynchronized"))
                continue
            try:
                result, sent = self._run(job)
                job.work._finish(result, sent)
                self.agent.next_round = max(self.agent.next_round, job.seq + 1)
            except BaseException as e:
                job.work._finish(error=e)

    def collective_deadline(self) -> float:
        """Seconds a round's reduce may take before this worker gives it up."""
        if self._coll_s is None:
            return self.collective_ceiling_s
        return min(max(10 * self._coll_s, self.collective_floor_s), self.collective_ceiling_s)

    def _run(self, job: _Job):
        agent, hooks = self.agent, self.hooks
        hooks.before_collective(job.seq, job.buffer)
        while True:
            q = agent.quorum(job.seq, cancel=lambda: job.session != self._session)
            if q is None:
                raise ResyncRequired("round dropped: this worker resynchronized")
            job.work.attempts += 1
            result, suspects, group, stats, own = None, [], None, ReduceStats(), None
            try:
                action = hooks.collective_action(job.seq)
                if action == "drop":
                    raise ContributionDropped(
                        f"replica {q.rank}'s contribution to round {job.seq} was dropped (fault injection)"
                    )
                if q.world == 1:  # alone in the round: screened all the same
                    result = alone(job.buffer, stats, guarded=True)
                else:
                    group = self._group_for(q)
                    result = self._reduce(group, job, q, stats, corrupt=action == "corrupt")
                job.work.stats = stats
            except ContributionDropped as e:
                log.warning("%s: %s", agent.worker_id, e)
                # the others give up the round (alone, there is no one to wait for)
                end = time.monotonic() + (2 * self.collective_deadline() if q.world > 1 else 0.0)
                while not agent.is_aborted(q.generation) and time.monotonic() < end:
                    time.sleep(0.05)
            except Exception as e:
                log.warning(
                    "%s: round %d (generation %d) failed: %s", agent.worker_id, job.seq, q.generation, e
                )
                if group is not None:
                    suspects = [q.members[r] for r in group.missing(job.seq)]
                if not suspects and not isinstance(e, Abandoned) and not _lost_peer(e):
                    own = e  # (not given up on an abort, nor on a peer missing or gone)
            if result is None:
                self._group = None
            if agent.commit(job.seq, q.generation, result is not None, q.members, suspects):
                if result is None:  # committed from the others' word (a restarted coordinator
                    # decides a generation it never saw from the round the job is at), not ours:
                    # this worker lacks the round's mean (the ninth soak run: a TypeError)
                    raise ResyncRequired(f"round {job.seq} was committed without this worker's result")
                self._rank, self._size = q.rank, q.world
                self._own_failures = 0
                job.work.members = list(q.members)
                if stats.excluded:
                    agent.record(
                        "excluded",
                        round=job.seq,
                        generation=q.generation,
                        contributions={q.members[r]: why for r, why in stats.excluded.items()},
                    )
                return result
            self._group = None
            self.rounds_redone += 1
            agent.record(
                "round_redone", round=job.seq, generation=q.generation, members=q.members, suspects=suspects
            )
            if own is not None:
                self._own_failures += 1
                if self.max_retries and self._own_failures >= self.max_retries:
                    why = one_line(own)
                    agent.record("gave_up", round=job.seq, attempts=self._own_failures, reason=why)
                    raise CollectiveError(
                        f"round {job.seq} failed in this worker {self._own_failures} times in a row "
                        f"(max_retries={self.max_retries}), last: {type(own).__name__}: {why}; "
                        "leaving the job so the others go on without it"
                    )

    def _reduce(self, group: DistributedGroup, job: _Job, q: Quorum, stats: ReduceStats, corrupt: bool):
        """The guarded reduce of one attempt, given up as soon as its generation is aborted."""
        t0 = time.monotonic()
        result = run_guarded(
            functools.partial(
                group.reduce,
                job.buffer,
                job.codec,
                "two_phase",
                job.seq,
                stats,
                _RoundTap(self.hooks, job.seq, corrupt),
            ),
            functools.partial(self._aborted, q.generation),
            self.collective_deadline(),
        )
        took = time.monotonic() - t0
        self._coll_s = took if self._coll_s is None else 0.8 * self._coll_s + 0.2 * took
        return result

    def _aborted(self, gen: int) -> str | None:
        return f"generation {gen} was aborted" if self.agent.is_aborted(gen) else None

    def _group_for(self, q: Quorum) -> DistributedGroup:
        key = (q.members, q.store)
        link = self.hooks.link(self.link)  # a slow-link fault changes the link while it lasts
        if self._group is not None and self._group[0] == key:
            group = self._group[1]
            group.link = link
            return group
        agent = self.agent
        pg, store = run_guarded(
            lambda: make_gloo_group(
                q.store, f"g{q.rendezvous}/", q.rank, q.world, agent.advertise_addr, agent.pg_timeout_s
            ),
            functools.partial(self._aborted, q.generation),
            self.collective_deadline() + 10.0,
        )
        group = DistributedGroup(
            pg, rank=q.rank, size=q.world, store=store, link=link, name=f"g{q.generation}", guard=agent.key
        )
        self._group = (key, group)
        return group
