"""The one training loop behind ``lowcomm train``, for every kind of job.

Where the replicas sit decides the group they talk through; everything else is the same loop:

    one process            all ``replicas`` replicas here, over a LocalGroup
    launch / torchrun      one replica per process (or per ``procs_per_replica`` processes with
                           inner DDP), over a DistributedGroup; rank 0 writes the records
    elastic worker         one replica over an ElasticGroup (``--coordinator``); it writes its
                           own run directory

and how they synchronize is a :class:`~lowcomm.runtime.trainer.sync.Sync` (DP, DiLoCo, elastic
DiLoCo). Each step: every local replica runs forward and backward, the sync may act on the
gradients (DP), every replica takes its inner step, the sync may act on the parameters
(DiLoCo), then the step is recorded, evaluated when due, and handed to the sync's after-step
work (an elastic worker's checkpoints and joiners). One process and torchrun give the same bits
for the same configuration.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from ..._checks import env_int, newest_common_step, one_line
from ..._version import __version__
from ...comm import CollectiveError, LocalGroup, ReplicaGroup
from ...comm.distributed import LinkEmulator
from ...comm.slurm import adopt_srun_env
from ...kernels import check_precision_on, layer_backend
from ...lm import eval_batches, load_corpus
from ..errors import Stopped
from ..files import hold_folder, private_open
from ..hooks import NO_FAULTS, FaultHooks
from ..statefile import CorruptStateError, load_state, save_state
from .build import (
    architecture,
    build_model,
    check_architecture,
    check_memory,
    check_threads,
    evaluate,
    make_replicas,
)
from .config import TrainConfig
from .metrics import TENSORBOARD_DIR, TENSORBOARD_FILES, check_sink, open_sink
from .profiling import StepProfiler, parse_profile_steps
from .records import NullRecorder, RunRecorder, check_run_dir, human_bytes, write_summary
from .sync import DataParallel, DiLoCoSync, Sync
from .topology import (
    StopAgreement,
    Topology,
    init_from_torchrun,
    is_distributed_env,
    restart_attempt,
    store_barrier,
)

__all__ = ["train", "Trainer"]

log = logging.getLogger(__name__)


def train(
    cfg: TrainConfig,
    *,
    progress: bool = True,
    topology: Topology | None = None,
    key: bytes | None = None,
    hooks: FaultHooks | None = None,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Run one training job and write its run directory; returns the summary.

    Args:
        cfg: the configuration.
        progress: show a progress bar (on the process that writes the records).
        topology: a static job's topology (default: from torchrun's environment, if any, or from
            SLURM's in a task of an ``srun`` step: :mod:`lowcomm.comm.slurm`).
        key: an elastic job's key (default: $LOWCOMM_KEY / $LOWCOMM_KEY_FILE).
        hooks: an elastic worker's fault hooks (default: from $LOWCOMM_FAULTS, if set).
        stop: once set (from any thread: ``lowcomm train`` sets it on SIGTERM), the run stops at
            the end of the step under way: with ``checkpoint_every`` it writes its checkpoint
            there (``resume`` continues from it, losing no step), records a ``stopped`` event,
            closes its records without a summary (an elastic worker leaves its job) and raises
            :class:`~lowcomm.runtime.errors.Stopped`. Under launch/torchrun the processes stop at
            one step, agreed in the job's store (:class:`~.topology.StopAgreement`), those that
            no signal reached too.

    Raises:
        ValueError / FileNotFoundError: bad configuration, corpus or checkpoint, before any
            training step and before any record is written.
        Stopped: ``stop`` was set before the last step.
    """
    if topology is None and not cfg.elastic.enabled:  # a task of srun's step: a process of the job
        adopt_srun_env()
    return Trainer(cfg, progress=progress, topology=topology, key=key, hooks=hooks, stop=stop).run()


