"""How the replicas of a run synchronize: the trainer loop's one varying part.

The loop (:mod:`lowcomm.runtime.trainer.loop`) runs the same steps for every job; a ``Sync``
decides what happens around each inner update:

    DataParallel   the gradients' fp32 mean over the group before every update (the baseline)
    DiLoCoSync     a DiLoCo wrapper per replica, stepped after every update (one process or
                   torchrun: LocalGroup or DistributedGroup)
    ElasticDiLoCo  one DiLoCo wrapper over an elastic job's group, which may send this worker to
                   fetch the job's state again (:mod:`lowcomm.runtime.trainer.worker`)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ...comm import LocalGroup, ReplicaGroup, Work, get_codec, wire_bytes
from ...optim import DiLoCo, finish_replicas, step_replicas
from .build import Replicas
from .config import TrainConfig

__all__ = ["Sync", "DataParallel", "DiLoCoSync", "digest"]

#: timings a run's summary reports, in seconds summed over the run
TIMING_KEYS = (
    "inner_s",
    "send_s",
    "encode_s",
    "decode_s",
    "outer_s",
    "comm_s",
    "wait_s",
    "comm_wall_s",
    "loop_s",
    "steps_wait_s",
    "finish_s",
    "device_wait_s",
    "steps_device_wait_s",
)
_ROUND_TIMINGS = ("send_s", "encode_s", "decode_s", "outer_s", "comm_s", "wait_s")


def digest(vector: torch.Tensor) -> str:
    """SHA-256 of an fp32 vector's bytes (replicas compare their global parameters by it)."""
    return hashlib.sha256(vector.detach().cpu().numpy().tobytes()).hexdigest()


class Sync:
    """The default of every hook: nothing happens. Subclasses override what they need.

    Attributes:
        bytes_sent: bytes each local replica put on the wire so far.
        rounds: synchronizations completed (rounds of replica 0; DP: none).
        steps_before: steps this process trained in earlier attempts that :meth:`restore` took
            from a checkpoint of its own (an elastic worker's; a static job's checkpoint holds
            its step, which the loop counts)
        timing: seconds by :data:`TIMING_KEYS` (the loop fills ``inner_s``, ``comm_wall_s``, ``loop_s``,
            ``finish_s``: the end's sync, after the last step, and ``steps_wait_s``: the part of
            ``wait_s`` spent before it, waiting between steps; ``device_wait_s`` and
            ``steps_device_wait_s`` the same for the GPU's training stream, rounds of CUDA
            buffers over a process group only).
    """

    mode = "none"

    def __init__(self, replicas: Replicas) -> None:
        self.replicas = replicas
        self.bytes_sent = [0] * len(replicas)
        self.rounds = 0
        self.steps_before = 0
        self.timing = dict.fromkeys(TIMING_KEYS, 0.0)
        self.device_waits = False  # whether a round's GPU wait was timed (CUDA over a process group)
        self.record = _no_record

    def restore(self) -> None:
        """Take a saved state (before any record is written; raises ValueError on one that does
        not fit this run)."""

    def state_dict(self) -> dict:
        """What a static job's checkpoint holds of this sync (nothing: DP keeps no state between
        steps)."""
        return {}

    def load_state_dict(self, state: dict, own: bool = True) -> None:
        """Continue from :meth:`state_dict` (``own`` False: another replica's, as
        :meth:`lowcomm.DiLoCo.load_state_dict` takes it)."""

    def start(self) -> int:
        """Join the job; returns the step to start from (0 for a fresh run)."""
        return 0

    def before_update(self) -> None:
        """After every replica's backward, before the inner updates."""

    def after_update(self, step: int) -> bool:
        """After the inner updates of step ``step``; False when the step did not count (an elastic
        worker was sent to fetch the job's state: the loop goes on from :attr:`position`)."""
        return True

    def after_step(self, step: int) -> None:
        """After step ``step`` was recorded and evaluated."""

    def finish(self) -> bool:
        """After the last step; False when it must be run again (see :meth:`after_update`)."""
        return True

    @property
    def position(self) -> int:
        """The step this process's replicas hold, read after :meth:`after_update` or
        :meth:`finish` returned False (an elastic worker took the job's state)."""
        raise NotImplementedError(f"{type(self).__name__} never resynchronizes")

    @contextlib.contextmanager
    def global_parameters(self) -> Iterator[nn.Module]:
        """Replica 0's model holding the parameters to evaluate."""
        yield self.replicas.models[0]

    def digests(self) -> list[str]:
        """A digest of each local replica's global parameters ([] when there are none)."""
        return []

    def summary(self) -> dict[str, Any]:
        """What this way of syncing adds to the run's summary."""
        return {}

    def close(self, finished: bool) -> None:
        """The run ended (``finished``: it reached its last step)."""


