"""Replica groups: the interface the algorithm talks to, and LocalGroup (M replicas, one process).

A ReplicaGroup offers one collective, an asynchronous mean all-reduce of a flat fp32 buffer under
a codec. It returns a :class:`Work` handle at once; ``wait()`` gives the mean (bitwise identical on
every replica), and the handle carries what was put on the wire and how long each part took.

LocalGroup simulates ``M`` replicas inside one process with exactly the arithmetic of
:mod:`lowcomm.comm.reduce`. Its replicas share nothing but the pending collectives: every
replica calls ``all_reduce_mean`` on its own handle, and the reduction runs when the last one has
contributed. In a single thread, call the collective on every replica before waiting on any of
them (``lowcomm.optim.step_replicas`` does this for a list of DiLoCo wrappers); waiting on a
collective some replica has not joined raises instead of deadlocking.
"""

from __future__ import annotations

import functools
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .._checks import is_int
from .codecs import Codec
from .reduce import bucket_bounds, check_args, decode_mean, encode_shards, reduce_shard, shard_bounds

__all__ = ["ReduceStats", "Work", "ReplicaGroup", "LocalGroup", "CollectiveError", "out_of_step"]


class CollectiveError(RuntimeError):
    """A collective could not complete (missing or mismatched participants, a dead peer)."""


def out_of_step(seq: int, tags: list) -> str:
    """The error of a collective whose replicas sent rounds of different steps."""
    by_tag: dict = {}
    for r, t in enumerate(tags):
        by_tag.setdefault(t, []).append(r)
    parts = ", ".join(
        f"replica(s) {rs} at step {t}" for t, rs in sorted(by_tag.items(), key=lambda kv: str(kv[0]))
    )
    return (
        f"collective #{seq}: the replicas are out of step ({parts}): every replica must take the same "
        "number of inner steps between rounds"
    )


@dataclass
class ReduceStats:
    """What one replica spent on one mean all-reduce."""

    bytes_sent: int = 0
    encode_s: float = 0.0
    comm_s: float = 0.0
    decode_s: float = 0.0
    wait_s: float = 0.0
    #: contributions left out of the mean by the guards: rank -> reason (guarded reduce only)
    excluded: dict = field(default_factory=dict)
    #: CUDA buffers: two timing events on the caller's stream, recorded as ``wait()`` began and
    #: after the stream was made to wait for the result; the time the GPU spent between them is
    #: how long the stream stood still for the round (:func:`device_wait_s`); None elsewhere
    device_events: tuple | None = None


def device_wait_s(stats: ReduceStats) -> float | None:
    """Seconds the caller's CUDA stream stood still waiting for a mean (the GPU's time between
    :attr:`ReduceStats.device_events`), or None for a reduce without them (CPU buffers). The
    host's ``wait_s`` counts its own wait, which costs nothing while the GPU still has queued
    work; this is what the GPU lost. Both events must have run: call it after a host sync (the
    trainer reads it where it reads the losses)."""
    if stats.device_events is None:
        return None
    start, end = stats.device_events
    return start.elapsed_time(end) / 1e3


class Work:
    """Handle of an asynchronous mean all-reduce.

    Attributes:
        stats: bytes and timings, final once the work completed.
        sent: after completion, the decoded form of this replica's own contribution (what the
            others received from it); used for error feedback. None before.
    """

    def __init__(self, stats: ReduceStats | None = None) -> None:
        self.stats = stats if stats is not None else ReduceStats()
        self._sent: torch.Tensor | Callable[[], torch.Tensor] | None = None
        self._result: torch.Tensor | None = None
        self._error: BaseException | None = None

    @property
    def sent(self) -> torch.Tensor | None:
        """Decoded own contribution (computed on first access where it costs extra decoding)."""
        if callable(self._sent):
            self._sent = self._sent()
        return self._sent

    def _complete(self, result: torch.Tensor, sent: torch.Tensor | Callable[[], torch.Tensor]) -> None:
        self._result, self._sent = result, sent

    def _fail(self, error: BaseException) -> None:
        self._error = error

    def _pending_error(self) -> CollectiveError:
        return CollectiveError("collective has not completed")

    def wait(self) -> torch.Tensor:
        """Block until the mean is available and return it (fp32, read-only by convention)."""
        t0 = time.perf_counter()
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise self._pending_error()
        self.stats.wait_s += time.perf_counter() - t0
        return self._result


class _BucketedWork(Work):
    """One handle over the per-bucket collectives of a buffer larger than a bucket."""

    def __init__(self, works: list[Work]):
        super().__init__()
        self._works = works

    def wait(self) -> torch.Tensor:
        if self._result is None:
            parts = [w.wait() for w in self._works]
            self._complete(torch.cat(parts), lambda: torch.cat([w.sent for w in self._works]))
            for field in ("bytes_sent", "encode_s", "comm_s", "decode_s", "wait_s"):
                setattr(self.stats, field, sum(getattr(w.stats, field) for w in self._works))
            events = [w.stats.device_events for w in self._works]
            if None not in events:  # waited one after the other: from the first's start to the last's end
                self.stats.device_events = (events[0][0], events[-1][1])
        return self._result


