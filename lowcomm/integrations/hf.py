"""DiLoCo as a Hugging Face ``TrainerCallback``: add one callback to an existing ``Trainer``.

    from lowcomm.integrations.hf import DiLoCoTrainerCallback, replica_group

    group = replica_group()           # before TrainingArguments: the Trainer then sees one process
    trainer = Trainer(..., callbacks=[DiLoCoTrainerCallback(group, sync_every=100)])

Under ``lowcomm launch`` or torchrun the HF Trainer (through accelerate) reads RANK / WORLD_SIZE
and wraps the model in DDP, all-reducing gradients every step; :func:`replica_group` joins the
replicas' group and then hides those variables, so each process trains its own replica and DiLoCo
synchronizes them. The callback warns if the Trainer sees more processes than a replica has. With
``k`` processes a replica (``--procs-per-replica k``) the Trainer's DDP runs inside the replica:
each process syncs its 1/k shard of every fragment, and the replica's first process writes
``diloco.pt`` with every process's part.
(The replicas' process group is built without initializing torch.distributed's default group, so
the Trainer also saves every replica's checkpoints, not rank 0's only.)

The wrapper is built when training begins (around the Trainer's model and its optimizer, stepped
from the optimizer so gradient accumulation counts optimizer steps); its state is saved as
``diloco.pt`` in every checkpoint folder and restored when training resumes from one.

Each log the Trainer writes gains the rounds that completed since the one before
(``diloco/rounds``, ``diloco/bytes_sent``, ``diloco/pseudo_grad_norm``, ``diloco/cosine_to_mean``,
``diloco/wait_s``): in ``trainer_state.json``'s history, and for the reporters of ``report_to``
(TensorBoard, W&B, ...) where the callback comes before them: ``callback.add_to(trainer)`` puts it
first (the Trainer places the callbacks it is given after its reporters). The final sync's rounds
come after the Trainer's last log: they go to the history alone.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from transformers import TrainerCallback

from .._checks import one_line
from ..comm import ReplicaGroup
from ..optim import DiLoCo, DiLoCoConfig
from .common import (
    CHOSEN,
    STATE_FILE,
    check_same_start,
    outer_device,
    procs_per_replica,
    replica_group,
    replica_shard_group,
    replica_state,
    resume_checkpoint,
    round_metrics,
    warn_if_spanning_replicas,
)

__all__ = ["DiLoCoTrainerCallback", "replica_group", "resume_checkpoint", "STATE_FILE"]

log = logging.getLogger(__name__)


class DiLoCoTrainerCallback(TrainerCallback):
    """Args:
    group: the replicas' group (:func:`lowcomm.integrations.replica_group`).
    config: DiLoCo's settings; keywords override its fields (``sync_every=100``, ...).
    final_sync: when training ends, synchronize every fragment with unsynced progress.
    resume_from: the checkpoint folder to read DiLoCo's state from when training resumes
        (default: ``output_dir/checkpoint-<step>``, the folder the Trainer resumes from).
    """

    def __init__(
        self,
        group: ReplicaGroup,
        config: DiLoCoConfig | None = None,
        *,
        final_sync: bool = True,
        resume_from: str | os.PathLike | None = None,
        **settings: Any,
    ) -> None:
        self.group, self.final_sync, self.resume_from = group, final_sync, resume_from
        self.config = (config or DiLoCoConfig()).replace(**settings)
        self.diloco: DiLoCo | None = None
        self.first = False  # put first by add_to: before the reporters

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        warn_if_spanning_replicas("HF Trainer", args.world_size, "TrainingArguments")
        reporters = [r for r in _as_list(getattr(args, "report_to", None)) if r != "none"]
        if reporters and not self.first:
            log.warning(
                "the reporters of report_to (%s) log before DiLoCoTrainerCallback and miss its "
                "diloco/* metrics (they stay in the Trainer's history): add it with "
                "DiLoCoTrainerCallback(...).add_to(trainer) to put it first",
                ", ".join(reporters),
            )
        if getattr(args, "load_best_model_at_end", False) and self.final_sync:
            log.warning(
                "load_best_model_at_end: when training ends the Trainer loads this replica's own "
                "weights from its best checkpoint (a replica's local weights, judged on its own "
                "evaluation), and DiLoCo's final sync then averages from them, not from where "
                "training ended; set load_best_model_at_end=False to keep the synced model"
            )
        saved = None
        if state.global_step > 0:  # resuming: the Trainer loaded checkpoint-<step> of output_dir
            name = f"checkpoint-{state.global_step}"
            folder = self.resume_from or os.path.join(args.output_dir, name)
            chosen = CHOSEN.get("path")  # (another replica's, where resume_checkpoint chose one)
            if not self.resume_from and chosen and os.path.basename(chosen) == name:
                folder = chosen
            saved = os.path.join(folder, STATE_FILE)
            if not os.path.exists(saved):
                raise FileNotFoundError(
                    f"resuming at step {state.global_step} but {saved} does not exist: DiLoCo's state "
                    "is saved in the Trainer's checkpoint folders; pass "
                    "DiLoCoTrainerCallback(..., resume_from=FOLDER) for a checkpoint elsewhere"
                )
        restored = None
        if saved:
            try:
                restored = torch.load(saved, weights_only=True, map_location="cpu")
            except Exception as e:  # torn, truncated or not torch's format: name the file
                why = one_line(e, 200)
                raise ValueError(
                    f"{saved}: not a readable DiLoCo state ({type(e).__name__}: {why})"
                ) from None
        check_same_start(self.group, restored)
        # resuming, each replica's own weights came from its checkpoint: nothing to make alike
        config = self.config.replace(init="none") if saved else self.config
        if optimizer is None:  # transformers 4.47-4.49 hand the Trainer's optimizer to the state only
            optimizer = getattr(state, "optimizer", None)
        if optimizer is None:
            raise RuntimeError(
                "the HF Trainer handed its callbacks no optimizer, which DiLoCo steps from: pass "
                "optimizers=(optimizer, scheduler) to Trainer(...) or use another transformers release"
            )
        if self.diloco is not None:  # a train() that ended in an exception left it attached
            self.diloco.detach()
        self.diloco = DiLoCo(
            model,
            optimizer,
            self.group,
            outer_device(self.group, model, config),
            shard_group=replica_shard_group(*_spread()) if procs_per_replica() > 1 else None,
        )
        if restored is not None:
            self.diloco.load_state_dict(restored)
            log.info("DiLoCo state restored from %s (step %d)", saved, self.diloco.step_count)
        self.diloco.attach()

    def add_to(self, trainer) -> Any:
        """Put this callback first in ``trainer``'s callbacks (adding it if it is not there), so
        the reporters of ``report_to`` log the round metrics it adds to each log; returns the
        trainer."""
        callbacks = getattr(getattr(trainer, "callback_handler", None), "callbacks", None)
        if not isinstance(callbacks, list):
            raise TypeError(f"add_to takes a transformers Trainer, not a {type(trainer).__name__}")
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        self.first = True
        return trainer

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add the rounds that completed since the last log (:func:`round_metrics`) to this log:
        to the Trainer's history and for the callbacks after this one."""
        if self.diloco is None or logs is None:
            return
        metrics = round_metrics(self.diloco.drain_round_stats())
        logs.update(metrics)
        history = state.log_history
        if metrics and history and history[-1].get("step") == state.global_step:
            history[-1].update(metrics)

    def on_save(self, args, state, control, **kwargs):
        if self.diloco is None:
            return
        saved = replica_state(self.diloco)  # (every process of the replica: a collective)
        if state.is_world_process_zero:  # the replica's first process writes every part
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            torch.save(saved, os.path.join(folder, STATE_FILE))

    def on_train_end(self, args, state, control, **kwargs):
        if self.diloco is not None:
            self.diloco.detach()
            if self.final_sync:
                self.diloco.finish()
                # (the final sync's rounds: after the Trainer's last log, so in its history only)
                metrics = round_metrics(self.diloco.drain_round_stats())
                if metrics:
                    state.log_history.append({**metrics, "step": state.global_step})


def _as_list(report_to) -> list[str]:
    """``TrainingArguments.report_to`` as a list (a name, a list of names, or None)."""
    if report_to is None:
        return []
    return [report_to] if isinstance(report_to, str) else [str(r) for r in report_to]


def _spread() -> tuple[str, bool]:
    """How accelerate spreads the Trainer's replica over its processes, and whether each holds
    the whole model (its DDP: ``MULTI_CPU``, ``MULTI_GPU``, ...; not FSDP or DeepSpeed)."""
    from accelerate.state import AcceleratorState

    kind = AcceleratorState().distributed_type
    return f"accelerate's {kind.name}", kind.name.startswith("MULTI_")
