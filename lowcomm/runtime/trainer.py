"""The reference trainer behind ``lowcomm train``: M replicas of the reference GPT in one process.

Each replica has its own model, AdamW and data stream (seeded by (seed, rank)) and talks to the
others only through its LocalGroup handle, exactly as it would through a distributed group.

``mode="diloco"``: inner AdamW steps, then :func:`lowcomm.optim.step_replicas` (DiLoCo wrapper).
``mode="dp"``: after every backward the gradients are mean-all-reduced in fp32 through the same
group, then clipped and applied: the data-parallel baseline at equal tokens.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import time
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..comm import LocalGroup, get_codec
from ..comm.distributed import LinkEmulator
from ..kernels import convert_to_low_precision
from ..lm import GPT, BatchSampler, GPTConfig, eval_batches, load_corpus
from ..optim import DiLoCo, finish_replicas, step_replicas
from .config import TrainConfig
from .launch import Topology, init_from_torchrun, is_distributed_env
from .metrics import NullRecorder, RunRecorder, human_bytes, write_summary

__all__ = ["train", "build_model", "build_inner_optimizer", "evaluate", "lr_lambda"]

log = logging.getLogger(__name__)


def build_model(cfg: TrainConfig, vocab_size: int) -> GPT:
    """The reference GPT for ``cfg``, initialized from ``cfg.seed`` (identical for every replica)."""
    gcfg = GPTConfig(
        vocab_size=vocab_size, seq_len=cfg.seq_len, n_layer=cfg.layers, n_head=cfg.heads, n_embd=cfg.model_dim
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = GPT(gcfg)
    convert_to_low_precision(model, cfg.precision)  # no-op for fp32; the head stays full precision
    return model


def build_inner_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, β = (0.9, 0.99), decay on matrices only (the scaling-law study's inner optimizer)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), eps=1e-8)


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up to 1, then cosine to ``min_lr_ratio`` at the last step."""

    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        span = max(cfg.steps - cfg.warmup, 1)
        progress = min((step - cfg.warmup) / span, 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> float:
    """Mean cross-entropy (nats per token) over fixed validation batches."""
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in batches:
        total += float(model(x.to(device), y.to(device)))
    model.train(was_training)
    return total / len(batches)


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


def _build_diloco(
    cfg: TrainConfig, model: nn.Module, opt: torch.optim.Optimizer, group, shard_group=None
) -> DiLoCo:
    return DiLoCo(
        model,
        opt,
        group,
        sync_every=cfg.sync_every,
        fragments=cfg.fragments,
        pattern=cfg.pattern,
        overlap=cfg.overlap,
        alpha=cfg.alpha,
        outer_lr=cfg.outer_lr,
        outer_momentum=cfg.outer_momentum,
        codec=cfg.codec,
        codec_block=cfg.codec_block,
        error_feedback=cfg.error_feedback,
        reduce=cfg.reduce,
        outer_device=cfg.outer_device,
        shard_group=shard_group,
    )


def _topology(cfg: TrainConfig, topology: Topology | None) -> Topology | None:
    link = LinkEmulator.parse(cfg.link_bandwidth, cfg.link_latency)
    if topology is None and is_distributed_env():
        topology = init_from_torchrun(cfg.procs_per_replica, link=link, timeout_s=cfg.timeout)
    if topology is None and link is not None:
        raise ValueError(
            f"link_bandwidth={cfg.link_bandwidth!r} / link_latency={cfg.link_latency!r} emulate a network "
            "between processes: run the job under 'lowcomm launch' or torchrun"
        )
    if topology is not None and cfg.replicas != topology.num_replicas:
        log.info("replicas=%d ignored: the job has %d replicas", cfg.replicas, topology.num_replicas)
    return topology


def train(cfg: TrainConfig, *, progress: bool = True, topology: Topology | None = None) -> dict[str, Any]:
    """Run one training job and write its run directory; returns the summary.

    In one process (the default) all ``cfg.replicas`` replicas run here over a LocalGroup. Under
    torchrun or ``lowcomm launch`` (WORLD_SIZE > 1) each process runs its share of one replica
    over a DistributedGroup; rank 0 writes the records. Both give the same bits for the same
    configuration.

    Raises:
        ValueError / FileNotFoundError: bad configuration or corpus, before any training step.
    """
    t_start = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(
        "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    corpus = load_corpus(cfg.corpus)
    topo = _topology(cfg, topology)
    base = build_model(cfg, corpus.vocab_size).to(device)
    if topo is None:
        M, mine, groups, leader = (
            cfg.replicas,
            list(range(cfg.replicas)),
            LocalGroup.create(cfg.replicas),
            True,
        )
        stream = mine
    else:
        M, mine, groups, leader = topo.num_replicas, [topo.replica], [topo.outer], topo.is_leader
        k = topo.procs_per_replica
        stream = [topo.replica if k == 1 else topo.replica * k + topo.local_rank]
    models = [copy.deepcopy(base) for _ in mine]
    opts = [build_inner_optimizer(m, cfg) for m in models]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(cfg)) for o in opts]
    samplers = [BatchSampler(corpus.train, cfg.batch_size, cfg.seq_len, cfg.seed, r) for r in stream]
    runners: list[nn.Module] = models
    if topo is not None and topo.inner is not None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        runners = [DDP(m, process_group=topo.inner) for m in models]
    inner = topo.inner if topo is not None else None  # with inner DDP each process syncs its shard
    dilocos = (
        [_build_diloco(cfg, m, o, g, inner) for m, o, g in zip(models, opts, groups)]
        if cfg.mode == "diloco"
        else []
    )
    val = eval_batches(corpus.val, cfg.eval_batches, cfg.batch_size, cfg.seq_len)
    fp32 = get_codec("fp32")
    params = base.num_params()
    params_ne = base.num_params(non_embedding=True)
    per_replica_batch = cfg.batch_size * (topo.procs_per_replica if topo else 1)
    tokens_per_step = M * per_replica_batch * cfg.seq_len

    config_record = {
        **cfg.to_dict(),
        "replicas": M,
        "procs_per_replica": topo.procs_per_replica if topo else 1,
        "world_size": topo.world_size if topo else 1,
        "corpus_name": corpus.name,
        "corpus_sha256": corpus.sha256,
        "vocab_size": corpus.vocab_size,
        "params": params,
        "params_non_embedding": params_ne,
        "lowcomm_version": __version__,
        "torch_version": torch.__version__,
        "fragment_numels": dilocos[0].fragment_numels() if dilocos else [params],
    }
    rec = RunRecorder(cfg.run_dir, config_record) if leader else NullRecorder()
    bytes_sent = [0] * len(mine)
    timing = dict.fromkeys(TIMING_KEYS, 0.0)
    rounds = 0
    last_eval = float("nan")

    def eval_global(step: int) -> float:
        if not leader:
            return float("nan")
        with dilocos[0].global_parameters() if dilocos else contextlib.nullcontext():
            loss = evaluate(models[0], val, device)
        rec.eval(step=step, tokens=step * tokens_per_step, loss=loss)
        return loss

    def record_rounds(step: int) -> None:
        nonlocal rounds
        for i, d in enumerate(dilocos):
            for rs in d.drain_round_stats():
                bytes_sent[i] += rs.bytes_sent
                if i == 0:
                    rounds += 1
                    for key in ("send_s", "encode_s", "decode_s", "outer_s", "comm_s", "wait_s"):
                        timing[key] += getattr(rs, key)
                rec.event("round", replica=mine[i], step=step, **rs.to_dict())

    bar = None
    if progress and leader:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc=f"{cfg.mode} M={M}", unit="step", dynamic_ncols=True, leave=False)
    try:
        t_loop = time.perf_counter()
        for step in range(1, cfg.steps + 1):
            t0 = time.perf_counter()
            losses = []
            for i, runner in enumerate(runners):
                x, y = samplers[i].next()
                loss = runner(x.to(device), y.to(device))
                loss.backward()
                losses.append(float(loss.detach()))
                if cfg.mode == "diloco":
                    _inner_update(cfg, models[i], opts[i], scheds[i])
            if cfg.mode == "dp":
                t_dp = time.perf_counter()
                works = [g.all_reduce_mean(_flat_grads(m), fp32) for g, m in zip(groups, models)]
                for i, (m, w) in enumerate(zip(models, works)):
                    _set_grads(m, w.wait())
                    bytes_sent[i] += w.stats.bytes_sent
                    _inner_update(cfg, m, opts[i], scheds[i])
                timing["comm_wall_s"] += time.perf_counter() - t_dp
                for key in ("encode_s", "decode_s", "comm_s"):
                    timing[key] += getattr(works[0].stats, key)
            timing["inner_s"] += time.perf_counter() - t0
            if dilocos:
                t_sync = time.perf_counter()
                step_replicas(dilocos)
                timing["comm_wall_s"] += time.perf_counter() - t_sync
                record_rounds(step)
            mean_loss = sum(losses) / len(losses)
            rec.event(
                "step",
                step=step,
                loss=mean_loss,
                lr=scheds[0].get_last_lr()[0],
                tokens=step * tokens_per_step,
                bytes_sent=bytes_sent[0],
            )
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"training loss became {mean_loss} at step {step}")
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                last_eval = eval_global(step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{mean_loss:.3f}", eval=f"{last_eval:.3f}", sent=human_bytes(bytes_sent[0])
                )
        timing["loop_s"] = time.perf_counter() - t_loop
        if dilocos and cfg.final_sync:
            finish_replicas(dilocos)
            record_rounds(cfg.steps)
        final = eval_global(cfg.steps)
        bytes_all, digests = _gather_replica_facts(topo, bytes_sent, dilocos)
    finally:
        if bar is not None:
            bar.close()
        rec.close()
        if topo is not None:
            topo.outer.close()
    if dilocos and len(set(digests)) != 1:
        raise RuntimeError(
            f"replicas ended with different global parameters ({digests}); this is a bug in lowcomm"
        )
    wall = time.time() - t_start
    tokens = cfg.steps * tokens_per_step
    # the share of the training loop's wall time spent computing (the rest waited for the network)
    compute = timing["inner_s"] - (timing["comm_wall_s"] if cfg.mode == "dp" else 0.0)
    summary = {
        "mode": cfg.mode,
        "replicas": M,
        "procs_per_replica": topo.procs_per_replica if topo else 1,
        "sync_every": cfg.sync_every if cfg.mode == "diloco" else 1,
        "fragments": cfg.fragments if cfg.mode == "diloco" else 1,
        "overlap": cfg.overlap if cfg.mode == "diloco" else 0,
        "alpha": cfg.alpha,
        "outer_lr": cfg.outer_lr,
        "codec": cfg.codec if cfg.mode == "diloco" else "fp32",
        "precision": cfg.precision,
        "params": params,
        "params_non_embedding": params_ne,
        "model_dim": cfg.model_dim,
        "layers": cfg.layers,
        "tokens": tokens,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "lr": cfg.lr,
        "final_eval_loss": final,
        "bytes_sent_per_replica": sum(bytes_all) / len(bytes_all),
        "global_params_sha256": digests[0] if digests else None,
        "rounds": rounds,
        "flops": 6 * params_ne * tokens,
        "wall_seconds": wall,
        "step_seconds": timing["loop_s"] / cfg.steps,
        "compute_utilization": compute / timing["loop_s"] if timing["loop_s"] else None,
        "timing": timing,
        "seed": cfg.seed,
        "corpus": corpus.name,
        "link_bandwidth": cfg.link_bandwidth,
        "link_latency": cfg.link_latency,
        "lowcomm_version": __version__,
    }
    if leader:
        write_summary(cfg.run_dir, summary)
        log.info(
            "run %s done: eval loss %.4f, %s sent per replica, %.1fs",
            cfg.run_dir,
            final,
            human_bytes(summary["bytes_sent_per_replica"]),
            wall,
        )
    return summary


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


def _inner_update(cfg: TrainConfig, model: nn.Module, opt: torch.optim.Optimizer, sched) -> None:
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def _gather_replica_facts(topo: Topology | None, bytes_sent: list[int], dilocos: list[DiLoCo]):
    """Bytes sent by every replica and a digest of every replica's global parameters."""
    digests = [hashlib.sha256(d.global_vector().cpu().numpy().tobytes()).hexdigest() for d in dilocos]
    if topo is None:
        return bytes_sent, digests
    facts = topo.outer.all_gather_json({"bytes": bytes_sent[0], "digest": digests[0] if digests else None})
    return [f["bytes"] for f in facts], [f["digest"] for f in facts if f["digest"] is not None]
