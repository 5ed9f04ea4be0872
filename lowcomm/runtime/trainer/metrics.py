"""Where a run's metrics go besides its JSONL records: TensorBoard or Weights & Biases.

The records (``events.jsonl``, ``eval.jsonl``) are always written; ``--metrics`` adds a sink that
receives the same numbers as scalars, per step:

    train/loss, train/lr, train/bytes_sent          every recorded step
    eval/loss                                       every evaluation
    round/<field>                                   each round of the first replica in the process
                                                    (RoundStats.to_dict(): norms, cosine, timings)

TensorBoard writes to ``<run_dir>/tensorboard`` (through ``torch.utils.tensorboard``; needs the
``tensorboard`` package); ``--overwrite`` removes the event files of the run it replaces there
(TensorBoard would draw both runs' curves as one). W&B is used only if installed, and offline
unless ``WANDB_MODE`` says otherwise, so a machine without network access never blocks on it
(``wandb sync`` uploads later). Each sink starts writing at its first scalars, which the records
hold back with their lines until the run is under way: a run refused before adds nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from ..._checks import is_number
from ..._compat import require

__all__ = [
    "METRICS",
    "TENSORBOARD_DIR",
    "TENSORBOARD_FILES",
    "MetricsSink",
    "check_sink",
    "open_sink",
    "scalars_of",
]

#: the choices of ``--metrics``: "jsonl" is the records alone
METRICS = ("jsonl", "tensorboard", "wandb")


#: round fields that are labels, not measurements
_NOT_ROUND_SCALARS = ("replica", "step", "fragment", "send_step", "apply_step", "numel", "final")


class MetricsSink(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def scalars_of(
    kind: str, fields: dict[str, Any], first_replica: int | None
) -> tuple[int, dict[str, float]] | None:
    """The step and scalars a sink receives for one recorded event (None: nothing to send)."""
    if kind == "step":
        prefix, keys = "train", ("loss", "lr", "bytes_sent")
    elif kind == "eval":
        prefix, keys = "eval", ("loss",)
    elif kind == "round" and fields.get("replica") in (first_replica, None):
        prefix = "round"
        keys = tuple(k for k, v in fields.items() if k not in _NOT_ROUND_SCALARS and is_number(v))
    else:
        return None
    step = fields.get("step")
    if not isinstance(step, int):
        return None
    values = {f"{prefix}/{k}": float(fields[k]) for k in keys if is_number(fields.get(k))}
    return (step, values) if values else None


#: the folder of a run directory TensorBoard's sink writes to, and its event files' names
TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_FILES = "events.out.tfevents.*"


class TensorBoardSink:
    """Its event file is made at the first scalars (a run refused before it sent any adds none).
    A run resumed at step ``resumed`` hides from TensorBoard what the earlier files hold of the
    steps after it, which the run redoes (TensorBoard would draw both)."""

    def __init__(self, run_dir: Path, resumed: int | None = None) -> None:
        check_sink("tensorboard")
        self.folder, self.writer, self.resumed = run_dir / TENSORBOARD_DIR, None, resumed

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if self.resumed is None else self.resumed + 1
            self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=purge)
        for name, v in values.items():
            self.writer.add_scalar(name, v, global_step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


class WandbSink:
    """Its W&B run starts at the first scalars (a run refused before it sent any starts none)."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        check_sink("wandb")
        self.dir, self.config, self.run = run_dir, config, None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.run is None:
            import wandb

            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "lowcomm"),
                name=self.dir.name,
                dir=str(self.dir),
                config=self.config,
                mode=os.environ.get("WANDB_MODE", "offline"),
            )
        self.run.log(values, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


#: the package each sink needs
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_sink(kind: str) -> None:
    """Raises MissingExtra when the sink's package is not installed (checked before a run starts)."""
    if kind in _PACKAGES:
        require(_PACKAGES[kind], f"--metrics {kind}")


def open_sink(
    kind: str, run_dir: str | Path, config: dict[str, Any], resumed: int | None = None
) -> MetricsSink | None:
    """The sink ``--metrics`` names (None for "jsonl"); ``resumed``: the step a resumed run
    continues from.

    Raises:
        MissingExtra: its package is not installed (the message says what to install).
    """
    if kind == "tensorboard":
        return TensorBoardSink(Path(run_dir), resumed)
    if kind == "wandb":
        return WandbSink(Path(run_dir), config)
    return None
