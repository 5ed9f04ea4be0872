"""What a reference run is made of: the model, the inner optimizer and its schedule, the replicas
a process trains, and the evaluation of a model on fixed validation batches."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn

from ...kernels import convert_to_low_precision
from ...lm import GPT, BatchSampler, Corpus, GPTConfig
from .config import TrainConfig

__all__ = ["build_model", "build_inner_optimizer", "lr_lambda", "evaluate", "Replicas"]


def build_model(cfg: TrainConfig, vocab_size: int) -> GPT:
    """The reference GPT for ``cfg``, initialized from the run's seed (identical for every replica)."""
    m = cfg.model
    gcfg = GPTConfig(vocab_size=vocab_size, seq_len=m.seq_len, n_layer=m.layers, n_head=m.heads, n_embd=m.dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        model = GPT(gcfg)
    convert_to_low_precision(model, m.precision)  # no-op for fp32; the head stays full precision
    return model


def build_inner_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, β = (0.9, 0.99), decay on matrices only (the scaling-law study's inner optimizer)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(0.9, 0.99), eps=1e-8)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine to ``min_lr_ratio`` at the last step."""
    o, steps = cfg.optim, cfg.run.steps

    def f(step: int) -> float:
        if step < o.warmup:
            return (step + 1) / o.warmup
        span = max(steps - o.warmup, 1)
        progress = min((step - o.warmup) / span, 1.0)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

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


class Replicas:
    """The replicas one process trains: for each a model (a copy of ``base``), an inner AdamW
    with its learning-rate schedule, and a data stream of its own.

    Args:
        base: the initial model (every replica starts from the same weights).
        cfg: the run's configuration.
        corpus: what the replicas read.
        streams: one data-stream number per replica (it seeds the replica's sampler).
        device: where the replicas train.
        inner_group: a process group of this replica's processes: the model is wrapped in DDP
            over it (a replica spread over several processes).
    """

    def __init__(
        self,
        base: nn.Module,
        cfg: TrainConfig,
        corpus: Corpus,
        streams: list[int],
        device: torch.device,
        inner_group=None,
    ) -> None:
        self.cfg, self.device = cfg, device
        self.models = [copy.deepcopy(base).to(device) for _ in streams]
        self.opts = [build_inner_optimizer(m, cfg) for m in self.models]
        self.lr_at = lr_lambda(cfg)
        self.scheds = [torch.optim.lr_scheduler.LambdaLR(o, self.lr_at) for o in self.opts]
        d = cfg.data
        self.samplers = [
            BatchSampler(corpus.train, d.batch_size, cfg.model.seq_len, cfg.run.seed, s) for s in streams
        ]
        self.runners: list[nn.Module] = self.models
        if inner_group is not None:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.runners = [DDP(m, process_group=inner_group) for m in self.models]

    def __len__(self) -> int:
        return len(self.models)

    def forward_backward(self) -> list[torch.Tensor]:
        """One batch through every replica, forward and backward; returns the detached losses."""
        losses = []
        for runner, sampler in zip(self.runners, self.samplers):
            x, y = sampler.next()
            loss = runner(x.to(self.device), y.to(self.device))
            loss.backward()
            losses.append(loss.detach())
        return losses

    def update(self) -> None:
        """The inner step of every replica: clip, AdamW, schedule, zero the gradients."""
        clip = self.cfg.optim.grad_clip
        for m, opt, sched in zip(self.models, self.opts, self.scheds):
            if clip:
                torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.scheds[0].get_last_lr()[0]

    def seek(self, step: int) -> None:
        """Put every replica's learning-rate schedule at ``step`` (after a resume or a join)."""
        for opt, sched in zip(self.opts, self.scheds):
            sched.last_epoch = step
            for g, base in zip(opt.param_groups, sched.base_lrs):
                g["lr"] = base * self.lr_at(step)
