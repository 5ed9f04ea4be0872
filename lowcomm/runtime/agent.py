"""The worker agent: the client side of an elastic job, and ElasticGroup, the ReplicaGroup over it.

    agent = WorkerAgent("tcp://coord:29400", key, worker_id="node7")
    group = ElasticGroup(agent)
    diloco = DiLoCo(model, opt, group, ...)          # registers the configuration's fingerprint
    if not agent.start():                            # a joiner: fetch the job's state first
        agent.join(lambda state: load(state))
    for ...:
        ...; diloco.step()                           # may raise ResyncRequired: join again
        agent.serve_pending(snapshot)                # hand state to joiners at a quiet step

The agent heartbeats on a thread of its own (so a worker busy in a long step is not declared
dead) and learns from each reply which generations were aborted, which members were lost, and
which joiners it owes a state transfer.

ElasticGroup runs every collective on a driver thread, in call order. For each one it asks the
coordinator for a quorum, builds (or reuses) a gloo group for that membership from the
coordinator's TCPStore under the generation's prefix, runs the same two-phase quantized reduce as
DistributedGroup, and reports ``commit``. A round whose generation is aborted (a peer died, hung
or failed) is given up at once, even while blocked inside gloo, and redone with the survivors
from the pseudo-gradient the Work still holds; the result is returned only once committed, so
every survivor applies the same bits.

Settings, all in one place (none needs tuning for a loopback or LAN job):
    heartbeat_s: how often the agent heartbeats (0.5 s). The coordinator declares a worker dead
        after ``clamp(5 x its observed interval, 2 s, 30 s)`` of silence.
    pg_timeout_s: gloo's own timeout (300 s): only a backstop, the coordinator's aborts come first.
    transfer_timeout_s: a state transfer that makes no progress for this long is retried from
        another donor (120 s); a donor's death is noticed within a heartbeat instead.
    The coordinator's round deadline for stragglers: ``clamp(5 x observed arrival spread, 10 s, 120 s)``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..comm.codecs import Codec
from ..comm.distributed import ContributionDropped, DistributedGroup, LinkEmulator
from ..comm.group import CollectiveError, ReduceStats, ReplicaGroup, Work
from .coordinator import CoordinatorClient, CoordinatorError
from .transfer import pack, recv_state, send_state

__all__ = [
    "WorkerAgent",
    "ElasticGroup",
    "ResyncRequired",
    "Abandoned",
    "default_advertise_addr",
    "job_state",
    "load_job_state",
]

log = logging.getLogger(__name__)


class ResyncRequired(CollectiveError):
    """This worker fell out of the job's rounds (left out as a straggler, expired, or the
    coordinator restarted without it): fetch the state again with :meth:`WorkerAgent.join`."""


class Abandoned(RuntimeError):
    """An operation on a gloo group was given up because the coordinator aborted its generation
    or a peer of it was lost."""


def default_advertise_addr(coordinator: str) -> str:
    """The address of this host on the route to the coordinator (127.0.0.1 for a local one)."""
    host = coordinator.split("//", 1)[-1].rsplit(":", 1)[0]
    if host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((socket.gethostbyname(host), 9))  # no packet is sent
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def run_guarded(fn: Callable[[], Any], abandon: Callable[[], str | None], timeout_s: float | None = None):
    """Run ``fn`` on a daemon thread; give up (Abandoned) as soon as ``abandon()`` names a reason.

    A gloo call blocked on a dead or hung peer cannot be interrupted; the thread is left behind
    and ends at gloo's own timeout, while the caller moves on at once.
    """
    box: dict[str, Any] = {}
    done = threading.Event()

    def body():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=body, daemon=True, name="lowcomm-gloo").start()
    end = None if timeout_s is None else time.monotonic() + timeout_s
    while not done.wait(0.02):
        reason = abandon()
        if reason:
            raise Abandoned(reason)
        if end is not None and time.monotonic() > end:
            raise Abandoned(f"no progress within {timeout_s}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def make_gloo_group(store_addr: str, prefix: str, rank: int, world: int, host: str, timeout_s: float):
    """A gloo process group of ``world`` processes from a TCPStore, not registered with
    torch.distributed (so any number can exist side by side, one per generation)."""
    h, port = store_addr.rsplit(":", 1)
    store = dist.TCPStore(
        h, int(port), is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
    )
    prefixed = dist.PrefixStore(prefix, store)
    Gloo = dist.ProcessGroupGloo
    if hasattr(Gloo, "_Options"):
        opts = Gloo._Options()
        opts._timeout = timedelta(seconds=timeout_s)
        opts._devices = [Gloo.create_device(hostname=host)]
        return Gloo(prefixed, rank, world, opts), prefixed
    return Gloo(prefixed, rank, world, timedelta(seconds=timeout_s)), prefixed


@dataclass
class _View:
    """What the heartbeat thread last heard from the coordinator."""

    aborted: set = field(default_factory=set)
    lost: set = field(default_factory=set)
    serve: list = field(default_factory=list)
    synced: bool = True
    reachable: bool = True
    last_reply: float = 0.0


class WorkerAgent:
    """One worker's membership in an elastic job.

    Args:
        endpoint: the coordinator, "tcp://host:port".
        key: the job's shared secret.
        worker_id: this worker's name in the job (default: hostname-pid).
        advertise_addr: the address peers use to reach this worker (gloo and state transfers);
            default: this host's address on the route to the coordinator.
        record: ``record(kind, **fields)`` receives membership events (rounds redone, transfers).
    """

    def __init__(
        self,
        endpoint: str,
        key: bytes,
        worker_id: str | None = None,
        advertise_addr: str | None = None,
        *,
        heartbeat_s: float = 0.5,
        pg_timeout_s: float = 300.0,
        transfer_timeout_s: float = 120.0,
        record: Callable[..., None] | None = None,
    ) -> None:
        if not heartbeat_s > 0:
            raise ValueError(f"heartbeat_s must be > 0, got {heartbeat_s!r}")
        self.endpoint, self.key = endpoint, key
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.advertise_addr = advertise_addr or default_advertise_addr(endpoint)
        self.heartbeat_s, self.pg_timeout_s, self.transfer_timeout_s = (
            heartbeat_s,
            pg_timeout_s,
            transfer_timeout_s,
        )
        self.incarnation = uuid.uuid4().hex[:16]
        self.record = record or (lambda kind, **f: None)
        self.fingerprint = ""
        self.step = 0
        self.next_round = 0
        self.synced = True
        self.view = _View()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._hb_thread: threading.Thread | None = None
        self.hooks = None  # a FaultInjector, set by the runtime
        self._main = self._client("main")
        self._rpc = self._client("rpc")
        self._done_transfers: set[int] = set()

    def _client(self, role: str) -> CoordinatorClient:
        c = CoordinatorClient(self.endpoint, self.key, f"{self.worker_id}/{role}", timeout_s=5.0)
        c.blocked = lambda: self.hooks is not None and self.hooks.partitioned_from("coordinator")
        return c

    # ---- registration and heartbeats ------------------------------------------------------------

    def _register(self, client: CoordinatorClient) -> bool:
        body = {
            "worker_id": self.worker_id,
            "advertise_addr": self.advertise_addr,
            "step": self.step,
            "incarnation": self.incarnation,
            "fingerprint": self.fingerprint,
            "synced": self.synced,
            "round": self.next_round,
        }
        reply = client.request("register", body).body
        with self._lock:
            self.synced = self.synced and reply["synced"]
            self.view.synced = reply["synced"]
        return reply["synced"]

    def start(self, fresh: bool = True) -> bool:
        """Register (waiting for the coordinator as long as it takes) and start heartbeating.

        Returns whether this worker is in sync with the job (a fresh job's first members are);
        if not, call :meth:`join` before training.
        """
        self.synced = fresh
        while True:
            try:
                synced = self._register(self._main)
                break
            except CoordinatorError as e:
                if "no reply" not in str(e):
                    raise
                log.warning("coordinator at %s does not answer yet; retrying", self.endpoint)
        self.record("membership", what="registered", synced=synced, worker=self.worker_id)
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, daemon=True, name="lowcomm-heartbeat")
        self._hb_thread.start()
        return synced

    def _heartbeat_loop(self) -> None:
        client = self._client("hb")
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._heartbeat_once(client)
            except Exception as e:  # the heartbeat thread never dies of one bad reply
                log.error("%s: heartbeat error: %r", self.worker_id, e)
        client.close()

    def _heartbeat_once(self, client: CoordinatorClient) -> None:
        try:
            reply = client.request(
                "heartbeat",
                {"worker_id": self.worker_id, "step": self.step, "round": self.next_round},
                timeout_s=max(2.0, 2 * self.heartbeat_s),
            ).body
        except CoordinatorError as e:
            if "not registered" in str(e):  # a restarted coordinator, or we were expired
                log.warning(
                    "%s: the coordinator does not know this worker; registering again", self.worker_id
                )
                try:
                    synced = self._register(client)
                    self.record("membership", what="re-registered", synced=synced, worker=self.worker_id)
                except CoordinatorError as e2:
                    log.warning("re-registration failed: %s", e2)
            else:
                if self.view.reachable:
                    log.warning("%s: heartbeat failed: %s", self.worker_id, e)
                self.view.reachable = False
            return
        lost = {str(w) for w in reply["lost"]}
        for w in sorted(lost - self.view.lost - {self.worker_id}):  # died, hung, cut off or left
            self.record("membership", what="lost", worker=w)
        with self._lock:
            self.view.reachable = True
            self.view.last_reply = time.monotonic()
            self.view.aborted.update(int(g) for g in reply["aborted"])
            self.view.lost = lost
            self.view.serve = [
                t
                for t in reply["serve"]
                if isinstance(t, dict) and t.get("transfer_id") not in self._done_transfers
            ]
            self.view.synced = bool(reply["synced"])

    def close(self, leave: bool = True, finished: bool = False) -> None:
        """Stop heartbeating; with ``leave``, tell the coordinator this worker is gone (``finished``:
        it reached the job's last step)."""
        self._stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join(5)
        if leave:
            try:
                self._main.request(
                    "leave", {"worker_id": self.worker_id, "finished": finished}, timeout_s=2.0
                )
            except CoordinatorError as e:
                log.info("leave not acknowledged: %s", e)
        self._main.close()
        self._rpc.close()

    def is_aborted(self, generation: int) -> bool:
        with self._lock:
            return generation in self.view.aborted

    def lost(self, worker: str) -> bool:
        with self._lock:
            return worker in self.view.lost

    # ---- rounds (driver thread) --------------------------------------------------------------------

    def quorum(self, rnd: int, cancel: Callable[[], bool] | None = None) -> dict | None:
        """Wait for the quorum of round ``rnd``; raises ResyncRequired when out of sync."""
        while True:
            try:
                reply = self._rpc.call(
                    "quorum",
                    {"worker_id": self.worker_id, "round": rnd},
                    match=lambda r: r.type == "quorum_reply" and r.body["round"] == rnd,
                    cancel=cancel,
                )
            except CoordinatorError as e:
                if "not registered" in str(e):  # the heartbeat thread registers again; ask again
                    time.sleep(self.heartbeat_s)
                    continue
                raise
            if reply is None:
                return None
            if reply.body["action"] == "resync":
                with self._lock:
                    self.synced = False
                raise ResyncRequired(
                    f"{self.worker_id} is out of sync at round {rnd}; it must fetch the state"
                )
            return reply.body

    def commit(self, rnd: int, generation: int, ok: bool, members: list[str], suspects=()) -> bool:
        """Report the outcome of a round; returns the coordinator's decision (True = committed)."""
        while True:
            try:
                reply = self._rpc.call(
                    "commit",
                    {
                        "worker_id": self.worker_id,
                        "round": rnd,
                        "generation": generation,
                        "ok": ok,
                        "members": members,
                        "suspects": list(suspects),
                    },
                    match=lambda r: r.type == "decision" and r.body["generation"] == generation,
                )
            except CoordinatorError as e:
                if "not registered" in str(e):
                    time.sleep(self.heartbeat_s)
                    continue
                raise
            return bool(reply.body["commit"])

    # ---- state transfer (main thread) ---------------------------------------------------------------

    def join(self, load: Callable[[Any], None]) -> dict:
        """Fetch the job's state from a live member and hand it to ``load``; retries other donors.

        Returns facts about the transfer (donor, bytes, seconds, attempts).
        """
        failed: list[str] = []
        attempts = 0
        while True:
            attempts += 1
            reply = self._main.call(
                "join",
                {"worker_id": self.worker_id, "failed": failed[-64:]},
                match=lambda r: r.type == "join_reply",
            )
            b = reply.body
            donor, tid = b["donor"], b["transfer_id"]
            t0 = time.perf_counter()
            self.record("transfer", what="start", donor=donor, transfer_id=tid, attempt=attempts)

            try:
                state = self._over_transfer_group(b["store"], tid, 1, donor, lambda pg: recv_state(pg, 0))
            except Exception as e:
                log.warning(
                    "%s: state transfer from %s failed (%s); asking for another donor",
                    self.worker_id,
                    donor,
                    e,
                )
                self.record("transfer", what="failed", donor=donor, transfer_id=tid, reason=str(e)[:300])
                self._report_transfer(tid, self.worker_id, ok=False)  # the donor stops waiting for us
                failed.append(donor)
                # back off: when every donor failed (this worker is cut off, say) they are tried again
                time.sleep(min(0.25 * 2 ** (len(failed) - 1), 2.0))
                continue
            seconds = time.perf_counter() - t0
            load(state)
            with self._lock:
                self.synced = True
            info = {"donor": donor, "seconds": seconds, "attempts": attempts, "transfer_id": tid}
            self.record("transfer", what="received", **info)
            return info

    def _over_transfer_group(self, store: str, tid: int, rank: int, peer: str, work: Callable[[Any], Any]):
        """Run ``work(pg)`` on the two-process group of transfer ``tid`` (donor rank 0, joiner rank
        1), given up as soon as ``peer`` is lost, the coordinator aborts the transfer (the other side
        gave up on it), or after ``transfer_timeout_s``."""

        def body():
            # fault hooks: a joiner's before it connects, a donor's once connected (a death mid-transfer)
            if self.hooks is not None and rank == 1:
                self.hooks.during_transfer("joiner")
            pg, _ = make_gloo_group(store, f"x{tid}/", rank, 2, self.advertise_addr, self.pg_timeout_s)
            if self.hooks is not None and rank == 0:
                self.hooks.during_transfer("donor")
            return work(pg)

        def abandon() -> str | None:
            if self.lost(peer):
                return f"{'donor' if rank else 'joiner'} {peer} was lost"
            if self.is_aborted(tid):
                return f"transfer {tid} was given up by {'the donor' if rank else 'the joiner'} {peer}"
            return None

        return run_guarded(body, abandon, self.transfer_timeout_s)

    def serve_pending(self, snapshot: Callable[[], Any]) -> int:
        """Send the state to every joiner this worker owes one; call at a step with no round in flight.

        Returns the number of transfers served.
        """
        with self._lock:
            todo = list(self.view.serve)
            self.view.serve = []
        served = 0
        for t in todo:
            tid, joiner = int(t["transfer_id"]), str(t["joiner"])
            if tid in self._done_transfers or self.is_aborted(tid):  # the joiner gave up on it
                continue
            self._done_transfers.add(tid)
            header, flat = pack(snapshot())
            t0 = time.perf_counter()

            try:
                ok = self._over_transfer_group(
                    str(t["store"]),
                    tid,
                    0,
                    joiner,
                    functools.partial(send_state, header=header, flat=flat, dst=1),
                )
            except Exception as e:
                log.warning("%s: transfer %d to %s failed: %s", self.worker_id, tid, joiner, e)
                ok = False
            seconds = time.perf_counter() - t0
            nbytes = len(header) + flat.numel()
            self.record(
                "transfer",
                what="served",
                joiner=joiner,
                transfer_id=tid,
                ok=ok,
                bytes=nbytes,
                seconds=seconds,
            )
            self._report_transfer(tid, joiner, bool(ok))
            served += int(bool(ok))
        return served

    def _report_transfer(self, tid: int, joiner: str, ok: bool) -> None:
        """Tell the coordinator how transfer ``tid`` ended: a donor's success makes the joiner
        synced; a failure on either side aborts the transfer, so the other side stops waiting."""
        try:
            self._main.request(
                "transfer_done",
                {
                    "worker_id": self.worker_id,
                    "joiner": joiner,
                    "transfer_id": tid,
                    "ok": ok,
                    "round": self.next_round,
                    "step": self.step,
                },
            )
        except CoordinatorError as e:
            log.warning("transfer_done not acknowledged: %s", e)


class _ElasticWork(Work):
    def __init__(self, stats: ReduceStats):
        super().__init__(stats)
        self._done = threading.Event()
        self.attempts = 0
        self.members: list[str] = []

    def is_completed(self) -> bool:
        return self._done.is_set()

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
    method: str
    work: _ElasticWork
    session: int


class ElasticGroup(ReplicaGroup):
    """The replicas of an elastic job as one ReplicaGroup: membership may change between rounds
    (and within one: a round that loses a member is redone without it).

    ``rank`` and ``size`` are those of the last round formed.
    """

    bucket_elems = 1 << 26  # one quorum per bucket: fewer, larger buckets
    collective_floor_s = 5.0
    collective_ceiling_s = 120.0

    def __init__(self, agent: WorkerAgent, link: LinkEmulator | None = None, hooks=None) -> None:
        self.agent, self.link, self.hooks = agent, link, hooks
        self._coll_s: float | None = None
        self._seq = 0
        self._session = 0
        self._rank, self._size = 0, 1
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._group: tuple[tuple, DistributedGroup] | None = None  # (members, store) -> group
        self.rounds_redone = 0
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
        """Record the configuration's fingerprint; the coordinator refuses workers that differ."""
        self.agent.fingerprint = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()

    def reset(self, next_round: int) -> None:
        """Drop every queued round (after a resync) and continue at ``next_round``."""
        self._session += 1
        self._seq = next_round
        self.agent.next_round = next_round
        self._group = None

    def _all_reduce_mean(self, buffer: torch.Tensor, codec: Codec, method: str) -> Work:
        work = _ElasticWork(ReduceStats())
        self._queue.put(_Job(self._seq, buffer, codec, method, work, self._session))
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
        """Seconds a round's reduce may take before this worker gives it up:
        ``clamp(10 x smoothed duration of the last successful ones, 5 s, 120 s)``."""
        if self._coll_s is None:
            return self.collective_ceiling_s
        return min(max(10 * self._coll_s, self.collective_floor_s), self.collective_ceiling_s)

    def _run(self, job: _Job):
        agent, hooks = self.agent, self.hooks
        if hooks is not None:
            hooks.before_collective(job.seq, job.buffer)
        while True:
            q = agent.quorum(job.seq, cancel=lambda: job.session != self._session)
            if q is None:
                raise ResyncRequired("round dropped: this worker resynchronized")
            gen, members = q["generation"], list(q["members"])
            job.work.attempts += 1
            result, suspects, group = None, [], None
            try:
                if q["world"] == 1:
                    result = (job.buffer.clone(), job.buffer)
                    stats = ReduceStats()
                else:
                    group = self._group_for(q)
                    stats = ReduceStats()
                    t0 = time.monotonic()
                    result = run_guarded(
                        functools.partial(group.reduce_guarded, job.buffer, job.codec, job.seq, stats, hooks),
                        functools.partial(self._aborted, gen),
                        self.collective_deadline(),
                    )
                    took = time.monotonic() - t0
                    self._coll_s = took if self._coll_s is None else 0.8 * self._coll_s + 0.2 * took
                job.work.stats = stats
            except ContributionDropped as e:
                log.warning("%s: %s", agent.worker_id, e)
                end = time.monotonic() + 2 * self.collective_deadline()
                while not agent.is_aborted(gen) and time.monotonic() < end:  # the others give it up
                    time.sleep(0.05)
            except Exception as e:
                log.warning("%s: round %d (generation %d) failed: %s", agent.worker_id, job.seq, gen, e)
                if group is not None:
                    suspects = [members[r] for r in group.missing(job.seq)]
            if result is None:
                self._group = None
            if agent.commit(job.seq, gen, result is not None, members, suspects):
                self._rank, self._size = q["rank"], q["world"]
                job.work.members = members
                if stats.excluded:
                    agent.record(
                        "excluded",
                        round=job.seq,
                        generation=gen,
                        contributions={members[r]: why for r, why in stats.excluded.items()},
                    )
                return result
            self._group = None
            self.rounds_redone += 1
            agent.record("round_redone", round=job.seq, generation=gen, members=members, suspects=suspects)

    def _aborted(self, gen: int) -> str | None:
        return f"generation {gen} was aborted" if self.agent.is_aborted(gen) else None

    def _group_for(self, q: dict) -> DistributedGroup:
        key = (tuple(q["members"]), q["store"])
        if self._group is not None and self._group[0] == key:
            group = self._group[1]
            group.link = self.link  # a slow-link fault may have changed it since the group was built
            return group
        gen, agent = q["generation"], self.agent
        pg, store = run_guarded(
            lambda: make_gloo_group(
                q["store"], f"g{gen}/", q["rank"], q["world"], agent.advertise_addr, agent.pg_timeout_s
            ),
            functools.partial(self._aborted, gen),
            self.collective_deadline() + 10.0,
        )
        group = DistributedGroup(
            pg, rank=q["rank"], size=q["world"], store=store, link=self.link, name=f"g{gen}"
        )
        self._group = (key, group)
        return group


def job_state(diloco, group: ElasticGroup) -> dict:
    """What a joiner receives from its donor: the DiLoCo state (global fragments, outer momentum,
    step, error-feedback buffers, nothing in flight) and the next round. Take it at a step with no
    round in flight (``diloco.in_flight == 0``); add what else the joiner should get."""
    return {"diloco": diloco.state_dict(), "round": group.next_round}


def load_job_state(diloco, group: ElasticGroup, state: dict, *, joiner: bool = True) -> None:
    """Continue from ``state`` (a donor's :func:`job_state`, or this worker's own checkpoint).

    As a joiner (the default) the error-feedback residuals are zeroed, since a copy of the donor's
    would count its quantization error twice, and the local parameters are set to the global
    ones, so the first pseudo-gradient holds only this worker's own progress. Queued rounds are
    dropped and the agent's step set to the state's.
    """
    if joiner:
        for fs in state["diloco"]["fragments"]:
            if fs.get("residual") is not None:
                fs["residual"].zero_()
    group.reset(int(state["round"]))
    diloco.load_state_dict(state["diloco"])
    group.agent.step = diloco.step_count
    if joiner:
        diloco.sync_local_parameters()