def _no_record(kind: str, **fields: Any) -> None:
    pass


class DataParallel(Sync):
    """The data-parallel baseline: every step, each replica's gradients are replaced by their
    fp32 mean over the group (the same reduce and byte counting as DiLoCo's rounds).

    The gradients go in buckets (in reverse parameter order, as DDP does): with ``overlap`` each
    bucket's mean all-reduce starts from a gradient hook as soon as its last gradient is
    accumulated, so on a DistributedGroup it runs during the rest of the backward; the means are
    collected before the inner update. The fp32 mean of an element does not depend on which bucket
    carries it, so the buckets change no bit.

    Batched replicas (their whole group in this process: one GPU simulating M replicas) share one
    set of parameters under DP, and their backward already gives the gradient of their mean loss,
    the mean of their gradients (:class:`~.build.BatchedReplicas`): nothing is reduced, and each
    replica counts the bytes the collective would have sent (its formula). Through the in-process
    collective, per replica and bucket, that mean took 333 operations a step for a two-layer GPT
    at M = 4 (benchmarks/host_overhead.py).

    Args:
        replicas: the replicas this process trains.
        groups: one group handle per local replica.
        overlap: start buckets from gradient hooks (off with an inner DDP group, which reduces
            inside the replica during the same backward).
        bucket_bytes: gradient bytes per bucket (25 MiB, DDP's default).
    """

    mode = "dp"

    def __init__(
        self,
        replicas: Replicas,
        groups: list[ReplicaGroup],
        *,
        overlap: bool = True,
        bucket_bytes: int = 25 << 20,
    ) -> None:
        super().__init__(replicas)
        self.groups = groups
        self.codec = get_codec("fp32")
        sizes = [p.numel() for p in replicas.models[0].parameters()]
        self.buckets = _buckets(sizes, bucket_bytes // 4)
        self._bucket_of = {j: b for b, bucket in enumerate(self.buckets) for j in bucket}
        self._works: list[dict[int, Work]] = [{} for _ in replicas.models]
        self._ready: list[list[int]] = [[0] * len(self.buckets) for _ in replicas.models]
        M = len(groups)
        self._in_process = (
            replicas.batched and M > 1 and all(isinstance(g, LocalGroup) and g.size == M for g in groups)
        )
        if replicas.batched and not self._in_process:
            raise RuntimeError("batched replicas take DP only through an in-process group of all of them")
        if self._in_process:  # what each replica would hand to the collective per step
            per_bucket = [
                wire_bytes(self.codec, sum(sizes[j] for j in b), M, bucket_elems=groups[0].bucket_elems)
                for b in self.buckets
            ]
            self._step_bytes = [sum(p[i] for p in per_bucket) for i in range(M)]
        self._hooks = self._register_hooks() if overlap and not self._in_process else []

    def _register_hooks(self) -> list:
        """A post-accumulate hook on every gradient leaf of each local replica. Batched replicas
        never get here: they exist only with an in-process group of all of them (make_replicas)."""
        return [
            p.register_post_accumulate_grad_hook(functools.partial(self._on_grad, i, j))
            for i, m in enumerate(self.replicas.models)
            for j, p in enumerate(m.parameters())
        ]

    def _on_grad(self, i: int, j: int, _param) -> None:
        b = self._bucket_of[j]
        self._ready[i][b] += 1
        if self._ready[i][b] == len(self.buckets[b]):
            self._launch(i, b)

    def _launch(self, i: int, b: int) -> None:
        grads = self.replicas.grads(i)
        params = list(self.replicas.models[i].parameters())
        flat = torch.cat(
            [
                (grads[j] if grads[j] is not None else torch.zeros_like(params[j])).reshape(-1).float()
                for j in self.buckets[b]
            ]
        )
        self._works[i][b] = self.groups[i].all_reduce_mean(flat, self.codec)

    def before_update(self) -> None:
        if self._in_process:  # the backward gave the mean (shared parameters)
            self.replicas.fill_missing_gradients()
            for i in range(len(self.replicas)):
                self.bytes_sent[i] += self._step_bytes[i]
            return
        for i in range(len(self.replicas)):
            for b in range(len(self.buckets)):
                if b not in self._works[i]:  # no hook (overlap off), or a parameter got no gradient
                    self._launch(i, b)
        for i in range(len(self.replicas)):
            means, works = [], self._works[i]
            for b in sorted(works):
                means.append(works[b].wait())
                self.bytes_sent[i] += works[b].stats.bytes_sent
            order = [j for b in sorted(works) for j in self.buckets[b]]
            self.replicas.set_grads(i, _reorder(torch.cat(means), order, self._sizes()))
            if i == 0:
                for key in ("encode_s", "decode_s", "comm_s"):
                    self.timing[key] += sum(getattr(w.stats, key) for w in works.values())
        self._works = [{} for _ in self.replicas.models]
        self._ready = [[0] * len(self.buckets) for _ in self.replicas.models]

    def _sizes(self) -> list[int]:
        return [p.numel() for p in self.replicas.models[0].parameters()]


def _buckets(sizes: list[int], elems: int) -> list[list[int]]:
    """Parameter indices in buckets of about ``elems`` elements, last parameters first."""
    out: list[list[int]] = [[]]
    count = 0
    for j in reversed(range(len(sizes))):
        if out[-1] and count + sizes[j] > elems:
            out.append([])
            count = 0
        out[-1].append(j)
        count += sizes[j]
    return out


def _reorder(flat: torch.Tensor, order: list[int], sizes: list[int]) -> torch.Tensor:
    """``flat`` holds the parameters' pieces in ``order``; return them in parameter order."""
    pieces = dict(zip(order, flat.split([sizes[j] for j in order])))
    return torch.cat([pieces[j] for j in range(len(sizes))])


class DiLoCoSync(Sync):
    """A DiLoCo wrapper per local replica over its group, stepped after every inner update.

    Args:
        replicas: the replicas this process trains.
        groups: one group handle per local replica.
        cfg: the run's configuration (its ``[diloco]`` section configures the wrappers).
        shard_group: the processes of this replica (inner DDP): each syncs its shard.
    """

    mode = "diloco"

    def __init__(
        self, replicas: Replicas, groups: list[ReplicaGroup], cfg: TrainConfig, shard_group=None
    ) -> None:
        super().__init__(replicas)
        self.cfg = cfg
        self.dilocos = [
            DiLoCo(m, o, g, config=cfg.diloco, shard_group=shard_group)
            for m, o, g in zip(replicas.models, replicas.opts, groups)
        ]

    def after_update(self, step: int) -> bool:
        step_replicas(self.dilocos)
        return True

    def state_dict(self) -> dict:
        """Every local replica's DiLoCo state (rounds in flight included: restarted on load)."""
        return {"dilocos": [d.state_dict(compact=True) for d in self.dilocos]}

    def load_state_dict(self, state: dict, own: bool = True) -> None:
        if len(state["dilocos"]) != len(self.dilocos):
            raise ValueError(
                f"it holds {len(state['dilocos'])} DiLoCo state(s), this process has {len(self.dilocos)}"
            )
        for d, ds in zip(self.dilocos, state["dilocos"]):
            d.load_state_dict(ds, own)

    def finish(self) -> bool:
        if self.cfg.run.final_sync:
            finish_replicas(self.dilocos)
        else:
            for d in self.dilocos:
                d.apply_due(final=True)
        return True

    def drain_rounds(self, step: int, replica_ids: list[int]) -> None:
        """Count and record the rounds completed since the last call."""
        for i, d in enumerate(self.dilocos):
            for rs in d.drain_round_stats():
                self.bytes_sent[i] += rs.bytes_sent
                if i == 0:
                    self.rounds += 1
                    for key in _ROUND_TIMINGS:
                        self.timing[key] += getattr(rs, key)
                    if rs.device_wait_s is not None:
                        self.timing["device_wait_s"] += rs.device_wait_s
                        self.device_waits = True
                self.record("round", **self._round_fields(replica_ids[i], step), **rs.to_dict())

    def _round_fields(self, replica: int, step: int) -> dict[str, Any]:
        return {"replica": replica, "step": step}

    @contextlib.contextmanager
    def global_parameters(self) -> Iterator[nn.Module]:
        with self.dilocos[0].global_parameters() as m:
            yield m

    def digests(self) -> list[str]:
        return [digest(d.global_vector()) for d in self.dilocos]