class ReplicaGroup(ABC):
    """The replicas of one membership epoch, as seen by one replica.

    Buffers longer than ``bucket_elems`` are reduced in consecutive buckets of at most that many
    elements (a multiple of the codec's block), which bounds the memory of the encode and
    communication buffers. Bucket edges fall on block edges, so every element is quantized in
    the same block as without buckets and is reduced exactly once, whatever tensor it belongs to.
    """

    #: default bucket size: 2**24 elements (64 MiB of fp32)
    bucket_elems: int = 1 << 24

    @property
    @abstractmethod
    def rank(self) -> int: ...

    @property
    @abstractmethod
    def size(self) -> int: ...

    @abstractmethod
    def verify_same(self, what: str, info: dict) -> None:
        """Check at start-up that every replica runs with the same ``info`` (a JSON-able dict);
        raise ValueError naming the replicas that differ. :class:`~lowcomm.optim.DiLoCo` calls it
        with its configuration and a digest of its initial parameters when it is built (an elastic
        group hands them to the coordinator, which refuses workers that differ)."""

    def broadcast_(self, tensor: torch.Tensor) -> None:
        """Overwrite ``tensor`` with replica 0's, in place (at start-up; every replica calls it).

        Raises:
            NotImplementedError: a group that cannot (an elastic one: its joiners get the job's
                state from a member instead).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot broadcast")

    def global_ranks(self) -> list[int]:
        """The torch.distributed global ranks of this group's processes, in its rank order; []
        when the group is not made of torch.distributed ranks."""
        return []

    def shared_ranks(self, process_group) -> list[int]:
        """The global ranks of this group's processes that are also in torch.distributed's
        ``process_group`` (DDP wrapping a model across replicas shares two or more); [] when the
        group is not made of torch.distributed ranks."""
        mine = self.global_ranks()
        if not mine:
            return []
        try:
            return sorted(set(dist.get_process_group_ranks(process_group)) & set(mine))
        except (RuntimeError, ValueError, KeyError):
            return []

    def all_reduce_mean(
        self, buffer: torch.Tensor, codec: Codec, method: str = "two_phase", tag: int | None = None
    ) -> Work:
        """Start a mean all-reduce of a 1-D fp32 ``buffer`` under ``codec``; returns at once.

        The buffer must not be modified until the work completes. Every replica gets the same
        bits. ``method`` is "two_phase" (re-quantize the mean) or "all_gather". ``tag`` (DiLoCo
        passes its step) must be the same on every replica: replicas out of step are refused with
        the tags named instead of averaging rounds of different steps.
        """
        check_args(buffer, method)
        bounds = bucket_bounds(buffer.numel(), self.bucket_elems, codec.block)
        if len(bounds) == 1:
            return self._all_reduce_mean(buffer, codec, method, tag)
        return _BucketedWork([self._all_reduce_mean(buffer[a:b], codec, method, tag) for a, b in bounds])

    @abstractmethod
    def _all_reduce_mean(self, buffer: torch.Tensor, codec: Codec, method: str, tag: int | None) -> Work:
        """One bucket's collective (arguments already checked)."""


class _LocalCollective:
    def __init__(self, size: int):
        self.contribs: dict[int, tuple[torch.Tensor, Codec, str, list[torch.Tensor]]] = {}
        self.tags: dict[int, int | None] = {}
        self.works: dict[int, Work] = {}
        self.size = size


class _LocalWorld:
    def __init__(self, size: int):
        self.size = size
        self.pending: dict[int, _LocalCollective] = {}
        self.broadcasts: list[torch.Tensor] = []  # replica 0's, in the order it broadcast them
        self.infos: dict[str, dict] = {}  # what -> replica 0's info (verify_same)


class _LocalWork(Work):
    def __init__(self, world: _LocalWorld, seq: int):
        super().__init__()
        self._world, self._seq = world, seq

    def _pending_error(self) -> CollectiveError:
        coll = self._world.pending.get(self._seq)
        missing = sorted(set(range(self._world.size)) - set(coll.contribs)) if coll else []
        return CollectiveError(
            f"LocalGroup collective #{self._seq} still waits for replica(s) {missing}: in one process "
            "every replica must start the collective before any waits on it "
            "(use lowcomm.optim.step_replicas for a list of DiLoCo wrappers)"
        )


