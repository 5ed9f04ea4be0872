"""DistributedGroup: the ReplicaGroup over torch.distributed (gloo on CPU, NCCL on GPU).

The arithmetic is :mod:`lowcomm.comm.reduce`, the same as LocalGroup's, so both give the same
bits. Payload sizes follow from the element count and the codec alone, so every replica knows
every split of the ``all_to_all`` calls without exchanging sizes:

``two_phase``: all_to_all of the ``M`` encoded shards (shard ``j`` to replica ``j``); decode and
    sum in fp32 in rank order; re-encode the mean shard; all_to_all of that payload to everyone;
    decode. ``all_gather``: all_to_all of the whole payload to everyone; decode and sum.

Every collective of a group runs on one communication thread in call order, so ``all_reduce_mean``
returns at once and the inner loop keeps computing until it waits on the result (real overlap).
CUDA buffers are reduced on a CUDA stream of the group's own (high priority), ordered by events:
it starts when the caller's stream has computed the buffer, and ``wait()`` makes the caller's
stream wait for the result rather than the host. Use a process group of its own for the outer
sync, separate from any inner DDP / FSDP group.

Bytes are counted from the tensors handed to the collectives, less the part a replica sends to
itself. A link emulator can stretch each collective to the time a slower network would take.
"""

from __future__ import annotations

import atexit
import gc
import json
import logging
import os
import queue
import re
import threading
import time
import weakref
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from .._checks import env_int, is_int, is_number, named_ranks, one_line, refuse
from .codecs import Codec
from .group import CollectiveError, ReduceStats, ReplicaGroup, Work, out_of_step
from .reduce import Sealer, decode_mean, encode_shards, reduce_shard, screen_norms, shard_bounds

__all__ = [
    "alone",
    "communication_failed",
    "DistributedGroup",
    "LinkEmulator",
    "ReduceTap",
    "gather_shards",
    "env_int",
    "gloo_group",
    "is_distributed_env",
    "job_round",
    "job_store",
    "local_gpu_index",
    "parse_bandwidth",
    "parse_duration",
    "restart_attempt",
    "shard_position",
]

log = logging.getLogger(__name__)

#: the communication stream's priority (CUDA: lower is more urgent; -1 is the highest every torch
#: and GPU serves): a round's encode and decode kernels are scheduled ahead of the inner loop's
COMM_STREAM_PRIORITY = -1

_UNITS_BITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "b": 8, "kb": 8e3, "mb": 8e6, "gb": 8e9}
_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def is_distributed_env() -> bool:
    """Whether this process was started by torchrun or ``lowcomm launch``: a WORLD_SIZE above one,
    or a launcher's job of one process (RANK, WORLD_SIZE and MASTER_ADDR set), which is a job
    too: ``torchrun --nnodes 1:2`` left with one node of one process goes on as the job it was
    (one replica, rank 0's checkpoint), not as one process simulating ``--replicas``."""
    launched = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))
    return env_int("WORLD_SIZE", 1) > 1 or launched


#: this process's :func:`job_round`, once :func:`job_store` met its job
_JOB_ROUND: int | None = None


def restart_attempt() -> int:
    """Which restart of a static job this process is in (0: the first start): the launcher's
    count (TORCHELASTIC_RESTART_COUNT: torchrun, ``lowcomm launch --max-restarts``), or, once
    the process met its job, the starts before this one that the job's store counted where
    that is more (torchrun's nodes count apart: :func:`job_store`)."""
    counted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    return max(counted, (_JOB_ROUND or 1) - 1)


def job_store(timeout_s: float):
    """The launcher's rendezvous (``env://``: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE):
    ``(store, rank, world_size)``, the store under keys of this start of the job alone
    (:func:`job_round`).

    torchrun's agents host a store that outlives a restart and keeps the keys of the start before
    (torch makes no prefix of it there): a restarted job's gloo rendezvous read the address of a
    process that was gone and failed ("Gloo connectFullMesh failed ... Connection refused") or
    hung, 4 restarts in 6 on torch 2.13 (two processes, rank 1 killed). Nor can the restart count
    tell the starts apart: torchrun counts a restart on the node whose process failed, while a
    node whose processes were healthy restarts them uncounted (a membership change), so the
    nodes' counts differ. ``lowcomm launch`` starts a store with every start (rank 0 hosts it):
    the round is 1 there."""
    from datetime import timedelta

    store, rank, world = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout_s)))
    global _JOB_ROUND
    _JOB_ROUND = n = job_round(store, rank, world, timeout_s)
    return dist.PrefixStore(f"lowcomm/round_{n}/", store), rank, world


#: the keys of :func:`job_round` in the job's store
_ROUNDS = "lowcomm/rounds"


