"""One worker of an elastic job: ``lowcomm train --coordinator tcp://host:29400 ...``.

The worker is one replica (one process): the reference model, inner AdamW, its own data stream
(picked by its worker id), the DiLoCo wrapper over an :class:`~lowcomm.runtime.agent.ElasticGroup`.
It may start at any time: the first members of a fresh job start from the seed's initial model;
any later one (or one that fell out of sync) first receives the job's state from a live member,
sets its local parameters to the global ones and continues from the donor's step. At every
quiet step (no round in flight) it serves the joiners the coordinator assigned to it.

Each worker writes its own run directory (config.json, events.jsonl with rounds, membership
changes and transfers, eval.jsonl, summary.json with the digest of its global parameters).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..comm.distributed import LinkEmulator
from ..lm import BatchSampler, eval_batches, load_corpus
from .agent import ElasticGroup, ResyncRequired, WorkerAgent, job_state, load_job_state
from .config import TrainConfig
from .faults import FaultInjector
from .metrics import RunRecorder, human_bytes, write_summary
from .protocol import load_key
from .trainer import _build_diloco, _inner_update, build_inner_optimizer, build_model, evaluate, lr_lambda
from .transfer import load_state, save_state

__all__ = ["train_elastic", "data_stream"]

log = logging.getLogger(__name__)


def data_stream(worker_id: str) -> int:
    """The data stream of a worker: a stable function of its id."""
    return int(hashlib.sha256(worker_id.encode()).hexdigest()[:8], 16) % (1 << 31)


def train_elastic(
    cfg: TrainConfig, *, progress: bool = True, key: bytes | None = None, hooks=None
) -> dict[str, Any]:
    """Run one elastic worker until the job's last step; returns its summary.

    Args:
        cfg: the configuration (``cfg.coordinator`` set).
        key: the job key (default: $LOWCOMM_KEY / $LOWCOMM_KEY_FILE).
        hooks: optional fault-injection hooks (see :mod:`lowcomm.runtime.faults`).
    """
    t_start = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device == "cuda" else "cpu")
    key = key if key is not None else load_key()
    corpus = load_corpus(cfg.corpus)
    worker_id = cfg.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    model = build_model(cfg, corpus.vocab_size).to(device)
    opt = build_inner_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    sampler = BatchSampler(corpus.train, cfg.batch_size, cfg.seq_len, cfg.seed, data_stream(worker_id))
    val = eval_batches(corpus.val, cfg.eval_batches, cfg.batch_size, cfg.seq_len)
    params = model.num_params()
    rec = RunRecorder(
        cfg.run_dir,
        {
            **cfg.to_dict(),
            "worker_id": worker_id,
            "corpus_name": corpus.name,
            "corpus_sha256": corpus.sha256,
            "vocab_size": corpus.vocab_size,
            "params": params,
            "params_non_embedding": model.num_params(non_embedding=True),
            "lowcomm_version": __version__,
            "torch_version": torch.__version__,
        },
        append=bool(cfg.resume) or bool(os.environ.get("LOWCOMM_RESTARTED")),
    )
    agent = WorkerAgent(
        cfg.coordinator, key, worker_id, cfg.advertise_addr, heartbeat_s=cfg.heartbeat, record=rec.event
    )
    if hooks is None:
        hooks = FaultInjector.from_env(worker_id, record=rec.event)
    group = ElasticGroup(agent, LinkEmulator.parse(cfg.link_bandwidth, cfg.link_latency))
    if hooks is not None:
        hooks.attach(agent, group)
    diloco = _build_diloco(cfg, model, opt, group)
    ckpt_path = Path(cfg.run_dir) / "checkpoint.lcs"
    lr_at = lr_lambda(cfg)
    tokens_per_step = cfg.batch_size * cfg.seq_len

    def snapshot() -> dict:
        """What a joiner receives (taken with no round in flight)."""
        return {**job_state(diloco, group), "inner": opt.state_dict() if cfg.transfer_inner_state else None}

    def checkpoint() -> dict:
        """Everything this worker needs to continue bit for bit: a joiner's state and its own."""
        return {
            **snapshot(),
            "format": "lowcomm-worker/1",
            "worker_id": worker_id,
            "model": dict(model.state_dict()),
            "inner": opt.state_dict(),
            "sampler": sampler.state_dict(),
        }

    def restore(state: dict, joiner: bool) -> None:
        """The job-wide part of a state: round counter, DiLoCo state, inner state, schedule position."""
        load_job_state(diloco, group, state, joiner=joiner)
        if state.get("inner") is not None:
            opt.load_state_dict(state["inner"])
        step = sched.last_epoch = diloco.step_count
        for g, base in zip(opt.param_groups, sched.base_lrs):
            g["lr"] = base * lr_at(step)

    def resume(state: dict) -> None:
        if state.get("format") != "lowcomm-worker/1":
            raise ValueError(f"{cfg.resume}: not a lowcomm worker checkpoint")
        restore(state, joiner=False)
        model.load_state_dict(state["model"])
        sampler.load_state_dict(state["sampler"])
        rec.event("checkpoint", what="resumed", step=diloco.step_count, round=group.next_round)

    def load(state: dict) -> None:
        restore(state, joiner=True)

    bytes_sent, rounds, transfers_in, resyncs = 0, 0, [], 0
    last_eval = float("nan")
    bar = None
    finished = False
    resume_from = None
    if cfg.resume:
        resume_from = ckpt_path if cfg.resume == "auto" else Path(cfg.resume)
        if cfg.resume == "auto" and not resume_from.exists():
            resume_from = None  # nothing written yet: a fresh start
    if resume_from is not None:
        resume(load_state(resume_from))  # raises CorruptStateError naming the file if it is damaged
    try:
        if not agent.start(fresh=True):
            transfers_in.append(agent.join(load))
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=diloco.step_count, desc=f"worker {worker_id}", unit="step")
        t_loop = time.perf_counter()
        steps_run = 0
        loss = torch.tensor(float("nan"))
        while True:
            try:
                if diloco.step_count >= cfg.steps:  # the end: apply (and, with final_sync, send) the rest
                    diloco.finish() if cfg.final_sync else diloco.apply_due(final=True)
                    bytes_sent, rounds = _record_rounds(rec, diloco, group, bytes_sent, rounds)
                    break
                if hooks is not None:
                    hooks.before_step(diloco.step_count + 1)
                x, y = sampler.next()
                loss = model(x.to(device), y.to(device))
                loss.backward()
                _inner_update(cfg, model, opt, sched)
                steps_run += 1
                diloco.step()
            except ResyncRequired as e:
                resyncs += 1
                rec.event("membership", what="resync", step=diloco.step_count, reason=str(e)[:300])
                transfers_in.append(agent.join(load))
                continue
            step = agent.step = diloco.step_count
            bytes_sent, rounds = _record_rounds(rec, diloco, group, bytes_sent, rounds)
            rec.event(
                "step", step=step, loss=float(loss.detach()), lr=sched.get_last_lr()[0], bytes_sent=bytes_sent
            )
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                with diloco.global_parameters():
                    last_eval = evaluate(model, val, device)
                rec.eval(step=step, tokens=step * tokens_per_step, loss=last_eval)
            if hooks is not None:
                hooks.after_step(step)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and diloco.in_flight == 0:
                fail_after = hooks.checkpoint_write(step) if hooks is not None else None
                try:
                    nbytes = save_state(ckpt_path, checkpoint(), _fail_after=fail_after)
                    rec.event("checkpoint", what="written", step=step, bytes=nbytes, path=str(ckpt_path))
                except OSError as e:
                    log.warning("checkpoint at step %d failed (the previous one is intact): %s", step, e)
                    rec.event("checkpoint", what="failed", step=step, reason=str(e)[:300])
            if diloco.in_flight == 0:
                agent.serve_pending(snapshot)
            if bar is not None:
                bar.n = step
                bar.set_postfix(loss=f"{float(loss):.3f}", eval=f"{last_eval:.3f}", size=group.size)
                bar.refresh()
        loop_s = time.perf_counter() - t_loop
        with diloco.global_parameters():
            final = evaluate(model, val, device)
        rec.eval(step=cfg.steps, tokens=cfg.steps * tokens_per_step, loss=final)
        agent.serve_pending(snapshot)
        finished = True
    finally:
        if bar is not None:
            bar.close()
        agent.close(leave=True, finished=finished)
        rec.close()
    digest = hashlib.sha256(diloco.global_vector().cpu().numpy().tobytes()).hexdigest()
    summary = {
        "mode": "diloco",
        "elastic": True,
        "worker_id": worker_id,
        "replicas": group.size,
        "sync_every": cfg.sync_every,
        "fragments": cfg.fragments,
        "overlap": cfg.overlap,
        "codec": cfg.codec,
        "params": params,
        "params_non_embedding": model.num_params(non_embedding=True),
        "model_dim": cfg.model_dim,
        "layers": cfg.layers,
        "steps": cfg.steps,
        "steps_run": steps_run,
        "tokens": steps_run * tokens_per_step,
        "final_eval_loss": final,
        "bytes_sent_per_replica": bytes_sent,
        "global_params_sha256": digest,
        "rounds": rounds,
        "rounds_redone": group.rounds_redone,
        "resyncs": resyncs,
        "transfers_in": transfers_in,
        "wall_seconds": time.time() - t_start,
        "step_seconds": loop_s / max(steps_run, 1),
        "seed": cfg.seed,
        "lowcomm_version": __version__,
    }
    write_summary(cfg.run_dir, summary)
    log.info("worker %s done: eval %.4f, %s sent", worker_id, final, human_bytes(bytes_sent))
    return summary


def _record_rounds(rec, diloco, group, bytes_sent: int, rounds: int) -> tuple[int, int]:
    for rs in diloco.drain_round_stats():
        bytes_sent += rs.bytes_sent
        rounds += 1
        rec.event("round", step=diloco.step_count, size=group.size, **rs.to_dict())
    return bytes_sent, rounds
