"""The reference trainer behind ``lowcomm train``: M replicas of the reference GPT in one process.

Each replica has its own model, AdamW and data stream (seeded by (seed, rank)) and talks to the
others only through its LocalGroup handle, exactly as it would through a distributed group.

``mode="diloco"``: inner AdamW steps, then :func:`lowcomm.optim.step_replicas` (DiLoCo wrapper).
``mode="dp"``: after every backward the gradients are mean-all-reduced in fp32 through the same
group, then clipped and applied: the data-parallel baseline at equal tokens.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..comm import LocalGroup, get_codec
from ..lm import GPT, BatchSampler, GPTConfig, eval_batches, load_corpus
from ..optim import DiLoCo, finish_replicas, step_replicas
from .config import TrainConfig
from .metrics import RunRecorder

__all__ = ["train", "build_model", "build_inner_optimizer", "evaluate", "lr_lambda"]

log = logging.getLogger(__name__)


def build_model(cfg: TrainConfig, vocab_size: int) -> GPT:
    """The reference GPT for ``cfg``, initialized from ``cfg.seed`` (identical for every replica)."""
    gcfg = GPTConfig(
        vocab_size=vocab_size, seq_len=cfg.seq_len, n_layer=cfg.layers, n_head=cfg.heads, n_embd=cfg.model_dim
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return GPT(gcfg)


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


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024:
            return f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}TB"


def train(cfg: TrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run one training job and write its run directory; returns the summary.

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
    base = build_model(cfg, corpus.vocab_size).to(device)
    M = cfg.replicas
    models = [copy.deepcopy(base) for _ in range(M)]
    opts = [build_inner_optimizer(m, cfg) for m in models]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(cfg)) for o in opts]
    samplers = [BatchSampler(corpus.train, cfg.batch_size, cfg.seq_len, cfg.seed, r) for r in range(M)]
    groups = LocalGroup.create(M)
    dilocos: list[DiLoCo] = []
    if cfg.mode == "diloco":
        dilocos = [
            DiLoCo(
                m,
                o,
                g,
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
            )
            for m, o, g in zip(models, opts, groups)
        ]
    val = eval_batches(corpus.val, cfg.eval_batches, cfg.batch_size, cfg.seq_len)
    fp32 = get_codec("fp32")
    params = base.num_params()
    params_ne = base.num_params(non_embedding=True)
    tokens_per_step = M * cfg.batch_size * cfg.seq_len

    config_record = {
        **cfg.to_dict(),
        "corpus_name": corpus.name,
        "corpus_sha256": corpus.sha256,
        "vocab_size": corpus.vocab_size,
        "params": params,
        "params_non_embedding": params_ne,
        "lowcomm_version": __version__,
        "torch_version": torch.__version__,
        "fragment_numels": dilocos[0].fragment_numels() if dilocos else [params],
    }
    rec = RunRecorder(cfg.run_dir, config_record)
    bytes_sent = [0] * M
    timing = {"inner_s": 0.0, "send_s": 0.0, "encode_s": 0.0, "decode_s": 0.0, "outer_s": 0.0, "comm_s": 0.0}
    rounds = 0
    last_eval = float("nan")

    def eval_global(step: int) -> float:
        if dilocos:
            with dilocos[0].global_parameters():
                loss = evaluate(models[0], val, device)
        else:
            loss = evaluate(models[0], val, device)
        rec.eval(step=step, tokens=step * tokens_per_step, loss=loss)
        return loss

    def record_rounds(step: int) -> None:
        nonlocal rounds
        for r, d in enumerate(dilocos):
            for rs in d.drain_round_stats():
                bytes_sent[r] += rs.bytes_sent
                if r == 0:
                    rounds += 1
                    for k in ("send_s", "encode_s", "decode_s", "outer_s", "comm_s"):
                        timing[k] += getattr(rs, k)
                rec.event("round", replica=r, step=step, **rs.to_dict())

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc=f"{cfg.mode} M={M}", unit="step", dynamic_ncols=True, leave=False)
    try:
        for step in range(1, cfg.steps + 1):
            t0 = time.perf_counter()
            losses = []
            for r in range(M):
                x, y = samplers[r].next()
                loss = models[r](x.to(device), y.to(device))
                loss.backward()
                losses.append(float(loss.detach()))
                if cfg.mode == "diloco":
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(models[r].parameters(), cfg.grad_clip)
                    opts[r].step()
                    scheds[r].step()
                    opts[r].zero_grad(set_to_none=True)
            if cfg.mode == "dp":
                works = [g.all_reduce_mean(_flat_grads(m), fp32) for g, m in zip(groups, models)]
                for r, (m, w) in enumerate(zip(models, works)):
                    _set_grads(m, w.wait())
                    bytes_sent[r] += w.stats.bytes_sent
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.grad_clip)
                    opts[r].step()
                    scheds[r].step()
                    opts[r].zero_grad(set_to_none=True)
                timing["encode_s"] += works[0].stats.encode_s
                timing["decode_s"] += works[0].stats.decode_s
            timing["inner_s"] += time.perf_counter() - t0
            if dilocos:
                step_replicas(dilocos)
                record_rounds(step)
            mean_loss = sum(losses) / M
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
                    loss=f"{mean_loss:.3f}", eval=f"{last_eval:.3f}", sent=_human_bytes(bytes_sent[0])
                )
        if dilocos and cfg.final_sync:
            finish_replicas(dilocos)
            record_rounds(cfg.steps)
        final = eval_global(cfg.steps)
    finally:
        if bar is not None:
            bar.close()
        rec.close()
    if dilocos:
        gv = dilocos[0].global_vector()
        if not all(torch.equal(gv, d.global_vector()) for d in dilocos[1:]):
            raise RuntimeError("replicas ended with different global parameters; this is a bug in lowcomm")
    wall = time.time() - t_start
    tokens = cfg.steps * tokens_per_step
    summary = {
        "mode": cfg.mode,
        "replicas": M,
        "sync_every": cfg.sync_every if cfg.mode == "diloco" else 1,
        "fragments": cfg.fragments if cfg.mode == "diloco" else 1,
        "overlap": cfg.overlap if cfg.mode == "diloco" else 0,
        "alpha": cfg.alpha,
        "outer_lr": cfg.outer_lr,
        "codec": cfg.codec if cfg.mode == "diloco" else "fp32",
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
        "bytes_sent_per_replica": sum(bytes_sent) / M,
        "rounds": rounds,
        "flops": 6 * params_ne * tokens,
        "wall_seconds": wall,
        "timing": timing,
        "seed": cfg.seed,
        "corpus": corpus.name,
        "lowcomm_version": __version__,
    }
    rec.summary(summary)
    log.info(
        "run %s done: eval loss %.4f, %s sent per replica, %.1fs",
        cfg.run_dir,
        final,
        _human_bytes(summary["bytes_sent_per_replica"]),
        wall,
    )
    return summary