class LocalGroup(ReplicaGroup):
    """One replica's handle on ``M`` replicas simulated in this process.

    Build all handles at once with :meth:`create`.
    """

    def __init__(self, world: _LocalWorld, rank: int):
        self._world, self._rank, self._seq = world, rank, 0
        self._broadcasts = 0

    @classmethod
    def create(cls, num_replicas: int) -> list[LocalGroup]:
        """Return ``num_replicas`` handles, one per replica, on a fresh shared world."""
        if not is_int(num_replicas, 1):
            raise ValueError(f"num_replicas must be an int >= 1, got {num_replicas!r}")
        world = _LocalWorld(num_replicas)
        return [cls(world, r) for r in range(num_replicas)]

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._world.size

    def broadcast_(self, tensor: torch.Tensor) -> None:
        """Replica 0's handle keeps a copy; the others copy it (build replica 0's wrapper first)."""
        k, self._broadcasts = self._broadcasts, self._broadcasts + 1
        if self._rank == 0:
            self._world.broadcasts.append(tensor.detach().clone())
            return
        if k >= len(self._world.broadcasts):
            raise CollectiveError(
                f"LocalGroup replica {self._rank} asked for replica 0's broadcast #{k} before replica 0 "
                "made it: build replica 0's DiLoCo first"
            )
        tensor.copy_(self._world.broadcasts[k])

    def verify_same(self, what: str, info: dict) -> None:
        """Compare with replica 0's ``info`` (the first one given under ``what``)."""
        ref = self._world.infos.setdefault(what, info)
        if info != ref:
            diff = {
                k: {"replica 0": ref.get(k), f"replica {self._rank}": info.get(k)}
                for k in sorted(set(ref) | set(info))
                if ref.get(k) != info.get(k)
            }
            raise ValueError(f"replica(s) [{self._rank}] differ from replica 0 in the {what}: {diff}")

    def _all_reduce_mean(self, buffer: torch.Tensor, codec: Codec, method: str, tag: int | None) -> Work:
        world, seq = self._world, self._seq
        self._seq += 1
        work = _LocalWork(world, seq)
        coll = world.pending.setdefault(seq, _LocalCollective(world.size))
        t0 = time.perf_counter()
        if world.size == 1:
            payloads: list[torch.Tensor] = []
        elif method == "two_phase":
            payloads = encode_shards(buffer, codec, shard_bounds(buffer.numel(), world.size, codec.block))
        else:
            payloads = [codec.encode(buffer)]
        work.stats.encode_s = time.perf_counter() - t0
        coll.contribs[self._rank] = (buffer, codec, method, payloads)
        coll.tags[self._rank] = tag
        coll.works[self._rank] = work
        if len(coll.contribs) == world.size:
            del world.pending[seq]
            self._run(coll, seq)
        return work

    @staticmethod
    def _run(coll: _LocalCollective, seq: int) -> None:
        size = coll.size
        tags = [coll.tags[r] for r in range(size)]
        if len(set(tags)) > 1:
            err = CollectiveError(out_of_step(seq, tags))
            for w in coll.works.values():
                w._fail(err)
            return
        buf0, codec0, method0, _ = coll.contribs[0]
        for r, (buf, codec, method, _) in sorted(coll.contribs.items()):
            if (buf.numel(), codec.name, codec.block, method) != (
                buf0.numel(),
                codec0.name,
                codec0.block,
                method0,
            ):
                err = CollectiveError(
                    f"collective #{seq}: replica {r} sent {buf.numel()} elements with codec {codec.name} "
                    f"(block {codec.block}, {method}) but replica 0 sent {buf0.numel()} with {codec0.name} "
                    f"(block {codec0.block}, {method0})"
                )
                for w in coll.works.values():
                    w._fail(err)
                return
        n, codec = buf0.numel(), codec0
        if size == 1:
            coll.works[0]._complete(buf0.clone(), buf0)
            return
        if method0 == "all_gather":
            t0 = time.perf_counter()
            acc, decoded = decode_mean([coll.contribs[r][3][0] for r in range(size)], codec, n)
            dt = time.perf_counter() - t0
            nbytes = coll.contribs[0][3][0].numel()
            for r in range(size):
                w = coll.works[r]
                w.stats.bytes_sent = (size - 1) * nbytes
                w.stats.decode_s = dt
                w._complete(acc, decoded[r])
            return
        bounds = shard_bounds(n, size, codec.block)
        mean_payloads, sent_parts = [], [[None] * size for _ in range(size)]
        reduce_s = [0.0] * size
        for j, (a, b) in enumerate(bounds):
            t0 = time.perf_counter()
            mp, decoded = reduce_shard([coll.contribs[r][3][j] for r in range(size)], codec, b - a)
            reduce_s[j] = time.perf_counter() - t0
            mean_payloads.append(mp)
            for r in range(size):
                sent_parts[r][j] = decoded[r]
        t0 = time.perf_counter()
        result = torch.cat([codec.decode(mp, b - a) for mp, (a, b) in zip(mean_payloads, bounds)])
        gather_s = time.perf_counter() - t0
        for r in range(size):
            own = coll.contribs[r][3]
            w = coll.works[r]
            w.stats.bytes_sent = (
                sum(p.numel() for j, p in enumerate(own) if j != r) + (size - 1) * mean_payloads[r].numel()
            )
            w.stats.decode_s = reduce_s[r] + gather_s
            # joined only if asked (error feedback): M full-length copies a round otherwise
            w._complete(result, functools.partial(torch.cat, sent_parts[r]))