class Trainer:
    """One run: built by :meth:`run`, which returns the summary. See :func:`train`."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        progress: bool = True,
        topology: Topology | None = None,
        key: bytes | None = None,
        hooks: FaultHooks | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.cfg, self.progress, self.topology, self.key, self.hooks = cfg, progress, topology, key, hooks
        self.stop = stop
        self.agreement: StopAgreement | None = None  # where the processes of a static job agree on a stop
        self._stop_at: int | None = None  # the step the run stops at, once a stop is asked
        self._barrier_step: int | None = None  # the last step whose checkpoint waited for the job's processes
        self.rec: RunRecorder | NullRecorder = NullRecorder()
        self.bar = None  # the progress bar, once the run starts
        self.profiler: StepProfiler | None = None  # --profile's, once the run starts
        self._dir_lock: int | None = None  # the run directory's lock (files.hold_folder)

    def leader_by_env(self) -> bool:
        """Whether this process writes the records, known before any process group exists (rank 0
        of a torchrun job, or any other process)."""
        return self.topology.is_leader if self.topology is not None else env_int("RANK", 0) == 0

    def _record(self, kind: str, **fields: Any) -> None:
        """The run's event log (handed to parts built before the recorder opens)."""
        self.rec.event(kind, **fields)

    # ---- building ------------------------------------------------------------------------------

    def _static_topology(self) -> Topology | None:
        cfg = self.cfg
        link = LinkEmulator.parse(cfg.link.bandwidth, cfg.link.latency)
        topo = self.topology
        if topo is None and is_distributed_env():
            k = cfg.run.job_procs_per_replica()
            topo = init_from_torchrun(k, link=link, timeout_s=cfg.run.timeout)
        if topo is None and link is not None and not cfg.elastic.enabled:
            raise ValueError(
                f"link_bandwidth={cfg.link.bandwidth!r} / link_latency={cfg.link.latency!r} emulate a "
                "network between processes: run the job under 'lowcomm launch' or torchrun"
            )
        if topo is not None and cfg.run.replicas != topo.num_replicas:
            log.info("replicas=%d ignored: the job has %d replicas", cfg.run.replicas, topo.num_replicas)
        return topo

    def _build(self) -> None:
        cfg = self.cfg
        # a static job's checkpoint, read and checked before anything is written
        self.checkpoint = None if cfg.elastic.enabled else read_run_checkpoint(cfg)
        # resuming (or restarted, as torchrun --max-restarts reruns the same command before any
        # checkpoint exists) the run's records are continued, not refused
        self.continuing = bool(cfg.elastic.resume) or (
            cfg.elastic.enabled and bool(os.environ.get("LOWCOMM_RESTARTED"))
        )
        if self.leader_by_env():  # refusals first: nothing is built or written yet
            check_run_dir(cfg.run.run_dir, overwrite=cfg.run.overwrite, continuing=self.continuing)
            check_sink(cfg.run.metrics)
        self.device = cfg.run.torch_device()
        if self.device.type == "cuda":  # before anything touches a GPU: no process makes a context
            torch.cuda.set_device(self.device)  # on GPU 0 that is not its own (torchrun, 8 a node)
        self.dtype = cfg.run.compute_dtype(self.device)
        check_precision_on(cfg.model.precision, self.device)  # no GPU run falls back to emulation
        note = cfg.run.check_compile(cfg.model.precision)
        if note:
            log.warning(note)
        h, steps = cfg.diloco.sync_every, cfg.run.steps
        if cfg.run.mode == "diloco" and cfg.diloco.fragments == 1 and h > steps and self.leader_by_env():
            log.warning(
                "sync_every=%d is more than steps=%d: %s",
                h,
                steps,
                "the replicas synchronize once, at the end (final_sync)"
                if cfg.run.final_sync
                else "with final_sync off the replicas never synchronize, and the global parameters "
                "evaluated and recorded are the initial ones",
            )
        self.corpus = load_corpus(cfg.data.corpus)
        elastic = cfg.elastic.enabled
        here = 1 if elastic or is_distributed_env() or self.topology is not None else cfg.run.replicas
        check_memory(cfg, self.corpus.vocab_size, here, self.device)  # before anything is allocated
        self.corpus.check_fits(cfg.model.seq_len)
        topo = None if elastic else self._static_topology()
        self.topo = topo
        base = build_model(cfg, self.corpus.vocab_size)
        self.params = base.num_params()
        self.params_ne = base.num_params(non_embedding=True)
        self.flops_per_token = base.flops_per_token()
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.leader = topo is None or topo.is_leader
        self.procs_per_replica = topo.procs_per_replica if topo else 1
        self.world_size = topo.world_size if topo else 1
        if elastic:
            from .worker import data_stream, resume_checkpoint, worker_name

            resume = resume_checkpoint(cfg)  # checked before anything is written
            self.worker_id = worker_name(cfg)
            self.replica_ids, streams = [0], [data_stream(self.worker_id)]
            self.num_replicas = 1
        elif topo is None:
            self.replica_ids = list(range(cfg.run.replicas))
            streams = self.replica_ids
            self.num_replicas = cfg.run.replicas
        else:
            k = topo.procs_per_replica
            self.replica_ids = [topo.replica]
            streams = [topo.replica if k == 1 else topo.replica * k + topo.local_rank]
            self.num_replicas = topo.num_replicas
        self.replicas = make_replicas(
            base, cfg, self.corpus, streams, self.device, topo.inner if topo else None
        )
        self.val = eval_batches(self.corpus.val, cfg.run.eval_batches, cfg.data.batch_size, cfg.model.seq_len)
        # every replica of the job (every process of a replica) reads one batch per step
        self.tokens_per_step = (
            self.num_replicas * self.procs_per_replica * cfg.data.batch_size * cfg.model.seq_len
        )
        self.sync = self._make_sync(resume if elastic else None)
        self.sync.record = self._record
        self.sync.restore()
        # the processes of a static job agree on one step (an elastic job has no topo)
        several = topo is not None and bool(cfg.elastic.resume)
        self.resumed = common_checkpoint(cfg, self.checkpoint, topo) if several else self.checkpoint
        self.start_step = 0 if self.resumed is None else self._restore_run(self.resumed)

    def _make_sync(self, resume: dict | None) -> Sync:
        cfg, topo = self.cfg, self.topo
        if cfg.elastic.enabled:
            from ..elastic import load_key
            from ..faults import FaultInjector
            from .worker import ElasticDiLoCo

            hooks = self.hooks or FaultInjector.from_env(self.worker_id, record=self._record) or NO_FAULTS
            self.hooks = hooks
            key = self.key if self.key is not None else load_key()
            return ElasticDiLoCo(
                self.replicas,
                cfg,
                key=key,
                worker_id=self.worker_id,
                hooks=hooks,
                record=self._record,
                resume=resume,
            )
        self.hooks = self.hooks or self._static_faults() or NO_FAULTS
        groups: list[ReplicaGroup] = LocalGroup.create(cfg.run.replicas) if topo is None else [topo.outer]
        if cfg.run.mode == "dp":  # with inner DDP the gradients are reduced after the backward
            return DataParallel(self.replicas, groups, overlap=topo is None or topo.inner is None)
        return DiLoCoSync(self.replicas, groups, cfg, shard_group=topo.inner if topo else None)

    def _static_faults(self) -> FaultHooks | None:
        """$LOWCOMM_FAULTS in a static job: this process's faults (its rank's), checked against
        the job (the kinds a static job serves, its ranks and steps) before any step; None
        without a plan. Each fault is appended to :func:`faults_path` before it acts; a resumed
        or restarted run reads them back, so a kill fires once, not at every restart."""
        spec = os.environ.get("LOWCOMM_FAULTS")
        if not spec:
            return None
        from ..faults import FaultInjector, FaultPlan

        cfg, topo = self.cfg, self.topo
        world, rank = (topo.world_size, topo.rank) if topo else (1, 0)
        plan = FaultPlan.load(spec).check_static(world, self.procs_per_replica, cfg.run.steps)
        path = faults_path(cfg)
        done: set[int] = set()
        if self.continuing or restart_attempt():
            done = injected_faults(path)

        def record(kind: str, **fields: Any) -> None:
            if kind == "fault":  # on disk before it acts (a kill is next)
                with private_open(path, "a") as f:
                    f.write(json.dumps({"kind": kind, "wall": time.time(), **fields}, default=str) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            self._record(kind, **fields)

        return FaultInjector(plan, str(rank), record=record, done=done)

    def _config_record(self) -> dict[str, Any]:
        return {
            **self.cfg.flat(),
            "replicas": self.num_replicas,
            "procs_per_replica": self.procs_per_replica,
            "world_size": self.world_size,
            **({"worker_id": self.worker_id} if self.cfg.elastic.enabled else {}),
            "corpus_name": self.corpus.name,
            "corpus_sha256": self.corpus.sha256,
            "vocab_size": self.corpus.vocab_size,
            "params": self.params,
            "params_non_embedding": self.params_ne,
            "lowcomm_version": __version__,
            "torch_version": torch.__version__,
            "fragment_numels": (
                self.sync.dilocos[0].fragment_numels() if isinstance(self.sync, DiLoCoSync) else [self.params]
            ),
        }

    # ---- running -------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train; returns the summary. ``threads`` applies for the run only (a caller's setting is
        restored after it)."""
        check_threads(self.cfg.run.threads)
        threads = torch.get_num_threads()
        if self.cfg.run.threads:
            torch.set_num_threads(self.cfg.run.threads)
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads)
            if self._dir_lock is not None:  # the run directory, held from its records' start to the summary
                os.close(self._dir_lock)
                self._dir_lock = None

    def _run(self) -> dict[str, Any]:
        t_start = time.time()
        cfg = self.cfg
        self._build()
        if self.leader:
            self._dir_lock = hold_folder("run_dir", cfg.run.run_dir)  # before anything is written there
            config = self._config_record()
            resumed = self.start_step if self.resumed is not None else None
            sink = open_sink(cfg.run.metrics, cfg.run.run_dir, config, resumed=resumed)
            first = self.replica_ids[0] if self.replica_ids else 0
            self.rec = RunRecorder(
                cfg.run.run_dir, config, append=self.continuing, sink=sink, first_replica=first
            )
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        sync, finished = self.sync, False
        try:
            topo = self.topo
            if (
                topo is not None
                and topo.world_size > 1
                and self.stop is not None
                and topo.outer.store is not None
            ):
                prefix = "lowcomm/stop"  # (the job's store: this start's keys, comm.distributed.job_store)
                self.agreement = StopAgreement(
                    topo.outer.store, topo.rank, topo.world_size, self.stop, prefix
                )
            step = start = max(sync.start(), self.start_step)
            # the run is under way (an elastic worker's coordinator has taken it): what it replaces
            # or continues no longer holds
            if cfg.run.overwrite and not self.continuing:
                self._drop_replaced_files()
            self.rec.begin()
            # this process's last checkpoint written or resumed from: (step, path)
            self.checkpointed = None if self.resumed is None else (start, self.resumed["path"])
            if self.resumed is not None:
                regrouped = self.resumed.get("regroup")  # (the world size the checkpoints were written by)
                where = {
                    "path": self.resumed["path"],
                    **({"from_world_size": regrouped} if regrouped else {}),
                }
                self.rec.event("checkpoint", what="resumed", step=start, **where)
            if self.rec.changed:  # (a resumed run given more steps, another learning rate, ...)
                self.rec.event("config_changed", step=start, changed=self.rec.changed)
                if self.leader:
                    log.warning(
                        "continuing %s at step %d with settings its config.json does not hold: %s "
                        "(recorded as a config_changed event)",
                        cfg.run.run_dir,
                        start,
                        ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in self.rec.changed.items()),
                    )
            attempt = restart_attempt()
            if attempt and not cfg.elastic.enabled:  # a launcher's restart of a static job
                self.rec.event("restart", attempt=attempt, step=start)
            self._progress(start)
            self.steps_run, self.last_eval, self._pending = 0, None, []
            self.profiler = self._profiler()
            self.t_loop = time.perf_counter()
            t_end = None  # when the last step ended and the end's sync began
            while True:
                if step >= cfg.run.steps:  # the end: apply (and, with final_sync, send) what is left
                    if t_end is None:  # the rounds the steps waited for, apart from the end's own
                        self._drain_rounds(step)
                        sync.timing["steps_wait_s"] = sync.timing["wait_s"]
                        sync.timing["steps_device_wait_s"] = sync.timing["device_wait_s"]
                        t_end = time.perf_counter()
                        if self.agreement is not None:  # (a stop asked from now on is this step)
                            self.agreement.finishing(step)
                    if sync.finish():
                        break
                    step, t_end = sync.position, None  # (an elastic worker took the job's state)
                    continue
                if self.stop is not None:
                    lost = self.agreement.store_lost if self.agreement is not None else None
                    if lost and not self.stop.is_set():  # (stopping: the stop agreement says why)
                        raise CollectiveError(self._cannot_go_on(step, self._store_lost(lost)))
                    if self._stop_at is None:  # the step every process of the job stops at, once asked
                        if self.agreement is not None:
                            self._stop_at = self.agreement.step_ended(step)
                        elif self.stop.is_set():
                            self._stop_at = step
                    if self._stop_at is not None and step >= self._stop_at:
                        self._stop(step)
                self.hooks.before_step(step + 1)
                if self.profiler is not None:
                    self.profiler.before(step + 1)
                t0 = time.perf_counter()
                losses = self.replicas.forward_backward()
                t1 = time.perf_counter()
                sync.before_update()
                t2 = time.perf_counter()
                self.replicas.update()
                t3 = time.perf_counter()
                counted = sync.after_update(step + 1)
                t4 = time.perf_counter()
                sync.timing["inner_s"] += (t1 - t0) + (t3 - t2)
                sync.timing["comm_wall_s"] += (t2 - t1) + (t4 - t3)
                if not counted:  # the job's state replaced ours: go on from its step
                    self._pending = []
                    step = sync.position
                    continue
                step += 1
                self.steps_run += 1
                if self.profiler is not None and (profiled := self.profiler.after(step)):
                    self.rec.event("profile", **profiled)
                self._pending.append((step, losses, self.replicas.lr(), sync.bytes_sent[0]))
                evaluate_now = cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < cfg.run.steps
                if step % cfg.run.log_every == 0 or evaluate_now:
                    self._flush(step)
                if evaluate_now:
                    self.last_eval = self._eval(step)
                sync.after_step(step)
                if not cfg.elastic.enabled:  # (an elastic worker's sync writes its own and calls the hook)
                    every = cfg.elastic.checkpoint_every
                    if every and step % every == 0:
                        self._flush(step)  # the steps and rounds so far recorded, and counted in it
                        self._write_run_checkpoint(step)
                    self.hooks.after_step(step)
            self._flush(step)
            t_loop_end = time.perf_counter()
            sync.timing["loop_s"] = t_loop_end - self.t_loop
            sync.timing["finish_s"] = t_loop_end - t_end
            final = self._eval(cfg.run.steps)
            finished = True
            bytes_all, digests = self._replica_facts()
        finally:
            if self.profiler is not None and (profiled := self.profiler.stop()):  # the run ended first
                self.rec.event("profile", **profiled)
            if self.bar is not None:
                self.bar.close()
            sync.close(finished)
            self.rec.close()
            if self.topo is not None:
                self.topo.outer.close(finished=finished)
            if self.agreement is not None:  # (after the groups: it may wait for the others' close)
                self.agreement.close(finished)
        if not cfg.elastic.enabled and len(set(digests)) > 1:
            raise RuntimeError(
                f"replicas ended with different global parameters ({digests}); this is a bug in lowcomm"
            )
        summary = self._summary(final, bytes_all, digests, time.time() - t_start)
        if self.leader:
            write_summary(cfg.run.run_dir, summary)
            log.info(
                "run %s done: eval loss %.4f, %s sent per replica, %.0f tokens/s, %.1fs",
                cfg.run.run_dir,
                final,
                human_bytes(summary["bytes_sent_per_replica"]),
                summary["tokens_per_second"],
                summary["wall_seconds"],
            )
        return summary

    def _stop(self, step: int) -> None:
        """``stop`` was set: the checkpoint at ``step`` (when the run writes them; an elastic
        worker's when no round is in flight), the ``stopped`` event, then :class:`Stopped` (the
        run's ``finally`` closes its records and an elastic worker's agent leaves the job)."""
        self._flush(step)
        if self.cfg.elastic.enabled:  # (its sync writes its checkpoints)
            written = self.sync.stop_checkpoint(step) if self.steps_run else None
        else:
            # the processes of a job that stopped together (or one alone) write the step's
            # checkpoints; one that stopped without the others (gone, or hung) holds no common step
            together = self.agreement is None or self.agreement.agreed
            if self.cfg.elastic.checkpoint_every and self.steps_run and together:
                if self.checkpointed is None or self.checkpointed[0] != step:  # (not the step's own)
                    self._write_run_checkpoint(step)
            written = self.checkpointed[1] if self.checkpointed and self.checkpointed[0] == step else None
        lost = list(self.agreement.lost) if self.agreement is not None else []
        apart = self.agreement.apart if self.agreement is not None else None
        why = {"lost": lost, "apart": apart} if apart else {}
        self.rec.event("stopped", step=step, checkpoint=written, **why)
        log.info("stopped at the end of step %d", step)
        raise Stopped(step, written, lost, apart)

    # ---- a static job's checkpoints ------------------------------------------------------------

    def _write_run_checkpoint(self, step: int) -> None:
        """Every replica of this process at ``step``: models, inner optimizers, data positions and
        the sync's state (rounds in flight included), atomically into this process's file.

        The processes of a static job write a step's checkpoints once all of them reached it (a
        barrier in the job's store). Between DiLoCo's rounds they drift apart: a process killed at
        step 75 held its checkpoints of 60 and 70 while the others ran on to the round at 100,
        writing 80 and 90 over theirs of 60 and 70, and the restarted job had no step to resume
        from. Held at 80, the others keep 70."""
        topo = self.topo
        if topo is not None and topo.world_size > 1 and topo.outer.store is not None:
            if self._barrier_step == step:  # (written or skipped: a second count would fill the barrier)
                return
            key = f"lowcomm/checkpoint/{step}"  # (this start's keys: comm.distributed.job_store)
            self._barrier_step = step
            try:
                store_barrier(
                    topo.outer.store, topo.world_size, key, self.cfg.run.timeout, agreement=self.agreement
                )
            except Exception as e:  # a process died or hung, or the store went with its host
                why = one_line(e, 200)
                why = f"a process of the job never reached it ({why})" if isinstance(e, TimeoutError) else why
                self.rec.event("checkpoint", what="skipped", step=step, reason=why)
                if self.stop is None or not self.stop.is_set():  # (stopping: the stop says why)
                    if not isinstance(e, TimeoutError):
                        why = self._store_lost(why)
                    why = f"its checkpoint's barrier failed: {why}"
                    raise CollectiveError(self._cannot_go_on(step, why)) from None
                log.warning("checkpoint at step %d not written: %s", step, why)
                return
        path = run_checkpoint_path(self.cfg)
        state = {
            "format": RUN_FORMAT,
            "step": step,
            "mode": self.cfg.run.mode,
            "replica_ids": list(self.replica_ids),
            "world_size": self.world_size,  # (a job resumed at another size takes replica 0's: regroup)
            "procs_per_replica": self.procs_per_replica,
            "architecture": architecture(self.replicas.models[0]),
            "replicas": self.replicas.state_dict(),
            "sync": self.sync.state_dict(),
            # what was sent so far: a resumed run's records count it (rounds in flight are
            # counted when they complete, after the resume)
            "sent": {"bytes": list(self.sync.bytes_sent), "rounds": self.sync.rounds},
        }
        try:
            if path.exists():  # the one before is kept until this one is whole (see common_checkpoint)
                os.replace(path, previous_checkpoint(path))
            opener = self.hooks.checkpoint_opener(step)  # one that fails under a checkpoint-fail fault
            nbytes = save_state(path, state, **({"opener": opener} if opener is not None else {}))
            self.checkpointed = (step, str(path))
            self.rec.event("checkpoint", what="written", step=step, bytes=nbytes, path=str(path))
        except OSError as e:  # the previous checkpoint is intact: training goes on
            log.warning("checkpoint at step %d failed (the previous one is intact): %s", step, e)
            self.rec.event("checkpoint", what="failed", step=step, reason=str(e)[:300])

    def _cannot_go_on(self, step: int, why: str) -> str:
        """The error of a static job that lost a process or its store at ``step``: training on
        would only reach a collective that fails, later, and write no checkpoint on the way."""
        if self.cfg.elastic.checkpoint_every:
            after = "a restart (--max-restarts) resumes from the last step every process checkpointed"
        else:
            after = "it writes no checkpoints (--checkpoint-every K): a restart begins at step 0"
        return f"step {step}: {why}; the job cannot go on without it: {after}"

    @staticmethod
    def _store_lost(why: str) -> str:
        return (
            f"the job's store stopped answering ({why}): its host is gone (torchrun's agent on the job's "
            "first node, rank 0 under lowcomm launch or srun)"
        )

    def _drop_replaced_files(self) -> None:
        """``overwrite`` replaces the run in ``run_dir``: this process's checkpoints, injected
        faults and TensorBoard event files of the run it replaces go with its records, once the
        new run is under way (a run refused before, by a check or by the coordinator, leaves
        them), so that a later ``--resume auto`` cannot continue the old run under the new one's
        records, nor skip the faults the old run injected, and TensorBoard does not draw the two
        runs as one."""
        elastic = self.cfg.elastic.enabled
        newest = self.sync.ckpt_path if elastic else run_checkpoint_path(self.cfg)
        for path in (newest,) if elastic else (newest, previous_checkpoint(newest)):
            if path.is_file():
                path.unlink()
                log.info("%s removed: a checkpoint of the run --overwrite replaces", path)
        if not elastic and not restart_attempt():  # a restart's kill must not fire again
            faults_path(self.cfg).unlink(missing_ok=True)
        if self.leader:  # TensorBoard draws every event file of its folder as one run
            for path in (Path(self.cfg.run.run_dir) / TENSORBOARD_DIR).glob(TENSORBOARD_FILES):
                path.unlink()

    def _profiler(self) -> StepProfiler | None:
        """The run's ``profile`` steps' profiler (None: not asked for)."""
        steps = parse_profile_steps(self.cfg.run.profile, self.cfg.run.steps)
        if steps is None:
            return None
        return StepProfiler(*steps, profile_stem(self.cfg, *steps), self.device)

    def _restore_run(self, state: dict) -> int:
        """Continue from a static job's checkpoint; returns its step. ValueError (one line, before
        any record) when it does not fit this run."""
        where = f"resume={self.cfg.elastic.resume!r} ({state['path']})"
        regroup = state.get("regroup")  # another replica's checkpoint: common_checkpoint
        ids = None if regroup else list(self.replica_ids)
        if state.get("mode") != self.cfg.run.mode or (ids is not None and state.get("replica_ids") != ids):
            saved = f"a {state.get('mode')!r} run of replicas {state.get('replica_ids')}"
            raise ValueError(
                f"{where}: the checkpoint is of {saved}, "
                f"this is a {self.cfg.run.mode!r} run of replicas {list(self.replica_ids)}"
            )
        step, steps = int(state["step"]), self.cfg.run.steps
        if step >= steps:  # it would only rewrite the run's records (a summary of no steps)
            raise ValueError(
                f"{where}: the checkpoint is at step {step} and steps={steps}: nothing is left to "
                f"train; give steps above {step} to train on"
            )
        check_architecture(state.get("architecture"), self.replicas.models[0], where)
        try:
            self.replicas.load_state_dict(state["replicas"], data=not regroup)
            self.sync.load_state_dict(state["sync"], own=not regroup)
        except (RuntimeError, KeyError, TypeError, ValueError) as e:  # another model's or configuration's
            why = one_line(e, 400)  # torch's load errors span lines: one line here
            raise ValueError(f"{where}: the checkpoint does not fit this run: {why}") from None
        if regroup:
            self.replicas.skip(step)  # (its own data stream, at the job's step)
            if self.leader:
                lost = (
                    "every replica starts from the global parameters of that step (what the replicas "
                    "trained since their last round is not kept)"
                    if self.cfg.run.mode == "diloco"
                    else "every replica starts from replica 0's parameters and optimizer (nothing is lost)"
                )
                log.warning(
                    "resuming at step %d from replica 0's checkpoint(s), written by a job of %d process(es); "
                    "this one has %d: %s",
                    step,
                    regroup,
                    self.world_size,
                    lost,
                )
        sent = state.get("sent")  # (a checkpoint of an older lowcomm has none: counted from here)
        if sent is not None and len(sent["bytes"]) == len(self.sync.bytes_sent):
            self.sync.bytes_sent = [int(b) for b in sent["bytes"]]
            self.sync.rounds = int(sent["rounds"])
        self.replicas.seek(step)
        return step

    def _progress(self, start: int) -> None:
        if self.progress and self.leader:
            from tqdm.auto import tqdm

            cfg = self.cfg
            mode = cfg.run.mode  # Streaming DiLoCo is DiLoCo in fragments: named as users know it
            if mode == "diloco" and cfg.diloco.fragments > 1:
                mode = f"streaming P={cfg.diloco.fragments}"
            desc = f"worker {self.worker_id}" if cfg.elastic.enabled else f"{mode} M={self.num_replicas}"
            self.bar = tqdm(
                total=cfg.run.steps, initial=start, desc=desc, unit="step", dynamic_ncols=True, leave=False
            )

    def _flush(self, step: int) -> None:
        """Read the steps' losses back from the device (one host sync for all of them), record
        them and the rounds completed since the last flush, check them, and update the bar."""
        self._drain_rounds(step)
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        means = torch.stack([losses.mean() for _, losses, _, _ in pending]).tolist()
        for (step, _, lr, sent), loss in zip(pending, means):
            self.rec.event(
                "step", step=step, loss=loss, lr=lr, tokens=step * self.tokens_per_step, bytes_sent=sent
            )
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss} at step {step}")
        if self.bar is not None:
            elapsed = time.perf_counter() - self.t_loop
            rate = self.steps_run * self.tokens_per_step / elapsed if elapsed else 0.0
            self.bar.n = pending[-1][0]
            self.bar.set_postfix(
                loss=f"{means[-1]:.3f}",
                eval="-" if self.last_eval is None else f"{self.last_eval:.3f}",  # "-": none yet
                tok_s=f"{rate:,.0f}",
                sent=human_bytes(self.sync.bytes_sent[0]),
                refresh=False,  # (one refresh below, not two)
            )
            self.bar.refresh()

    def _drain_rounds(self, step: int) -> None:
        if isinstance(self.sync, DiLoCoSync):
            self.sync.drain_rounds(step, self.replica_ids)

    def _eval(self, step: int) -> float:
        """Evaluate the global parameters (the leader only; the others return nan)."""
        if not self.leader:
            return float("nan")
        with self.sync.global_parameters() as model:
            loss = evaluate(model, self.val, self.device, self.dtype)
        self.rec.eval(step=step, tokens=step * self.tokens_per_step, loss=loss)
        return loss

    def _replica_facts(self) -> tuple[list[int], list[str]]:
        """Bytes sent by every replica of the job and a digest of each one's global parameters."""
        digests = self.sync.digests()
        if self.topo is None:
            return self.sync.bytes_sent, digests
        facts = self.topo.outer.all_gather_json(
            {"bytes": self.sync.bytes_sent[0], "digest": digests[0] if digests else None}
        )
        return [f["bytes"] for f in facts], [f["digest"] for f in facts if f["digest"] is not None]

    def _summary(self, final: float, bytes_all: list[int], digests: list[str], wall: float):
        cfg, sync = self.cfg, self.sync
        timing = sync.timing
        tokens = self.steps_run * self.tokens_per_step  # this process's: its speed
        # what the model was trained on: a static job resumed also counts the steps before its
        # checkpoint; an elastic worker resumed, the steps it trained before its own
        before = self.start_step if self.resumed is not None else self.sync.steps_before
        trained = tokens + before * self.tokens_per_step
        dp = cfg.run.mode == "dp"
        loop_s = timing["loop_s"]
        steps_s = loop_s - timing["finish_s"]
        tokens_per_second = tokens / loop_s if loop_s else 0.0
        peak = peak_flops(self.device)
        return {
            "mode": cfg.run.mode,
            "elastic": False,
            "replicas": self.num_replicas,
            "procs_per_replica": self.procs_per_replica,
            "sync_every": 1 if dp else cfg.diloco.sync_every,
            "fragments": 1 if dp else cfg.diloco.fragments,
            "overlap": 0 if dp else cfg.diloco.overlap,
            "alpha": cfg.diloco.alpha,
            "outer_lr": cfg.diloco.outer_lr,
            "codec": "fp32" if dp else cfg.diloco.codec,
            "precision": cfg.model.precision,
            # where the low-precision layers ran their GEMMs: scaled_mm (cuBLAS fp8 / MX), triton,
            # dequant (exact MX through bf16 GEMMs) or emulated; null for fp32
            "precision_backend": (
                None if cfg.model.precision == "fp32" else layer_backend(cfg.model.precision, self.device)
            ),
            "dtype": str(self.dtype).removeprefix("torch."),
            "compile": cfg.run.compile,
            "replica_batching": "batched" if self.replicas.batched else "sequential",
            "device": self.device_name,
            "params": self.params,
            "params_non_embedding": self.params_ne,
            "model_dim": cfg.model.dim,
            "layers": cfg.model.layers,
            "tokens": trained,
            "steps": cfg.run.steps,
            "steps_run": self.steps_run,
            "batch_size": cfg.data.batch_size,
            "seq_len": cfg.model.seq_len,
            "lr": cfg.optim.lr,
            "final_eval_loss": final,
            "bytes_sent_per_replica": sum(bytes_all) / len(bytes_all),
            "global_params_sha256": digests[0] if digests else None,
            "rounds": sync.rounds,
            "flops": self.flops_per_token * trained,
            "wall_seconds": wall,
            "step_seconds": loop_s / max(self.steps_run, 1),
            "tokens_per_second": tokens_per_second,
            # model FLOPs utilization: 6·N·tokens/s over the device's dense bf16 peak (null: unknown)
            "mfu": 6 * self.params * tokens_per_second / peak if peak else None,
            "peak_memory_bytes": peak_memory_bytes(self.device),
            # the share of the training loop's wall time not spent waiting for communication
            "comm_free_fraction": timing["inner_s"] / loop_s if loop_s else None,
            # the share of the steps' time (the loop less the end's sync) spent waiting for a
            # round's result; the end's rounds have no step left to hide behind (timing's
            # finish_s). DP: null (its gradients' mean is part of every step)
            "wait_fraction": None if dp or not steps_s else timing["steps_wait_s"] / steps_s,
            # the same for the GPU: the share of the steps' time its training stream stood still
            # for a round (timed by CUDA events; the host's wait costs nothing while the GPU
            # still has queued work). Null where not timed: CPU, one process's replicas
            "device_wait_fraction": (
                timing["steps_device_wait_s"] / steps_s if sync.device_waits and steps_s and not dp else None
            ),
            "timing": timing,
            "seed": cfg.run.seed,
            "corpus": self.corpus.name,
            "link_bandwidth": cfg.link.bandwidth,
            "link_latency": cfg.link.latency,
            "lowcomm_version": __version__,
            **sync.summary(),
        }