def job_round(store, rank: int, world_size: int, timeout_s: float, poll_s: float = 0.01) -> int:
    """The number of this start of the job, the same on every one of its processes and new with
    each start, from a store that may hold the keys of earlier starts: rank 0 takes the next
    number; each other process says hello with a nonce of its own, and rank 0 answers under that
    nonce (a key no earlier start can have written), then it confirms under the new number. Rank 0
    returns once every process confirmed (it answers a hello left by an earlier start too,
    harmlessly). Raises TimeoutError after ``timeout_s`` naming the processes that never came."""
    import uuid

    deadline = time.monotonic() + timeout_s
    if rank != 0:
        nonce = uuid.uuid4().hex
        store.set(f"{_ROUNDS}/hello/{rank}", nonce)
        answer = f"{_ROUNDS}/answer/{nonce}"
        while not store.check([answer]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 of the job did not answer within {timeout_s:g} s")
            time.sleep(poll_s)
        n = int(store.get(answer))
        store.set(f"{_ROUNDS}/{n}/{rank}", "1")
        return n
    n = int(store.add(_ROUNDS, 1))
    answered: dict[int, bytes] = {}
    waiting = set(range(1, world_size))
    while waiting:
        for r in sorted(waiting):
            if store.check([f"{_ROUNDS}/{n}/{r}"]):
                waiting.discard(r)
            elif store.check([f"{_ROUNDS}/hello/{r}"]):
                nonce = store.get(f"{_ROUNDS}/hello/{r}")
                if answered.get(r) != nonce:
                    store.set(f"{_ROUNDS}/answer/{nonce.decode()}", str(n))
                    answered[r] = nonce
        if not waiting:
            return n
        if time.monotonic() > deadline:
            missing = named_ranks(sorted(waiting))
            raise TimeoutError(f"{missing} of the job did not come within {timeout_s:g} s")
        time.sleep(poll_s)
    return n


def communication_failed(e: BaseException) -> bool:
    """Whether ``e``, raised through torch.distributed (a module's collective: DDP's gradient
    all-reduce in backward, its buffers' broadcast in forward), is the communication's failure: a
    torch.distributed error (NCCL's), or gloo's, which raises a RuntimeError naming its source
    ("[.../gloo/transport/tcp/pair.cc:553] Connection closed by peer"), rather than the model's
    own (a shape, out of memory)."""
    return isinstance(e, getattr(dist, "DistError", ())) or "gloo/" in str(e)


def gloo_group(store, rank: int, size: int, timeout_s: float, host: str | None = None):
    """A gloo process group of ``size`` processes over ``store`` (a PrefixStore of its own per
    group), not registered with torch.distributed: any number can exist side by side, beside or
    without a default group. ``host``: the address this process's gloo device binds to (default:
    gloo's choice from the hostname)."""
    from datetime import timedelta

    Gloo = dist.ProcessGroupGloo
    if hasattr(Gloo, "_Options"):
        opts = Gloo._Options()
        opts._timeout = timedelta(seconds=timeout_s)
        device = Gloo.create_device(hostname=host) if host else Gloo.create_default_device()
        opts._devices = [device]
        return Gloo(store, rank, size, opts)
    return Gloo(store, rank, size, timedelta(seconds=timeout_s))


def local_gpu_index() -> int | None:
    """The GPU of a process that torchrun or ``lowcomm launch`` started (``WORLD_SIZE`` > 1):
    ``LOCAL_RANK`` modulo the GPUs it sees (its own GPU, or one it shares when a machine runs more
    processes than it has GPUs). None outside such a job or without a GPU. Counted through NVML
    where it can be, which does not start the CUDA runtime (torch.cuda.is_available() does, after
    which the GPUs a process sees are fixed: see lowcomm.integrations.replica_group)."""
    count = torch.cuda.device_count() if is_distributed_env() else 0
    if not count:
        return None
    return env_int("LOCAL_RANK", env_int("RANK", 0)) % count


def parse_bandwidth(text: str) -> float:
    """'100Mbit' -> 1e8 bits/s. Units: bit, kbit, Mbit, Gbit (bits) or B, KB, MB, GB (bytes), per second."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]+)(?:/s|ps)?\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS_BITS or float(m.group(1)) <= 0:
        raise ValueError(f"link bandwidth {text!r} is not understood; write e.g. '100Mbit' or '50MB'")
    return float(m.group(1)) * _UNITS_BITS[m.group(2).lower()]


def parse_duration(text: str) -> float:
    """'20ms' -> 0.02 seconds. Units: us, ms, s."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(us|ms|s)\s*", str(text))
    if not m:
        raise ValueError(f"duration {text!r} is not understood; write e.g. '20ms', '1.5s' or '500us'")
    return float(m.group(1)) * _UNITS_S[m.group(2)]


