"""One worker of an elastic job: ``lowcomm train --coordinator tcp://host:29400 ...``.

The worker is one replica (one process): the reference model, inner AdamW, its own data stream
(picked by its worker id) and a DiLoCo wrapper over an :class:`~lowcomm.runtime.elastic.ElasticGroup`.
It trains in the same loop as every other run (:mod:`lowcomm.runtime.trainer.loop`); this module is
the :class:`ElasticDiLoCo` sync that loop calls. It may start at any time: the first members of a
fresh job start from the seed's initial model; any later one (or one that fell out of sync) first
receives the job's state from a live member, sets its local parameters to the global ones and
continues from the donor's step. At every quiet step (no round in flight) it serves the joiners the
coordinator assigned to it, and with ``checkpoint_every`` it writes its whole state to
``run_dir/checkpoint.lcs``.

Each worker writes its own run directory (config.json, events.jsonl with rounds, membership
changes and transfers, eval.jsonl, summary.json with the digest of its global parameters).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..._checks import one_line
from ...comm.distributed import LinkEmulator
from ..elastic import (
    ElasticGroup,
    ResyncRequired,
    WorkerAgent,
    job_state,
    load_job_state,
    read_checkpoint,
    write_checkpoint,
)
from ..elastic.checkpoint import CHECKPOINT_NAME
from ..hooks import FaultHooks
from .build import Replicas, architecture, check_architecture
from .config import TrainConfig
from .sync import DiLoCoSync

__all__ = ["ElasticDiLoCo", "data_stream", "worker_name", "resume_checkpoint"]

log = logging.getLogger(__name__)


def data_stream(worker_id: str) -> int:
    """The data stream of a worker: a stable function of its id."""
    return int(hashlib.sha256(worker_id.encode()).hexdigest()[:8], 16) % (1 << 31)


def worker_name(cfg: TrainConfig) -> str:
    """This worker's id: ``--worker-id``, or hostname-pid."""
    return cfg.elastic.worker_id or f"{socket.gethostname()}-{os.getpid()}"


def resume_checkpoint(cfg: TrainConfig) -> dict | None:
    """The checkpoint ``--resume`` names, read and checked (None for a fresh start).

    Raises:
        FileNotFoundError: an explicit checkpoint (a file, or a run directory's) that does not exist.
        CorruptStateError: a damaged, truncated or foreign file (nothing has been written yet).
    """
    if not cfg.elastic.resume:
        return None
    auto = cfg.elastic.resume == "auto"
    path = Path(cfg.run.run_dir) / CHECKPOINT_NAME if auto else Path(cfg.elastic.resume)
    if auto and not path.exists():
        return None  # nothing written yet: a fresh start
    if path.is_dir():  # a worker's run directory: the checkpoint it writes there
        path = path / CHECKPOINT_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"resume={cfg.elastic.resume!r}: the folder holds no {CHECKPOINT_NAME} "
                "(a worker's checkpoint)"
            )
    if not path.is_file():
        raise FileNotFoundError(f"resume={cfg.elastic.resume!r}: {str(path)!r} is not a checkpoint file")
    return read_checkpoint(path)