#: a static job's checkpoint (an elastic worker's is lowcomm-worker/1)
RUN_FORMAT = "lowcomm-run/1"


def profile_stem(cfg: TrainConfig, first: int, last: int) -> Path:
    """Where ``--profile`` writes this process's trace and table, less the suffix
    (profile-steps<first>-<last>[-rank<RANK>])."""
    return _process_file(cfg, f"profile-steps{first}-{last}", "")


def _process_file(cfg: TrainConfig, stem: str, suffix: str, rank: int | None = None) -> Path:
    """This process's own file in the run directory (or, with ``rank``, that process's of the
    job): run_dir/{stem}{suffix} for one process, run_dir/{stem}-rank{RANK}{suffix} for each
    process of a launched job."""
    if rank is None and not is_distributed_env():
        return Path(cfg.run.run_dir) / f"{stem}{suffix}"
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    return Path(cfg.run.run_dir) / f"{stem}-rank{rank}{suffix}"


def run_checkpoint_path(cfg: TrainConfig, rank: int | None = None) -> Path:
    """This process's checkpoint file in a static job (checkpoint[-rank<RANK>].lcs), or with
    ``rank`` that process's."""
    return _process_file(cfg, "checkpoint", ".lcs", rank)


def faults_path(cfg: TrainConfig) -> Path:
    """Where a static job's process appends the faults it injected, as JSON lines
    (faults[-rank<RANK>].jsonl)."""
    return _process_file(cfg, "faults", ".jsonl")