def mesh_position(meshes) -> tuple[int, int, list[int]]:
    """``(i, k, ranks)``: this process is ``i`` of the ``k`` global ``ranks`` of the device meshes
    ``meshes`` (those of a replica's DTensor parameters), in rank order."""
    ranks = sorted({int(r) for m in meshes for r in m.mesh.flatten().tolist()})
    return ranks.index(dist.get_rank()), len(ranks), ranks


def shard_position(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """``(k, i)``: the processes of ``group`` (one replica's inner group) and this one's index;
    ``(1, 0)`` without a group."""
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def gather_shards(full: torch.Tensor, bounds: list[tuple[int, int]], group: dist.ProcessGroup) -> None:
    """Fill ``full`` (1-D) from the processes of ``group``: process ``i`` holds the right values of
    ``full[bounds[i][0]:bounds[i][1]]`` and receives everyone else's. A ``full`` in host memory
    (``outer_device="cpu"``) beside an NCCL group, which moves GPU memory only, travels through
    the current GPU."""
    lo, hi = bounds[dist.get_rank(group)]
    width = max(b - a for a, b in bounds)
    device = full.device
    if device.type == "cpu" and dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    mine = torch.zeros(width, dtype=full.dtype, device=device)
    mine[: hi - lo] = full[lo:hi]
    parts = [torch.empty_like(mine) for _ in bounds]
    dist.all_gather(parts, mine, group=group)
    for (a, b), part in zip(bounds, parts):
        full[a:b] = part[: b - a]


class ReduceTap(Protocol):
    """What a caller may observe of one reduce as it runs (the elastic runtime's fault injection
    damages the outgoing payload and stops a process between the two exchanges through it)."""

    def outgoing(self, payload: torch.Tensor) -> None:
        """The uint8 payload this replica is about to send in the first exchange (may be changed)."""

    def between_phases(self) -> None:
        """Called after the first exchange, before the second."""


class _NoTap:
    def outgoing(self, payload: torch.Tensor) -> None:
        pass

    def between_phases(self) -> None:
        pass


NO_TAP: ReduceTap = _NoTap()


@dataclass(frozen=True)
class LinkEmulator:
    """A slower network on one machine: each collective takes at least
    ``latency + bytes_sent · 8 / bandwidth`` seconds (the replica's own bytes on its own link).

    Attributes:
        bandwidth: bits per second of each replica's link.
        latency: seconds added to each collective call.
    """

    bandwidth: float
    latency: float = 0.0

    @classmethod
    def parse(cls, bandwidth: str | None, latency: str | None) -> LinkEmulator | None:
        if bandwidth is None and latency is None:
            return None
        return cls(parse_bandwidth(bandwidth) if bandwidth else float("inf"), parse_duration(latency or "0s"))

    def delay(self, nbytes: int) -> float:
        return self.latency + (nbytes * 8 / self.bandwidth if self.bandwidth != float("inf") else 0.0)


#: seconds between a waiting replica's looks at whether a peer closed its group
FINISHED_POLL_S = 0.5

#: how long a process's exit waits for its groups' queued collectives, all groups together (a
#: round a script left in flight, never calling ``DiLoCo.finish()``). The interpreter's teardown
#: while a gloo collective runs on the communication thread aborts the process ("terminate called
#: without an active exception", exit code -6, which a launcher reads as a failure and may
#: restart). A peer that closed its group without entering the collective is not waited for.
EXIT_DRAIN_S = 30.0


class _CommThread:
    """The one thread that runs a group's collectives, in order. A daemon: a collective stuck on
    a peer that died or finished must not hold the interpreter's exit (a ThreadPoolExecutor's
    threads are joined at exit, so a failed job waited out the process group's timeout)."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:  # handed to the waiter
                    future.set_exception(e)

    def shutdown(self, wait: bool) -> None:
        """Stop after the queued collectives (``wait``: until they are done)."""
        self._jobs.put(None)
        if wait:
            self._thread.join()

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the thread to stop; whether it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


#: every group: those not yet closed are closed at the interpreter's exit (:data:`EXIT_DRAIN_S`),
#: and all let go of their process groups where lowcomm owns them (:func:`destroy_at_exit`)
_GROUPS: weakref.WeakSet = weakref.WeakSet()
#: whether lowcomm initialized torch.distributed (:func:`destroy_at_exit`)
_DESTROY_AT_EXIT = [False]


def destroy_at_exit() -> None:
    """Destroy torch.distributed's process groups at the interpreter's exit, after this module's
    groups have finished their queued collectives, where the script has not destroyed them: for
    the default group lowcomm itself initialized (``init_from_torchrun``).

    A gloo thread drops its last reference to a finished collective's work a moment after the
    work completes, and that frees the work's tensors, which needs the GIL. A moment too late,
    during the interpreter's teardown, the thread cannot take it and the process aborts (exit code
    -6, "terminate called without an active exception"; under gdb: ``~AsyncAlltoallWork`` in
    ``ProcessGroupGloo::runLoop``, then ``take_gil`` during finalization), in about 1 of 10 runs of
    a script that ends with a round in flight and no ``destroy_process_group()``. So at exit the
    groups are destroyed and every reference lowcomm holds to them let go while the interpreter
    still runs: a process group's destructor releases the GIL and joins its threads, so every
    work is gone before the teardown."""
    _DESTROY_AT_EXIT[0] = True


@atexit.register
def _close_groups_at_exit() -> None:
    end = time.monotonic() + EXIT_DRAIN_S  # one limit for all of them
    groups = list(_GROUPS)
    for group in groups:
        if not group._closed and group._pool_ is not None:  # (only its thread can hold a collective)
            group.close(max(end - time.monotonic(), 0.0))
    # (not where a collective failed or outlasted the drain: its thread may wait on a dead peer,
    # and a process group's destructor joins its threads, a hang where the teardown's risk is
    # an abort)
    settled = all(not g._failed and (g._pool_ is None or g._pool_.join(0)) for g in groups)
    if _DESTROY_AT_EXIT[0] and settled and dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # (a group a failed job left behind: the exit goes on)
            log.info("could not destroy the process groups at exit: %s", e)
        for group in groups:
            group.pg = None
        gc.collect()  # (a cycle holding a process group: destroyed now, not in the teardown)


class _DistWork(Work):
    def __init__(
        self, future: Future, group: DistributedGroup, seq: int, stats: ReduceStats, device=None
    ) -> None:
        super().__init__(stats)
        self._future, self._group, self._seq = future, group, seq
        self._device = device  # a CUDA buffer's device (None: a CPU buffer)

    def wait(self) -> torch.Tensor:
        """The mean; on CUDA the caller's stream is made to wait for the communication stream (no
        host sync beyond the communication thread's own hand-over).

        Raises:
            CollectiveError: the collective failed, gave no result within the group's timeout,
                or a replica closed its group without entering it (told within about
                :data:`FINISHED_POLL_S`, not at the timeout), naming the replicas that never
                entered it.
        """
        if self._result is None:
            t0 = time.perf_counter()
            began = None
            if self._device is not None:  # the GPU's time at this point, to tell how long it waits
                began = torch.cuda.Event(enable_timing=True)
                began.record(torch.cuda.current_stream(self._device))
            try:
                result, sent, done = self._outcome()
            except CollectiveError:
                self._group._failed = True  # its thread may be stuck in it: close() does not wait
                raise
            if done is not None:
                stream = torch.cuda.current_stream(result.device)
                stream.wait_event(done)
                result.record_stream(stream)  # the allocator must not reuse it while this stream reads
                if began is not None:
                    resumed = torch.cuda.Event(enable_timing=True)
                    resumed.record(stream)
                    self.stats.device_events = (began, resumed)
            self._complete(result, sent)
            self.stats.wait_s += time.perf_counter() - t0
        return self._result

    def _outcome(self):
        g, timeout = self._group, self._group.timeout
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if end is None else max(end - time.monotonic(), 0.0)
            if g.store is not None:  # look between short waits for a replica that closed its group
                left = FINISHED_POLL_S if left is None else min(FINISHED_POLL_S, left)
            try:
                return self._future.result(timeout=left)
            except FutureTimeout:
                if end is not None and time.monotonic() >= end:
                    raise CollectiveError(
                        g._describe_failure(self._seq, f"no result within {timeout}s")
                    ) from None
                if g._closed_before(self._seq):
                    raise CollectiveError(
                        g._describe_failure(self._seq, "a replica closed its group without entering it")
                    ) from None


class DistributedGroup(ReplicaGroup):
    """The replicas of one epoch, one per process (or one outer group per local rank).

    Args:
        process_group: the outer process group (default: the world). Give it a group of its own
            when the processes also run inner DDP / FSDP collectives.
        store: optional key-value store (the one the job was started with); when given, each
            collective records which replicas entered it, so a timeout names the missing ones.
        link: optional link emulator.
        timeout: seconds a ``wait()`` may block before it raises (default: no limit beyond the
            process group's own timeout).
        name: key prefix in the store, distinct per group and epoch.
        rank, size: this replica's rank and the group's size, for a process group built directly
            (``ProcessGroupGloo(store, rank, size, ...)``) rather than through torch.distributed.
        guard: the job key: screen, seal and exclude bad contributions with it (see :meth:`reduce`);
            two_phase only. None: no guards.
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        *,
        store: dist.Store | None = None,
        link: LinkEmulator | None = None,
        timeout: float | None = None,
        name: str = "outer",
        rank: int | None = None,
        size: int | None = None,
        guard: bytes | None = None,
    ) -> None:
        # a process group built directly (ProcessGroupGloo(store, rank, size, ...), as the elastic
        # runtime does for every generation) is not registered with torch.distributed: it is used
        # through its own methods and needs ``rank`` and ``size``
        if timeout is not None and not (is_number(timeout) and timeout > 0):  # nan: a wait's arithmetic
            raise refuse("timeout", timeout, "a finite number of seconds > 0, or None (no limit)")
        sealer = Sealer(guard, "guard") if guard is not None else None  # (a bad key refused first)
        self._raw = rank is not None
        if self._raw:
            if process_group is None or size is None:
                raise ValueError("a directly built process group needs process_group, rank and size")
            if not (is_int(size, 1) and is_int(rank, 0) and rank < size):
                raise ValueError(f"rank={rank!r} and size={size!r} are not allowed: ints, 0 <= rank < size")
            self.pg, self._rank, self._size = process_group, rank, size
            self.backend = "nccl" if "nccl" in type(process_group).__name__.lower() else "gloo"
        else:
            if not dist.is_initialized():
                raise RuntimeError(
                    "DistributedGroup needs torch.distributed initialized (init_process_group)"
                )
            self.pg = process_group if process_group is not None else dist.group.WORLD
            self._rank = dist.get_rank(self.pg)
            self._size = dist.get_world_size(self.pg)
            self.backend = dist.get_backend(self.pg)
        self.store, self.link, self.timeout, self.name = store, link, timeout, name
        self.guard = sealer
        self._seq = 0
        self._lock = threading.Lock()
        self._pool_: _CommThread | None = None
        self._failed = False  # a collective failed: its thread may never come back
        self._closed = False
        _GROUPS.add(self)
        self._stream = None  # the communication stream, for CUDA buffers

    @property
    def _pool(self) -> _CommThread:
        if self._pool_ is None:
            self._pool_ = _CommThread(f"lowcomm-{self.name}")
        return self._pool_

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self, limit: float | None = None, finished: bool = True) -> None:
        """Finish queued collectives (unless one failed), stop the communication thread, and mark
        this replica finished in the store: a peer waiting for it is told, within about
        :data:`FINISHED_POLL_S`, that it finished, not that it died. ``limit``: wait at most that
        many seconds for the queued collectives, and not for one that a peer which closed its
        group will never enter (None: until they are done). ``finished`` False (the run failed or
        was stopped before its end): not marked, so a peer is told that it never came, not that
        the replicas ran different numbers of steps. A group still open when the interpreter
        exits is closed then, with a limit of :data:`EXIT_DRAIN_S`."""
        if self._closed:
            return
        self._closed = True
        if self._pool_ is not None:
            self._pool_.shutdown(wait=not self._failed and limit is None)
            end = time.monotonic() + (limit or 0.0)
            while limit is not None and not self._failed:
                if self._pool_.join(min(FINISHED_POLL_S, max(end - time.monotonic(), 0.0))):
                    break
                if time.monotonic() >= end or self._closed_before(self._seq - 1):
                    log.warning(
                        "group %s: exiting with collectives %d.. not finished (call DiLoCo.finish() "
                        "before the end)",
                        self.name,
                        self._seq - 1,
                    )
                    break
        if self.store is not None and finished:
            try:
                self.store.set(f"lowcomm/{self.name}/finished/{self._rank}", str(self._seq))
                self.store.add(f"lowcomm/{self.name}/finished", 1)  # one key for the waiters to watch
            except Exception as e:  # the store's host may be gone at the end of a job
                log.info("could not mark replica %d finished: %s", self._rank, e)

    # ---- start-up checks ------------------------------------------------------------------------

    def all_gather_json(self, obj) -> list:
        """Every replica's ``obj`` (JSON-serializable), in rank order; sent as UTF-8 JSON, never pickled.

        Runs on the caller's thread: call it only while no round is in flight (start-up, the end).
        """
        return [json.loads(raw) for raw in self._gather_bytes(json.dumps(obj, sort_keys=True).encode())]

    def verify_same(self, what: str, info: dict) -> None:
        """Check that every replica passes the same ``info``; raise ValueError naming every replica
        that differs from replica 0 and the first one's differences."""
        infos = self.all_gather_json(info)
        ref = infos[0]
        differ = [r for r, other in enumerate(infos) if other != ref]
        if differ:
            other = infos[differ[0]]
            diff = {
                k: {"replica 0": ref.get(k), f"replica {differ[0]}": other.get(k)}
                for k in sorted(set(ref) | set(other))
                if ref.get(k) != other.get(k)
            }
            raise ValueError(f"replica(s) {differ} differ from replica 0 in the {what}: {diff}")

    def global_ranks(self) -> list[int]:
        if self._raw:  # not registered with torch.distributed: no global ranks to compare
            return []
        try:
            return list(dist.get_process_group_ranks(self.pg))
        except (RuntimeError, ValueError, KeyError):
            return []

    def broadcast_(self, tensor: torch.Tensor) -> None:
        """Overwrite ``tensor`` with replica 0's (synchronous; start-up only)."""
        t = tensor if self.backend != "nccl" or tensor.is_cuda else tensor.to(self._device())
        if self._raw:
            opts = dist.BroadcastOptions()
            opts.rootRank = 0
            self.pg.broadcast([t], opts).wait()
        else:
            dist.broadcast(t, src=dist.get_global_rank(self.pg, 0), group=self.pg)
        if t is not tensor:
            tensor.copy_(t)

    def _gather_bytes(self, data: bytes) -> list[bytes]:
        dev = self._device()
        n = torch.tensor([len(data)], dtype=torch.int64, device=dev)
        sizes = [torch.zeros_like(n) for _ in range(self._size)]
        self._all_gather(sizes, n)
        width = int(max(int(s) for s in sizes))
        buf = torch.zeros(width, dtype=torch.uint8, device=dev)
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev) if data else buf[:0]
        out = [torch.empty_like(buf) for _ in range(self._size)]
        self._all_gather(out, buf)
        return [bytes(o[: int(s)].cpu().tolist()) for o, s in zip(out, sizes)]

    def _all_gather(self, out: list[torch.Tensor], inp: torch.Tensor) -> None:
        if self._raw:
            self.pg.allgather([out], [inp]).wait()
        else:
            dist.all_gather(out, inp, group=self.pg)

    def _device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # ---- the collective ---------------------------------------------------------------------------

    def _all_reduce_mean(self, buffer: torch.Tensor, codec: Codec, method: str, tag: int | None) -> Work:
        with self._lock:
            seq = self._seq
            self._seq += 1
        stats = ReduceStats()
        ready = None
        if buffer.is_cuda:  # the communication stream starts once the buffer is computed
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(buffer.device))
        future = self._pool.submit(self._run, buffer, codec, method, seq, stats, ready, tag)
        return _DistWork(future, self, seq, stats, buffer.device if buffer.is_cuda else None)

    def _a2a(self, inp: torch.Tensor, in_splits: list[int], out_splits: list[int]) -> torch.Tensor:
        out = torch.empty(sum(out_splits), dtype=torch.uint8, device=inp.device)
        if self._raw:
            self.pg.alltoall_base(out, inp, out_splits, in_splits, dist.AllToAllOptions()).wait()
        else:
            dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.pg)
        return out

    def _emulate(self, t0: float, nbytes: int) -> None:
        if self.link is not None:
            remaining = self.link.delay(nbytes) - (time.perf_counter() - t0)
            if remaining > 0:
                time.sleep(remaining)

    def _run(self, buffer, codec: Codec, method: str, seq: int, stats: ReduceStats, ready=None, tag=None):
        """On the communication thread: the reduce, on a CUDA stream of its own for CUDA buffers
        (ordered after ``ready``, the caller's stream at submission); returns ``(mean, sent, done)``
        with ``done`` the event the caller's stream waits on (None on CPU)."""
        try:
            if ready is None:
                return (*self.reduce(buffer, codec, method, seq, stats, tag=tag), None)
            if self._stream is None:  # high priority: the GPU schedules its few small kernels (the
                # codec's) ahead of the training kernels waiting beside them as SMs free up
                self._stream = torch.cuda.Stream(buffer.device, priority=COMM_STREAM_PRIORITY)
            # this thread's current GPU is 0 until set: the buffer's, for whatever the reduce makes
            with torch.cuda.device(buffer.device), torch.cuda.stream(self._stream):
                self._stream.wait_event(ready)
                buffer.record_stream(self._stream)
                result, sent = self.reduce(buffer, codec, method, seq, stats, tag=tag)
                done = torch.cuda.Event()
                done.record(self._stream)
            return result, sent, done
        except Exception as e:  # name the replicas that never entered this collective, if we can tell
            raise CollectiveError(self._describe_failure(seq, e)) from e

    def missing(self, seq: int) -> list[int]:
        """Ranks that never entered collective ``seq`` (needs a store; [] without one); every
        rank not yet looked at when the store stops answering."""
        return self._look_missing(seq)[0]

    def _look_missing(self, seq: int) -> tuple[list[int], str | None]:
        """:meth:`missing`, and why the store did not answer (None: it did). It is asked no more
        once it failed: each call to a store that is gone logs torch's C++ stack trace."""
        if self.store is None:
            return [], None
        out = []
        for r in range(self._size):
            try:  # (check, not a wait with a timeout: c10d logs every such timeout as a warning)
                if not self.store.check([f"lowcomm/{self.name}/{seq}/{r}"]):
                    out.append(r)
            except Exception as e:
                return out + list(range(r, self._size)), one_line(e, 120)
        return out, None

    def _describe_failure(self, seq: int, e: BaseException | str) -> str:
        msg = f"outer collective #{seq} of group {self.name!r} failed on replica {self._rank}: {e}"
        missing, store_failed = self._look_missing(seq)
        if store_failed:  # (no word of who entered it: the store went with its host)
            return f"{msg}; the job's store did not answer either ({store_failed}): its host is gone"
        finished = {r: self._finished_after(r) for r in missing}
        done = {r: n for r, n in finished.items() if n is not None}
        gone = [r for r in missing if r not in done]
        if done:
            msg += (
                "; "
                + ", ".join(f"replica {r} finished after {n} collective(s)" for r, n in sorted(done.items()))
                + ": the replicas ran different numbers of steps"
            )
        if gone:
            msg += f"; replica(s) {gone} never entered it (dead, hung or partitioned)"
        return msg

    def _closed_before(self, seq: int) -> bool:
        """Whether a replica closed its group having run no more than ``seq`` collectives (so it
        never enters collective ``seq``): one look at a counter, the replicas' own keys only when
        some replica has closed."""
        try:
            if self.store is None or int(self.store.add(f"lowcomm/{self.name}/finished", 0)) == 0:
                return False
        except Exception:  # the store may be gone at the end of a job
            return False
        return any(
            (n := self._finished_after(r)) is not None and n <= seq
            for r in range(self._size)
            if r != self._rank
        )

    def _finished_after(self, rank: int) -> int | None:
        """How many collectives replica ``rank`` ran before it closed the group (None: not closed)."""
        key = f"lowcomm/{self.name}/finished/{rank}"
        try:
            if self.store.check([key]):
                return int(self.store.get(key))
        except Exception:  # the store may be gone at the end of a job
            return None
        return None

    def reduce(
        self,
        buffer: torch.Tensor,
        codec: Codec,
        method: str,
        seq: int,
        stats: ReduceStats,
        tap: ReduceTap | None = None,
        tag: int | None = None,
    ):
        """One mean all-reduce, run synchronously on the caller's thread; returns ``(mean, sent)``
        where ``sent`` gives the decoded own contribution (for error feedback).

        ``all_gather`` sends every payload to everyone. ``two_phase`` sends shard ``j`` to replica
        ``j`` and the re-encoded mean shards back to everyone. With ``guard`` (the elastic
        runtime), ``two_phase`` is guarded: a phase 0 all-gathers every contribution's norm and
        excludes, by the same rule everywhere (:func:`~lowcomm.comm.reduce.screen_norms`),
        non-finite and wildly outlying ones (the excluded replica sends zeros); every payload is
        sealed with the job key (:class:`~lowcomm.comm.reduce.Sealer`: damaged or forged payloads
        fail alike); a shard owner that receives a bad one names its sender, the
        owners' findings are all-gathered and every owner leaves those senders out, so the mean
        is over the same contributions in every shard; a damaged mean shard fails the round.
        ``stats.excluded`` maps the excluded ranks to the reason. ``tap`` sees the outgoing
        payload and the point between the two exchanges (fault injection uses both). ``tag`` (the
        sender's step) is compared first; replicas out of step fail the collective, naming the
        steps (not in the guarded reduce: an elastic job's rounds are numbered by its coordinator).
        """
        tap = tap or NO_TAP
        M, me, n = self._size, self._rank, buffer.numel()
        if self.store is not None:
            self.store.set(f"lowcomm/{self.name}/{seq}/{me}", "1")
        if M == 1:
            return alone(buffer, stats, guarded=self.guard is not None)
        if tag is not None and not self.guard:
            mine = torch.tensor([tag], dtype=torch.int64, device=self._device())
            tags = [torch.zeros_like(mine) for _ in range(M)]
            self._all_gather(tags, mine)
            if len({int(t) for t in tags}) > 1:
                raise CollectiveError(out_of_step(seq, [int(t) for t in tags]))
        if method == "all_gather":
            if self.guard:
                raise ValueError("the guarded reduce is two_phase; all_gather is not guarded")
            return self._all_gather_mean(buffer, codec, stats)
        t0 = time.perf_counter()
        excluded: dict[int, str] = {}
        norm_bytes = 8 * (M - 1) if self.guard else 0  # the guards' own exchanges
        mask_bytes = M * (M - 1) if self.guard else 0
        if self.guard:
            norm = torch.tensor([float(buffer.norm())], dtype=torch.float64)
            norms = [torch.zeros_like(norm) for _ in range(M)]
            self._all_gather(norms, norm)
            excluded = screen_norms([float(x) for x in norms])
        contrib = torch.zeros_like(buffer) if me in excluded else buffer
        frame, tail = (self.guard.seal, Sealer.TAG) if self.guard else (_bare, 0)
        bounds = shard_bounds(n, M, codec.block)
        sizes = [codec.encoded_nbytes(b - a) + tail for a, b in bounds]
        shards = encode_shards(contrib, codec, bounds)
        outgoing = torch.cat([frame(s) for s in shards])
        tap.outgoing(outgoing)
        stats.encode_s = time.perf_counter() - t0
        # phase 1: shard j to replica j
        t1 = time.perf_counter()
        received = self._a2a(outgoing, sizes, [sizes[me]] * M)
        sent1 = sum(sizes) - sizes[me]
        self._emulate(t1, sent1 + norm_bytes)
        comm = time.perf_counter() - t1
        tap.between_phases()
        t2 = time.perf_counter()
        # M contributions to this replica's shard (an empty shard, when there are fewer blocks than
        # replicas, has M empty ones)
        parts = list(received.split(sizes[me])) if sizes[me] else [received[:0]] * M
        if self.guard:
            parts = [self.guard.unseal(p) for p in parts]
            mask = torch.tensor([p is None for p in parts], dtype=torch.uint8)
            masks = [torch.zeros_like(mask) for _ in range(M)]
            self._all_gather(masks, mask)
            for owner, m in enumerate(masks):
                for r in m.nonzero().flatten().tolist():
                    excluded.setdefault(r, f"corrupt payload (seal mismatch at replica {owner})")
        keep = [r for r in range(M) if r not in excluded]
        a, b = bounds[me]
        if keep:
            mean_payload, _ = reduce_shard([parts[r] for r in keep], codec, b - a)
        else:
            mean_payload = codec.encode(torch.zeros(b - a, dtype=torch.float32, device=buffer.device))
        dec = time.perf_counter() - t2
        # phase 2: the encoded mean shard to everyone
        t3 = time.perf_counter()
        gathered = self._a2a(frame(mean_payload).repeat(M), [sizes[me]] * M, sizes)
        sent2 = (M - 1) * sizes[me]
        self._emulate(t3, sent2 + mask_bytes)
        comm += time.perf_counter() - t3
        t4 = time.perf_counter()
        pieces = []
        for j, (p, (lo, hi)) in enumerate(zip(gathered.split(sizes), bounds)):
            body = self.guard.unseal(p) if self.guard else p
            if body is None:
                raise CollectiveError(f"round {seq}: the mean shard from replica {j} arrived damaged")
            pieces.append(codec.decode(body, hi - lo))
        result = torch.cat(pieces)

        def sent():  # only error feedback needs it
            if me in excluded:
                return torch.zeros_like(buffer)
            return torch.cat([codec.decode(s, hi - lo) for s, (lo, hi) in zip(shards, bounds)])

        stats.decode_s = dec + time.perf_counter() - t4
        stats.comm_s = comm
        stats.bytes_sent = sent1 + sent2 + norm_bytes + mask_bytes
        stats.excluded = excluded
        return result, sent

    def _all_gather_mean(self, buffer: torch.Tensor, codec: Codec, stats: ReduceStats):
        M, me, n = self._size, self._rank, buffer.numel()
        t0 = time.perf_counter()
        payload = codec.encode(buffer)
        stats.encode_s = time.perf_counter() - t0
        size = payload.numel()
        t1 = time.perf_counter()
        out = self._a2a(payload.repeat(M), [size] * M, [size] * M)
        stats.bytes_sent = (M - 1) * size
        self._emulate(t1, stats.bytes_sent)
        stats.comm_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        acc, decoded = decode_mean(list(out.split(size)), codec, n)
        stats.decode_s = time.perf_counter() - t2
        return acc, decoded[me]


def alone(buffer: torch.Tensor, stats: ReduceStats, guarded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean of a round with one replica: its own contribution; but a guarded round screens it
    like any other, so a lone non-finite pseudo-gradient is excluded (the mean is zero) instead of
    becoming the job's state."""
    if guarded:
        excluded = screen_norms([float(buffer.norm())])
        if excluded:
            stats.excluded = excluded
            zero = torch.zeros_like(buffer)
            return zero, zero
    return buffer.clone(), buffer


def _bare(payload: torch.Tensor) -> torch.Tensor:
    return payload
