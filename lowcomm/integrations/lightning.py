"""DiLoCo as a Lightning callback: add one callback to an existing ``Trainer``.

    from lowcomm.integrations.lightning import DiLoCoCallback, replica_group

    group = replica_group()                               # before the Trainer: see lowcomm.integrations
    trainer = L.Trainer(..., callbacks=[DiLoCoCallback(group, sync_every=100, fragments=4)])

The callback wraps the module's parameters and the Trainer's optimizer in
:class:`~lowcomm.optim.DiLoCo` when fitting starts, and steps it from the optimizer (so gradient
accumulation counts optimizer steps, not batches). Its state (global fragments, outer momentum,
rounds in flight) is saved in Lightning checkpoints and restored on ``fit(ckpt_path=...)``:
Lightning restores callbacks before the optimizers exist, so the state waits until the wrapper is
built. When fitting ends, what is left is synchronized (``final_sync``).

Each round that completes goes to the Trainer's loggers at the step it completed, the final
sync's at the last step (``diloco/bytes_sent``, ``diloco/pseudo_grad_norm``,
``diloco/cosine_to_mean``, ``diloco/wait_s``).

A replica of ``k`` processes (``--procs-per-replica k``) runs Lightning's DDP strategy inside it
(``Trainer(devices=k)``): each process syncs its 1/k shard of every fragment, and the checkpoint
Lightning writes from the replica's first process holds every process's part of the state.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch.nn.parallel import DistributedDataParallel

from ..comm import ReplicaGroup
from ..optim import DiLoCo, DiLoCoConfig
from .common import (
    check_same_start,
    outer_device,
    replica_group,
    replica_shard_group,
    replica_state,
    resume_checkpoint,
    round_metrics,
    warn_if_spanning_replicas,
)

__all__ = ["DiLoCoCallback", "replica_group", "resume_checkpoint"]


class DiLoCoCallback(pl.Callback):
    """Args:
    group: the replicas' group (:func:`lowcomm.integrations.replica_group`).
    config: DiLoCo's settings; keywords override its fields (``sync_every=100``, ...).
    final_sync: when fitting ends, synchronize every fragment with unsynced progress.
    """

    def __init__(
        self,
        group: ReplicaGroup,
        config: DiLoCoConfig | None = None,
        *,
        final_sync: bool = True,
        **settings: Any,
    ) -> None:
        self.group, self.final_sync = group, final_sync
        self.config = (config or DiLoCoConfig()).replace(**settings)
        self.diloco: DiLoCo | None = None
        self._restored: dict | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"DiLoCoCallback takes one optimizer, the module configured {len(trainer.optimizers)}"
            )
        warn_if_spanning_replicas("Lightning Trainer", getattr(trainer, "world_size", 1), "the Trainer")
        # resuming, each replica's own weights came from its checkpoint: nothing to make alike
        config = self.config.replace(init="none") if self._restored is not None else self.config
        if self.diloco is not None:  # a fit that ended in an exception left it attached
            self.diloco.detach()
        check_same_start(self.group, self._restored)
        whole = isinstance(trainer.strategy.model, DistributedDataParallel)  # (on_fit_start: wrapped)
        self.diloco = DiLoCo(
            pl_module,
            trainer.optimizers[0],
            self.group,
            outer_device(self.group, pl_module, config),
            shard_group=replica_shard_group(type(trainer.strategy).__name__, whole),
        )
        if self._restored is not None:
            self.diloco.load_state_dict(self._restored)
            self._restored = None
        self.diloco.attach()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        """Log the rounds that completed in this batch's optimizer step (:func:`round_metrics`),
        every one of them: to the loggers directly, as rounds need not fall on the Trainer's
        ``log_every_n_steps``."""
        if self.diloco is not None:
            self._log_rounds(trainer)

    def _log_rounds(self, trainer: pl.Trainer) -> None:
        metrics = round_metrics(self.diloco.drain_round_stats())
        if metrics and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.diloco is not None:
            self.diloco.detach()
            if self.final_sync:
                self.diloco.finish()
                self._log_rounds(trainer)  # (the final sync's rounds: the loggers are not finalized yet)

    def state_dict(self) -> dict[str, Any]:
        if self.diloco is not None:  # (called on every process: Lightning writes the first's)
            return replica_state(self.diloco)
        return self._restored or {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.diloco is not None:
            self.diloco.load_state_dict(state_dict)
        else:  # Lightning restores callbacks before fitting starts: applied in on_fit_start
            self._restored = state_dict