class ElasticDiLoCo(DiLoCoSync):
    """The sync of an elastic worker.

    Args:
        replicas: this worker's one replica.
        cfg: the run's configuration.
        key: the job key.
        worker_id: this worker's id.
        hooks: the fault hooks (a FaultInjector under a fault plan).
        record: the run's event log.
        resume: a checkpoint to continue from (see :func:`resume_checkpoint`).
    """

    def __init__(
        self,
        replicas: Replicas,
        cfg: TrainConfig,
        *,
        key: bytes,
        worker_id: str,
        hooks: FaultHooks,
        record: Callable[..., None],
        resume: dict | None = None,
    ) -> None:
        el = cfg.elastic
        self.agent = WorkerAgent(
            el.coordinator,
            key,
            worker_id,
            el.advertise_addr,
            heartbeat_s=el.heartbeat,
            coordinator_timeout_s=el.coordinator_timeout,
            record=record,
            hooks=hooks,
        )
        link = LinkEmulator.parse(cfg.link.bandwidth, cfg.link.latency)
        self.group = ElasticGroup(self.agent, link, hooks, max_retries=el.max_retries)
        super().__init__(replicas, [self.group], cfg)  # hands the fingerprint to the agent
        self.record, self.hooks, self.worker_id = record, hooks, worker_id
        self.diloco = self.dilocos[0]
        self.resume_state = resume
        self.ckpt_path = Path(cfg.run.run_dir) / CHECKPOINT_NAME
        self.checkpointed: int | None = None  # the step of the last checkpoint this attempt wrote
        self.resyncs = 0
        self.steps_trained = 0  # in this attempt
        self.transfers_in: list[dict] = []

    # ---- state ---------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        """What a joiner receives (taken with no round in flight)."""
        inner = self.replicas.opts[0].state_dict() if self.cfg.elastic.transfer_inner_state else None
        return {**job_state(self.diloco, self.group), "inner": inner}

    def checkpoint(self) -> dict:
        """Everything this worker needs to continue bit for bit: a joiner's state and its own."""
        r = self.replicas
        return {
            **self.snapshot(),
            "worker_id": self.worker_id,
            "architecture": architecture(r.models[0]),
            "model": dict(r.models[0].state_dict()),
            "inner": r.opts[0].state_dict(),
            "sampler": r.samplers[0].state_dict(),
            # what it sent so far (taken with no round in flight): a resumed worker's records count it
            "sent": {"bytes": self.bytes_sent[0], "rounds": self.rounds},
            # the steps it trained (its tokens: a worker that joined late trained fewer than the
            # job's step; redone steps after a resync are counted again, as they were trained)
            "trained_steps": self.steps_before + self.steps_trained,
        }

    def _restore(self, state: dict, joiner: bool) -> None:
        """The job-wide part of a state: round counter, DiLoCo state, inner state, schedule position."""
        load_job_state(self.diloco, self.group, state, joiner=joiner)
        if state.get("inner") is not None:
            self.replicas.opts[0].load_state_dict(state["inner"])
        self.replicas.seek(self.diloco.step_count)

    def _join(self) -> None:
        self.transfers_in.append(self.agent.join(lambda state: self._restore(state, joiner=True)))

    def _resync(self, e: ResyncRequired) -> None:
        self.resyncs += 1
        self.record("membership", what="resync", step=self.diloco.step_count, reason=str(e)[:300])
        self._join()

    # ---- the loop's hooks --------------------------------------------------------------------------

    def restore(self) -> None:
        """Continue from the checkpoint, if any (a state of another configuration or model raises
        ValueError here, before any record is written)."""
        if self.resume_state is not None:
            state = self.resume_state
            where = f"resume={self.cfg.elastic.resume!r}"
            check_architecture(state.get("architecture"), self.replicas.models[0], where)
            try:
                self._restore(state, joiner=False)
                self.replicas.models[0].load_state_dict(state["model"])
                self.replicas.samplers[0].load_state_dict(state["sampler"])
                sent = state.get("sent")  # (a checkpoint of an older lowcomm has none: counted from here)
                if sent is not None:
                    self.bytes_sent[0], self.rounds = int(sent["bytes"]), int(sent["rounds"])
                self.steps_before = int(state.get("trained_steps", 0))
            except (RuntimeError, KeyError, TypeError) as e:  # another model's or a damaged state
                why = one_line(e, 400)  # torch's load errors span lines: one line here
                raise ValueError(f"{where}: the checkpoint does not fit this run: {why}") from None

    def start(self) -> int:
        if self.resume_state is not None:
            step, rnd = self.diloco.step_count, self.group.next_round
            self.record("checkpoint", what="resumed", step=step, round=rnd)
        if not self.agent.start(fresh=True):
            self._join()
        return self.diloco.step_count

    def after_update(self, step: int) -> bool:
        try:
            self.diloco.step()
        except ResyncRequired as e:
            self._resync(e)
            return False
        self.agent.step = self.diloco.step_count
        return True

    def finish(self) -> bool:
        try:
            return super().finish()
        except ResyncRequired as e:
            self._resync(e)
            return False

    @property
    def position(self) -> int:
        return self.diloco.step_count

    def after_step(self, step: int) -> None:
        self.steps_trained += 1
        self.drain_rounds(step, [0])  # at once: the survival report times faults by these events
        self.hooks.after_step(step)
        every = self.cfg.elastic.checkpoint_every
        if every and step % every == 0 and self.diloco.in_flight == 0:
            self._write_checkpoint(step)
        if self.diloco.in_flight == 0:
            self.agent.serve_pending(self.snapshot)

    def _write_checkpoint(self, step: int) -> bool:
        opener = self.hooks.checkpoint_opener(step)  # a failing one under a checkpoint-fail fault
        try:
            nbytes = write_checkpoint(self.ckpt_path, self.checkpoint(), opener=opener)
            self.record("checkpoint", what="written", step=step, bytes=nbytes, path=str(self.ckpt_path))
            self.checkpointed = step
            return True
        except OSError as e:
            log.warning("checkpoint at step %d failed (the previous one is intact): %s", step, e)
            self.record("checkpoint", what="failed", step=step, reason=str(e)[:300])
            return False

    def stop_checkpoint(self, step: int) -> str | None:
        """A stop at the end of ``step`` (SIGTERM): this worker's checkpoint of it, when it writes
        checkpoints and no round is in flight (a state in the middle of one is not whole); its
        path, or None. A job whose every worker was stopped resumes from them."""
        if not self.cfg.elastic.checkpoint_every or self.diloco.in_flight:
            return None
        if self.checkpointed != step and not self._write_checkpoint(step):
            return None
        return str(self.ckpt_path)

    def _round_fields(self, replica: int, step: int) -> dict[str, Any]:
        return {"step": step, "size": self.group.size}

    def summary(self) -> dict[str, Any]:
        return {
            "elastic": True,
            "worker_id": self.worker_id,
            "replicas": self.group.size,
            "rounds_redone": self.group.rounds_redone,
            "resyncs": self.resyncs,
            "transfers_in": self.transfers_in,
        }

    def close(self, finished: bool) -> None:
        if finished:
            self.agent.serve_pending(self.snapshot)
        self.agent.close(leave=True, finished=finished)
