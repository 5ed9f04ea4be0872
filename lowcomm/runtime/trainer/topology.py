"""Static multi-process jobs: where this process sits, and its process groups from torchrun's environment.

Layout: ``W`` processes, ``k`` per replica (``M = W / k`` replicas). Replica ``r`` is the ranks
``r·k .. r·k + k − 1`` (one node per replica is the usual multi-node layout); they form its inner
group (DDP). The outer group of local rank ``l`` joins rank ``l`` of every replica; each process
synchronizes its pseudo-gradients with its outer group only.

The processes are started by torchrun, or on one machine by ``lowcomm launch``
(:mod:`lowcomm.runtime.trainer.launch`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ..._checks import named_ranks, one_line
from ..._compat import dcp_group_coordinator
from ...comm import CollectiveError
from ...comm.distributed import (
    DistributedGroup,
    LinkEmulator,
    destroy_at_exit,
    env_int,
    is_distributed_env,
    job_store,
    local_gpu_index,
    restart_attempt,
)
from ...comm.slurm import adopt_srun_env

__all__ = [
    "Topology",
    "StopAgreement",
    "init_from_torchrun",
    "is_distributed_env",
    "restart_attempt",
    "store_barrier",
]

log = logging.getLogger(__name__)


@dataclass
class Topology:
    """Where this process sits in a static job.

    Attributes:
        rank, world_size: global rank and process count.
        replica, num_replicas: this process's replica and the replica count M.
        local_rank, procs_per_replica: position inside the replica and its size k.
        outer: the replica group this process synchronizes with (same local rank across replicas).
        inner: the process group of this replica (None when k = 1).
    """

    rank: int
    world_size: int
    replica: int
    num_replicas: int
    local_rank: int
    procs_per_replica: int
    outer: DistributedGroup
    inner: dist.ProcessGroup | None
    _alone: dist.ProcessGroup | None = field(default=None, repr=False)  # (checkpoint_scope)

    @property
    def is_leader(self) -> bool:
        """Rank 0 of the job: the process that writes the run records."""
        return self.rank == 0

    def checkpoint_scope(self) -> dict:
        """Keyword arguments of ``torch.distributed.checkpoint``'s ``save`` and ``load`` that keep a
        checkpoint to this replica's processes: its inner group, or with one process per replica a
        group of this process alone (made by it alone, once). Over the whole job the replicas'
        different local parameters, optimizer states and rounds in flight would be saved as one
        (one entry per key), and each replica's own folder written by the others' collective.
        (On a torch older than 2.8 this also lets the checkpoint's collectives run in a group
        without the job's rank 0: :func:`lowcomm._compat.dcp_group_coordinator`.)"""
        dcp_group_coordinator()
        if self.inner is not None:
            return {"process_group": self.inner}
        if self._alone is None:
            self._alone = dist.new_group([self.rank], use_local_synchronization=True)
        return {"process_group": self._alone}


def init_from_torchrun(
    procs_per_replica: int | None = None,
    *,
    backend: str | None = None,
    outer_backend: str | None = None,
    link: LinkEmulator | None = None,
    timeout_s: float = 300.0,
    collective_timeout_s: float | None = None,
) -> Topology:
    """Initialize torch.distributed from the environment and build the inner and outer groups.
    The environment is torchrun's or ``lowcomm launch``'s, or in a task of an ``srun`` step made
    from SLURM's (:mod:`lowcomm.comm.slurm`).

    Args:
        procs_per_replica: k; default LOWCOMM_PROCS_PER_REPLICA or 1. Must divide WORLD_SIZE.
        backend: backend of the world and inner groups ("nccl" when this machine has a GPU for each
            of its processes, else "gloo", which also moves CUDA tensors).
        outer_backend: backend of the outer groups (default: ``backend``; use "gloo" to keep
            outer state on the CPU of a GPU job).
        link: emulate a slower link on the outer collectives.
        timeout_s: process-group timeout (a peer that does not answer fails the collective).
        collective_timeout_s: how long a round's ``wait()`` may block (default: ``timeout_s``).

    Raises:
        ValueError: k does not divide the world size.
    """
    adopt_srun_env()
    rank, world = env_int("RANK"), env_int("WORLD_SIZE")
    if not 0 <= rank < world:  # a rank past the world waited for a rendezvous it has no place in
        raise ValueError(
            f"environment variables RANK={rank} and WORLD_SIZE={world} are not allowed: "
            "0 <= RANK < WORLD_SIZE"
        )
    k = procs_per_replica or env_int("LOWCOMM_PROCS_PER_REPLICA", 1)
    if k < 1 or world % k:
        raise ValueError(f"procs_per_replica={k} must be >= 1 and divide WORLD_SIZE={world}")
    local_world = env_int("LOCAL_WORLD_SIZE", world)
    # NCCL needs a GPU per process; more processes than GPUs on a machine share them over gloo
    backend = backend or ("nccl" if torch.cuda.device_count() >= local_world else "gloo")
    outer_backend = outer_backend or backend
    gpu = local_gpu_index()
    if gpu is not None:  # this process's GPU: its own, or one it shares (gloo)
        torch.cuda.set_device(gpu)
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        try:
            store, _, _ = job_store(timeout_s)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        except getattr(dist, "DistError", RuntimeError) as e:  # the rendezvous: one line, not a traceback
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            why = one_line(e)
            raise CollectiveError(f"the job's rendezvous at {where} failed: {why}") from None
        destroy_at_exit()  # ours: destroyed at exit if the script does not (it may end with no cleanup)
    M = world // k
    replica, local = divmod(rank, k)
    inner = None
    for r in range(M):  # every process creates every group, in the same order
        g = dist.new_group(list(range(r * k, (r + 1) * k)), timeout=timeout) if k > 1 else None
        if r == replica:
            inner = g
    outer_pg = None
    for l in range(k):
        g = dist.new_group([l + r * k for r in range(M)], timeout=timeout, backend=outer_backend)
        if l == local:
            outer_pg = g
    try:  # the job's own store, to name the peers that never entered a failed collective
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # private API: without it errors just name fewer details
        store = None
    outer = DistributedGroup(
        outer_pg, store=store, link=link, name=f"outer{local}", timeout=collective_timeout_s or timeout_s
    )
    return Topology(rank, world, replica, M, local, k, outer, inner)


def store_barrier(
    store,
    world_size: int,
    key: str,
    timeout_s: float,
    poll_s: float = 0.005,
    wait: bool = True,
    agreement: StopAgreement | None = None,
) -> None:
    """Return once ``world_size`` processes called this with ``key`` (each adds one to its count
    in the job's store; the last one marks it whole); with ``wait`` False, at once, counted.
    Raises TimeoutError after ``timeout_s``, or as soon as ``agreement`` finds processes gone
    (looked at every ``StopAgreement.LOOK_S``: :meth:`StopAgreement.gone`), which will never
    come. It looks every ``poll_s`` rather than wait in the store, whose client a wait holds:
    this process's stop agreement must still get its word through meanwhile."""
    if store.add(key, 1) == world_size:
        store.set(f"{key}/all", "1")
    if not wait:
        return
    start = looked = time.monotonic()
    while not store.check([f"{key}/all"]):
        now = time.monotonic()
        if now - start > timeout_s:
            raise TimeoutError(
                f"{store.add(key, 0)} of {world_size} processes reached {key} in {timeout_s:g} s"
            )
        if agreement is not None and now - looked >= StopAgreement.LOOK_S:
            looked = now
            if lost := agreement.gone():
                raise TimeoutError(f"{named_ranks(lost)} gone before {key}: {agreement.why_gone()}")
        time.sleep(poll_s)


class StopAgreement:
    """The step at which every process of a static job stops once one of them is asked to
    (``train(stop=...)``; SIGTERM to ``lowcomm train``), agreed in the job's store, so that their
    checkpoints are of one step and a resume continues from it.

    Each process gives the earliest step it can still stop at, and all stop at the latest one
    given. A thread tells the others when this process is asked, and sets ``stop`` when another
    one was (a process no signal reached stops too, within ``POLL_S``); it also gives this
    process's step when the main thread cannot: while a collective holds it, the step under way
    is the earliest. A process that was asked gives its step at the end of a step
    (:meth:`step_ended`) and waits there for the others' steps; none of them waits on it in a
    collective by then, since each gave a step no earlier than the one it is in. At its last
    step a process gives that (:meth:`finishing`): the job then ends as it would have.

    A process that died (killed: the launcher, or torchrun, then stops the others with a SIGTERM)
    gives no step. The same thread beats: it counts in the store every ``POLL_S``, whatever the
    main thread is doing, so a process whose count stands still for ``GONE_S`` is gone
    (:meth:`gone`), and the others stop where they are without it (:attr:`lost`) instead of
    waiting ``timeout_s`` for it; one that gives no step within ``timeout_s`` (hung) is not
    waited for longer either.
    """

    #: how often the thread looks in the store and beats: each process asks rank 0's store twice
    #: a second (schedulers signal every process; the relay is for one that no signal reached)
    POLL_S = 1.0
    #: how long a process's beat must stand still for it to be gone once a stop is asked (its
    #: thread beats every POLL_S; one held up that long by a main thread that keeps the
    #: interpreter's lock is rare)
    GONE_S = 3.0
    #: the same while no stop is asked, when a process gone fails the job (at a checkpoint's
    #: barrier): a process stopped for a few seconds and then continued (the ``hang`` fault's
    #: default 3 s, a machine that stalled) is waited for, not taken for dead
    DEAD_S = 10.0
    #: how often a process waiting for the others looks at the beats of those it waits for
    LOOK_S = 0.25
    #: how long a process that stopped waits for the others to close theirs (:meth:`close`)
    CLOSE_S = 10.0

    def __init__(
        self, store, rank: int, world_size: int, stop: threading.Event, prefix: str, timeout_s: float = 15.0
    ):
        self.store, self.rank, self.world_size, self.stop = store, rank, world_size, stop
        self.prefix, self.timeout_s = prefix, timeout_s
        self._earliest = 0  # the earliest step this process can still stop at
        self.agreed = False  # every process gave its step: they stop together
        self.lost: list[int] = []  # the processes found gone: this one stopped without them
        self.apart: str | None = None  # why this one stopped without the others (None: together)
        #: why the job's store stopped answering the thread (its host is gone), once it did
        self.store_lost: str | None = None
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (its beat, when it was first seen)
        self._given = False
        self._lock = threading.Lock()
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="lowcomm-stop-agreement", daemon=True)
        self._thread.start()

    def _beat(self, rank: int) -> str:
        return f"{self.prefix}/alive/{rank}"

    def _watch(self) -> None:
        try:
            while True:
                self.store.add(self._beat(self.rank), 1)
                if self._ended.wait(self.POLL_S):
                    return
                if not self._given and (self.stop.is_set() or self.store.check([f"{self.prefix}/asked"])):
                    self.stop.set()
                    with self._lock:
                        self._give(self._earliest)
        except Exception as e:  # the store went with its host: nothing left to agree on, and each
            # call to a store that is gone logs torch's C++ stack trace, so the thread asks no more
            if not self._ended.is_set():
                self.store_lost = one_line(e, 200)
            log.debug("stop agreement: %s", e)

    def _give(self, step: int) -> None:
        if not self._given:
            self.store.set(f"{self.prefix}/step/{self.rank}", str(step))
            # (also here: the thread's own word can wait behind this process's own use of the
            # store, which holds the store's client)
            self.store.set(f"{self.prefix}/asked", str(self.rank))
            self._given = True

    def still_s(self) -> float:
        """How long a beat must stand still for its process to be gone: ``GONE_S`` once a stop
        is asked, ``DEAD_S`` before."""
        return self.GONE_S if self.stop.is_set() else self.DEAD_S

    def why_gone(self) -> str:
        """Why a process whose beat stood still is gone, for messages."""
        return f"its count in the job's store stood still for {self.still_s():g} s (killed?)"

    def gone(self, ranks: list[int] | None = None) -> list[int]:
        """The processes among ``ranks`` (default: every other one) that are gone: their beat has
        not moved for :meth:`still_s` since this process saw it move (one that has not beaten yet
        is not judged: it may still be starting; one whose beat moves again is not gone)."""
        now = time.monotonic()
        still = self.still_s()
        lost = []
        for r in range(self.world_size) if ranks is None else ranks:
            if r == self.rank:
                continue
            beat = self.store.add(self._beat(r), 0)
            seen = self._seen.get(r)
            if seen is None or seen[0] != beat:
                self._seen[r] = (beat, now)
            elif beat and now - seen[1] >= still:
                lost.append(r)
        return lost

    def step_ended(self, step: int) -> int | None:
        """This process ended ``step``: None while no stop is asked (it goes on to the next step),
        else the step every process stops at (waiting here for the others to give theirs), or
        this step when one of them is gone (:attr:`lost`) or gives none within ``timeout_s``."""
        with self._lock:
            if not self.stop.is_set():
                self._earliest = step + 1
                return None
        keys = {r: f"{self.prefix}/step/{r}" for r in range(self.world_size)}
        start = looked = time.monotonic()
        try:
            with self._lock:
                self._give(step)
            while not self.store.check(list(keys.values())):
                now = time.monotonic()
                if now - looked >= self.LOOK_S:
                    looked = now
                    missing = [r for r, k in keys.items() if not self.store.check([k])]
                    if lost := self.gone(missing):
                        self.lost, self.apart = lost, f"{named_ranks(lost)} gone"
                        log.warning(
                            "stopping at step %d without the job's other processes: %s (%s)",
                            step,
                            self.apart,
                            self.why_gone(),
                        )
                        return step
                    if now - start > self.timeout_s:
                        raise TimeoutError(f"{named_ranks(missing)} gave no step in {self.timeout_s:g} s")
                time.sleep(0.02)
            self.agreed = True
            return max(int(self.store.get(k)) for k in keys.values())
        except TimeoutError as e:  # (a process hung)
            self.apart = str(e)
        except Exception as e:  # (the store went with its host: rank 0 under lowcomm launch or srun)
            self.apart = f"the job's store did not answer: {one_line(e, 200)}"
        log.warning("stopping at step %d without the job's other processes: %s", step, self.apart)
        return step

    def finishing(self, steps: int) -> None:
        """This process ended its last step (its final sync waits for the others): a stop asked
        from now on is this step."""
        with self._lock:
            self._earliest = steps
            if self.stop.is_set():
                try:
                    self._give(steps)
                except Exception as e:  # (the store went with its host: the job is ending anyway)
                    log.debug("stop agreement: %s", e)

    def close(self, finished: bool = False) -> None:
        """The run ended (``finished``: at its last step). After an agreed stop or at the end, wait
        (a few seconds at most) for every process to get here: the job's store lives in rank 0
        (launch, srun), and a process still closing its groups through it logged a C++ stack
        trace when rank 0 left first (3 runs in 10 of a finished job of four processes under load)."""
        self._ended.set()
        if self.agreed or finished:
            try:
                if self.agreed:
                    store_barrier(self.store, self.world_size, f"{self.prefix}/closed", self.CLOSE_S)
                # each one's last word to the store; rank 0, which may host it, leaves after all
                left = f"{self.prefix}/left"
                store_barrier(self.store, self.world_size, left, self.CLOSE_S, wait=self.rank == 0)
            except Exception as e:
                log.debug("stop agreement: %s", e)