def injected_faults(path: Path) -> set[int]:
    """The ids of the faults :func:`faults_path` says were injected (none if it does not exist; a
    line torn by a kill mid-write is skipped)."""
    done: set[int] = set()
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                done.add(int(json.loads(line)["id"]))
            except (ValueError, KeyError, TypeError):
                continue
    return done


def previous_checkpoint(path: Path) -> Path:
    """Where the checkpoint before ``path``'s is kept (checkpoint.lcs -> checkpoint.prev.lcs)."""
    return path.with_name(path.stem + ".prev" + path.suffix)


def read_run_checkpoint(cfg: TrainConfig, *, before: bool = False) -> dict | None:
    """The checkpoint a static job's ``resume`` names, read and checked, with its ``path`` added:
    an explicit file, a run directory's newest, or with ``auto`` this process's newest (None: a fresh
    start); a damaged newest one is passed over, with a warning, for the one before. ``before``: the
    one before the newest (None if there is none or it is damaged).

    Raises:
        ValueError: an explicit file in a job of several processes (each has its own: ``auto``).
        FileNotFoundError: an explicit checkpoint that does not exist.
        CorruptStateError: a damaged, truncated or foreign file, explicit or the only one there
            is (nothing has been written yet).
    """
    resume = cfg.elastic.resume
    if not resume:
        return None
    if resume != "auto" and is_distributed_env():
        raise ValueError(
            f"resume={resume!r} is not allowed: 'auto' in a job of several processes (each resumes from "
            "its own run_dir/checkpoint-rank<RANK>.lcs)"
        )
    if resume == "auto":
        newest = run_checkpoint_path(cfg)
    elif Path(resume).is_dir():  # a run directory: its newest checkpoint, or the one before as with auto
        newest = Path(resume) / run_checkpoint_path(cfg).name
        if not (newest.is_file() or previous_checkpoint(newest).is_file()):
            raise FileNotFoundError(
                f"resume={resume!r}: the folder holds no {newest.name} nor "
                f"{previous_checkpoint(newest).name} (a run's checkpoints)"
            )
    elif Path(resume).is_file():
        return _read_run_checkpoint(Path(resume))
    else:
        raise FileNotFoundError(f"resume={resume!r}: {str(Path(resume))!r} is not a checkpoint file")
    paths = [previous_checkpoint(newest)] if before else [newest, previous_checkpoint(newest)]
    damaged = None
    for path in paths:
        if path.exists():
            try:
                state = _read_run_checkpoint(path)
            except CorruptStateError as e:
                damaged = damaged or e
                continue
            if damaged is not None:
                log.warning("%s; resuming from the checkpoint before it", damaged)
            return state
    if damaged is not None and not before:
        raise damaged
    return None


