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
import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ...comm import ReplicaGroup, get_codec
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
        timing: seconds by :data:`TIMING_KEYS` (the loop fills ``inner_s``, ``comm_wall_s``, ``loop_s``).
    """

    mode = "none"

    def __init__(self, replicas: Replicas) -> None:
        self.replicas = replicas
        self.bytes_sent = [0] * len(replicas)
        self.rounds = 0
        self.timing = dict.fromkeys(TIMING_KEYS, 0.0)
        self.record = _no_record

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
    fp32 mean over the group (the same reduce and byte counting as DiLoCo's rounds)."""

    mode = "dp"

    def __init__(self, replicas: Replicas, groups: list[ReplicaGroup]) -> None:
        super().__init__(replicas)
        self.groups = groups
        self.codec = get_codec("fp32")

    def before_update(self) -> None:
        works = [
            g.all_reduce_mean(_flat_grads(m), self.codec) for g, m in zip(self.groups, self.replicas.models)
        ]
        for i, (m, w) in enumerate(zip(self.replicas.models, works)):
            _set_grads(m, w.wait())
            self.bytes_sent[i] += w.stats.bytes_sent
        for key in ("encode_s", "decode_s", "comm_s"):
            self.timing[key] += getattr(works[0].stats, key)


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
                self.record("round", **self._round_fields(replica_ids[i], step), **rs.to_dict())

    def _round_fields(self, replica: int, step: int) -> dict[str, Any]:
        return {"replica": replica, "step": step}

    @contextlib.contextmanager
    def global_parameters(self) -> Iterator[nn.Module]:
        with self.dilocos[0].global_parameters() as m:
            yield m

    def digests(self) -> list[str]:
        return [digest(d.global_vector()) for d in self.dilocos]


def _flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
            for p in model.parameters()
        ]
    )


def _set_grads(model: nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    for p in model.parameters():
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype).clone()
        offset += n