def _read_run_checkpoint(path: Path) -> dict:
    state = load_state(path)
    if not isinstance(state, dict) or state.get("format") != RUN_FORMAT:
        raise CorruptStateError(
            f"{path}: not a checkpoint of a lowcomm train run (an elastic worker's needs --coordinator)"
        )
    return {**state, "path": str(path)}


def common_checkpoint(cfg: TrainConfig, newest: dict | None, topo: Topology) -> dict | None:
    """The checkpoint every process of a static job resumes from: the newest step all of them
    hold, agreed over the world (a process killed while the others wrote theirs holds the step
    before, which is then read too); ValueError naming each rank's steps when there is none.

    A job that comes back with another number of processes (``torchrun --nnodes MIN:MAX`` after
    a node was lost, or with a node back) finds rank 0's newest checkpoint written by a job of
    another size: each process then resumes from replica 0's (:func:`_regroup_checkpoint`)."""
    import torch.distributed as dist

    def gather(mine: list) -> list[list]:
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, mine)
        return out

    world = topo.world_size
    held = [newest] if newest is not None else []
    # each process's (step, world size) held (a checkpoint of an older lowcomm names no world
    # size: this job's)
    facts = gather([[int(c["step"]), int(c.get("world_size", world))] for c in held])
    if facts[0] and facts[0][0][1] != world:
        return _regroup_checkpoint(cfg, topo, *facts[0][0], newest)
    steps = [[s for s, _ in f] for f in facts]
    if all(s == steps[0] for s in steps):  # the usual case: one checkpoint read per process
        return newest
    if newest is not None and newest["path"] == str(run_checkpoint_path(cfg)):
        before = read_run_checkpoint(cfg, before=True)
        held += [before] if before is not None else []
    try:
        step = newest_common_step(gather([int(c["step"]) for c in held]), "rank")
    except ValueError as e:
        raise ValueError(f"resume='auto': {e}") from None
    return next(c for c in held if int(c["step"]) == step)


def _regroup_checkpoint(
    cfg: TrainConfig, topo: Topology, step: int, saved_world: int, newest: dict | None
) -> dict:
    """The checkpoint a process resumes from in a job whose size changed: that of replica 0's
    process at its place in the replica (rank ``local_rank``) at ``step``, rank 0's newest, with
    ``regroup`` (the size of the job that wrote it) added (``newest``, this process's own, read
    already, where it is that one). Every replica then takes the job's part of it
    (:meth:`lowcomm.DiLoCo.load_state_dict`, ``own`` False). ValueError when it is not there (a
    run_dir the nodes do not share) or its replicas had another number of processes."""
    source = run_checkpoint_path(cfg, rank=topo.local_rank)
    what = f"resume='auto': the checkpoints were written by a job of {saved_world} process(es), this one has "
    what += f"{topo.world_size}; each process resumes from replica 0's checkpoint at step {step}"
    for path in (source, previous_checkpoint(source)):
        try:
            if newest is not None and newest["path"] == str(path):
                state = newest
            else:
                state = _read_run_checkpoint(path) if path.is_file() else None
        except CorruptStateError:
            continue
        if state is None or int(state["step"]) != step:
            continue
        k = int(state.get("procs_per_replica", 1))
        if k != topo.procs_per_replica:
            raise ValueError(
                f"{what}, and its replicas had {k} process(es) each, this job's have "
                f"{topo.procs_per_replica}: resume with procs_per_replica the same"
            )
        return {**state, "regroup": saved_world}
    raise ValueError(f"{what}, which {source} does not hold here (the job's nodes must share run_dir)")


#: dense bf16 tensor-core peaks, FLOP/s, by a substring of the device name, the first that matches
#: (NVIDIA's data sheets, which give twice these "with sparsity"; docs/references.md): the PCIe
#: and NVL H100s run lower clocks than the SXM one, and a GB200's GPU is not a B200's
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "H200": 989e12,  # GH200's GPU too
    "H800": 989e12,
    "A100": 312e12,
    "GB200": 2500e12,
    "B200": 2250e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak (None where unknown, a CPU among them)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def peak_memory_bytes(device: torch.device) -> int:
    """The most memory the run held: allocated on the GPU, or the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
