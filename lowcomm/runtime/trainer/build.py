"""What a reference run is made of: the model, the inner optimizer and its schedule, the replicas
a process trains, and the evaluation of a model on fixed validation batches."""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
from collections.abc import Callable

import torch
from torch import nn

from ..._checks import host_available_bytes, one_line, refuse
from ...comm import CollectiveError
from ...comm.distributed import communication_failed
from ...kernels import convert_to_low_precision
from ...lm import GPT, BatchSampler, Corpus, GPTConfig
from ...lm.batched import batched_gpt_loss, linear_weights, stack_parameters
from ...optim.replica_adamw import ReplicaAdamW
from .config import TrainConfig

__all__ = [
    "build_model",
    "build_inner_optimizer",
    "architecture",
    "check_architecture",
    "check_memory",
    "check_threads",
    "lr_lambda",
    "evaluate",
    "Replicas",
    "BatchedReplicas",
    "make_replicas",
    "use_batched",
]

log = logging.getLogger(__name__)


def build_model(cfg: TrainConfig, vocab_size: int) -> GPT:
    """The reference GPT for ``cfg``, initialized from the run's seed (identical for every replica)."""
    m = cfg.model
    gcfg = GPTConfig(vocab_size=vocab_size, seq_len=m.seq_len, n_layer=m.layers, n_head=m.heads, n_embd=m.dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        model = GPT(gcfg)
    # no-op for fp32; the head stays full precision
    convert_to_low_precision(model, m.precision, fast_accum=m.fast_accum)
    return model


def architecture(model: GPT) -> dict[str, int]:
    """The reference GPT's shape, under the names of the settings that give it: what a checkpoint
    records of its model."""
    c = model.cfg
    return {
        "model_dim": c.n_embd,
        "layers": c.n_layer,
        "heads": c.n_head,
        "seq_len": c.seq_len,
        "vocab_size": c.vocab_size,
    }


def check_architecture(saved: dict | None, model: GPT, where: str) -> None:
    """Refuse (one line naming each setting that differs) a checkpoint of another model than
    ``model``: torch's load error listed every tensor, over several lines. ``saved`` None: a
    checkpoint of an older lowcomm, which recorded no shape (its load is left to say)."""
    if saved is None:
        return
    saved = saved if isinstance(saved, dict) else {}  # (a crafted checkpoint's: nothing matches)
    now = architecture(model)
    diff = [f"{k}={saved.get(k)!r} (this run: {v!r})" for k, v in now.items() if saved.get(k) != v]
    if diff:
        corpus = "; vocab_size is the corpus's" if saved.get("vocab_size") != now["vocab_size"] else ""
        raise ValueError(f"{where}: the checkpoint is of another model: {', '.join(diff)}{corpus}")


def check_memory(cfg: TrainConfig, vocab_size: int, replicas_here: int, device: torch.device) -> None:
    """Refuse, before the model is built, a run that cannot fit on ``device``: a lower bound of its
    memory against the memory free there. Each replica holds its parameters, gradients and AdamW
    moments (16 bytes a parameter), and DiLoCo's global copy and outer momentum besides (24), but
    DP replicas that run batched share one set (:class:`BatchedReplicas`); and each replica holds
    its logits and their gradient and one fp32 activation per layer and token, forward and backward.
    The validation windows (``eval_batches`` x ``batch_size``, int64 inputs and targets and the
    index they are gathered by) are held in host memory.

    Raises:
        ValueError: naming the sizes and both amounts.
    """
    m, B, T = cfg.model, cfg.data.batch_size, cfg.model.seq_len
    d, L, V = m.dim, m.layers, vocab_size
    params = V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d
    dp = cfg.run.mode == "dp"
    sets = 1 if dp and use_batched(cfg, device, replicas_here) else replicas_here
    need = sets * (16 if dp else 24) * params + replicas_here * (8 * B * T * V + 8 * B * T * d * L)
    windows = cfg.run.eval_batches * B * (T + 1) * 16
    on_device = _free_memory(device)
    cpu = device.type == "cpu"
    host = on_device if cpu else _free_memory(torch.device("cpu"))
    sizes = f"batch_size={B}, seq_len={T}, model_dim={d}, layers={L} with {replicas_here} replica(s) here"
    evals = f"eval_batches={cfg.run.eval_batches}"
    fewer, fewer_evals = "use smaller values or fewer replicas per process", "use a smaller eval_batches"
    checks = [
        (sizes, need, on_device, device, fewer),
        # the validation windows: numpy's MemoryError in eval_batches, or its 'Maximum allowed size exceeded'
        (f"{evals} validation batches of batch_size={B}", windows, host, "the host", fewer_evals),
    ]
    if cpu:
        checks.append((f"{sizes} and {evals}", need + windows, on_device, device, fewer))
    for what, bytes_, free, where, advice in checks:
        if free is not None and bytes_ > free:
            raise ValueError(
                f"{what} need at least {bytes_ / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free "
                f"on {where}: {advice}"
            )


def check_threads(threads: int) -> None:
    """Refuse (ValueError naming it) more torch threads than this machine has CPUs: torch made
    5,000 threads, and 2**63 ended in 'Overflow when unpacking long long'."""
    cpus = os.cpu_count() or 1
    if threads > cpus:
        raise refuse("threads", threads, f"0 (torch's default) to {cpus}, the CPUs of this machine")


def _free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device``: the GPU's free memory, or the host's available memory (None if
    this platform does not say)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return host_available_bytes()


def build_inner_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, β = (0.9, 0.99), decay on matrices only (the scaling-law study's inner optimizer);
    fused on CUDA."""
    return _adamw(list(model.parameters()), cfg, matrix=lambda p: p.dim() >= 2)


def _adamw(params: list[torch.Tensor], cfg: TrainConfig, matrix) -> torch.optim.AdamW:
    fused = {"fused": True} if all(p.is_cuda for p in params) else {}
    return torch.optim.AdamW(_adamw_groups(params, cfg, matrix), **_ADAMW, **fused)


#: the inner AdamW's hyperparameters besides the learning rate's schedule and the decay
_ADAMW = dict(betas=(0.9, 0.99), eps=1e-8)


def _adamw_groups(params: list[torch.Tensor], cfg: TrainConfig, matrix) -> list[dict]:
    """Decay on matrices only; the base learning rate."""
    return [
        {
            "params": [p for p in params if matrix(p)],
            "weight_decay": cfg.optim.weight_decay,
            "lr": cfg.optim.lr,
        },
        {"params": [p for p in params if not matrix(p)], "weight_decay": 0.0, "lr": cfg.optim.lr},
    ]


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
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> float:
    """Mean cross-entropy (nats per token) over fixed validation batches (``dtype``: autocast)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    with _autocast(device, dtype):
        for x, y in batches:
            total += model(x.to(device), y.to(device)).float()
    model.train(was_training)
    return float(total) / len(batches)


def _autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast on ``device``, or nothing for fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def use_batched(cfg: TrainConfig, device: torch.device, num_replicas: int, inner_group=None) -> bool:
    """Whether this process's replicas run as one batched computation (see RunConfig.replica_batching)."""
    mode = cfg.run.replica_batching
    possible = num_replicas > 1 and inner_group is None and cfg.model.precision == "fp32"
    if mode == "auto":
        return possible and device.type == "cuda"
    return mode == "batched" and possible


def make_replicas(
    base: nn.Module,
    cfg: TrainConfig,
    corpus: Corpus,
    streams: list[int],
    device: torch.device,
    inner_group=None,
) -> Replicas:
    """The replicas of this process, batched or sequential (:func:`use_batched`)."""
    batched = use_batched(cfg, device, len(streams), inner_group)
    if cfg.run.replica_batching == "batched" and not batched:
        log.info("replica_batching='batched': %d replica(s) here; they run sequentially", len(streams))
    cls = BatchedReplicas if batched else Replicas
    return cls(base, cfg, corpus, streams, device, inner_group)


class Replicas:
    """The replicas one process trains, one after the other: for each a model (a copy of ``base``),
    an inner AdamW with its learning-rate schedule, and a data stream of its own.

    On CUDA batches come through pinned memory with non-blocking copies; the forward runs under
    bf16 autocast when the run's dtype says so (parameters and optimizer state stay fp32), and
    under torch.compile with ``compile``. Losses stay on the device.

    Args:
        base: the initial model (every replica starts from the same weights).
        cfg: the run's configuration.
        corpus: what the replicas read.
        streams: one data-stream number per replica (it seeds the replica's sampler).
        device: where the replicas train.
        inner_group: a process group of this replica's processes: the model is wrapped in DDP
            over it (a replica spread over several processes).
    """

    batched = False

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
        self.dtype = cfg.run.compute_dtype(device)
        if device.type == "cuda" and self.dtype == torch.float32:
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs use TF32 tensor cores
            torch.backends.cudnn.allow_tf32 = True
        self.models = [copy.deepcopy(base).to(device) for _ in streams]
        self.opts = [build_inner_optimizer(m, cfg) for m in self.models]
        self.lr_at = lr_lambda(cfg)
        self.scheds = [torch.optim.lr_scheduler.LambdaLR(o, self.lr_at) for o in self.opts]
        d, seq = cfg.data, cfg.model.seq_len
        self.samplers = [BatchSampler(corpus.train, d.batch_size, seq, cfg.run.seed, s) for s in streams]
        self.runners: list[nn.Module] = self.models
        self.inner_group = inner_group
        if inner_group is not None:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.runners = [DDP(m, process_group=inner_group) for m in self.models]
        if cfg.run.compile:
            self.runners = [torch.compile(r) for r in self.runners]

    def __len__(self) -> int:
        return len(self.models)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def forward_backward(self) -> torch.Tensor:
        """One batch through every replica, forward and backward; returns the (M,) losses, detached,
        on the device."""
        losses = []
        for runner, sampler in zip(self.runners, self.samplers):
            x, y = (self._to_device(t) for t in sampler.next())
            try:
                with _autocast(self.device, self.dtype):
                    loss = runner(x, y)
                loss.backward()
            except RuntimeError as e:  # a process of the replica gone: one line, not a traceback
                if self.inner_group is None or not communication_failed(e):
                    raise
                why = f"the all-reduce of the replica's gradients (DDP) failed: {one_line(e, 200)}"
                raise CollectiveError(why) from None
            losses.append(loss.detach().float())
        return torch.stack(losses)

    def grads(self, i: int) -> list[torch.Tensor | None]:
        """Replica ``i``'s gradients, in parameter order (None where a parameter has none)."""
        return [p.grad for p in self.models[i].parameters()]

    def set_grads(self, i: int, flat: torch.Tensor) -> None:
        """Replace replica ``i``'s gradients with the pieces of ``flat`` (parameter order)."""
        offset = 0
        for p in self.models[i].parameters():
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype).clone()
            offset += n

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

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return list({id(o): o for o in self.opts}.values())  # batched: one steps every replica

    def state_dict(self) -> dict:
        """Every replica's model, inner optimizer state and data position (a checkpoint's part;
        the learning-rate schedule is a function of the step: :meth:`seek`)."""
        return {
            "models": [dict(m.state_dict()) for m in self.models],
            "inner": [o.state_dict() for o in self._optimizers()],
            "samplers": [s.state_dict() for s in self.samplers],
        }

    def load_state_dict(self, state: dict, data: bool = True) -> None:
        """Continue from :meth:`state_dict` of the same replicas (ValueError: other replicas).
        ``data`` False: the data positions are not taken (another replica's: :meth:`skip`)."""
        opts = self._optimizers()
        counts = (len(state["models"]), len(state["inner"]), len(state["samplers"]))
        if counts != (len(self.models), len(opts), len(self.samplers)):
            raise ValueError(
                f"it holds {counts[0]} replica(s) with {counts[1]} optimizer(s), this process trains "
                f"{len(self.models)} with {len(opts)}"
            )
        for m, ms in zip(self.models, state["models"]):
            m.load_state_dict(ms)  # batched: into each replica's slice of the stack
        for o, os_ in zip(opts, state["inner"]):
            o.load_state_dict(os_)
        for sampler, ss in zip(self.samplers, state["samplers"] if data else []):
            sampler.load_state_dict(ss)

    def skip(self, steps: int) -> None:
        """Put every replica's data at step ``steps`` of its stream, from its start (a replica
        that did not train those steps here, in a job resumed with other replicas)."""
        for sampler in self.samplers:
            sampler.skip(steps)

    def seek(self, step: int) -> None:
        """Put every replica's learning-rate schedule at ``step`` (after a resume or a join)."""
        for opt, sched in zip(self.opts, self.scheds):
            sched.last_epoch = step
            for g, base in zip(opt.param_groups, sched.base_lrs):
                g["lr"] = base * self.lr_at(step)


class BatchedReplicas(Replicas):
    """The M replicas of the reference GPT as one batched computation (:mod:`lowcomm.lm.batched`).

    Their parameters are stacked along a replica axis and trained by one AdamW (AdamW acts on
    every element alone, so one over the stack is M of them: :class:`~lowcomm.optim.ReplicaAdamW`),
    with each replica's gradient norm clipped on its own (the coefficient applied in the
    optimizer's pass). Under bf16 autocast the linear layers multiply by the optimizer's bf16
    copies of their weights, the casts autocast would make, made once per update instead of in
    every forward. Each replica's model keeps its Parameters as views of its slice of the stack
    (sharing its version counter, so a write through them re-casts the copies), so DiLoCo,
    evaluation and checkpoints see M ordinary models. The results equal the sequential path's up
    to float rounding (batched matrix multiplies sum in another order).

    Under DP (``shared``) the replicas hold the same values at every step (each steps on the mean
    of their gradients), so they share one set: the stack has one slice, which every replica's
    model views, and each step reads the M replicas' batches as one batch of M·B sequences. Its
    gradient is the mean of the replicas' gradients (the mean of their losses' gradients), the
    clip and AdamW run once instead of M times, and each replica's loss is that of its own
    sequences: what M replicas averaging their gradients compute, with one copy of the parameters
    and of AdamW's state instead of M.
    """

    batched = True

    def __init__(self, base, cfg, corpus, streams, device, inner_group=None) -> None:
        super().__init__(base, cfg, corpus, streams, device, inner_group)
        M = len(self.models)
        self.shared = cfg.run.mode == "dp"
        self.params = stack_parameters(self.models[:1] if self.shared else self.models)
        self.names = list(self.params)
        for m, model in enumerate(self.models):
            _view_parameters(model, {n: self.params[n].detach()[0 if self.shared else m] for n in self.names})
        low = self.dtype in (torch.bfloat16, torch.float16)  # autocast: the matrices' copies
        copies = {n: self.params[n] for n in linear_weights(base.cfg)} if low else {}
        groups = _adamw_groups(list(self.params.values()), cfg, matrix=lambda p: p.dim() >= 3)
        opt = ReplicaAdamW(groups, lr=cfg.optim.lr, **_ADAMW, copies=copies, copy_dtype=self.dtype)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_at)
        self.opts, self.scheds = [opt] * M, [sched] * M  # one optimizer steps every replica
        loss = functools.partial(batched_gpt_loss, cfg=base.cfg)
        self._loss = torch.compile(loss) if cfg.run.compile else loss

    def forward_backward(self) -> torch.Tensor:
        batches = [sampler.next() for sampler in self.samplers]
        x, y = (self._to_device(torch.stack(t)) for t in zip(*batches))  # (M, B, T) each
        M = len(batches)
        if self.shared:  # one set of parameters reads every replica's batch: (1, M·B, T)
            x, y = x.view(1, -1, x.shape[-1]), y.view(1, -1, y.shape[-1])
        weights, splits = self.opts[0].fresh_copies(), M if self.shared else 1
        with _autocast(self.device, self.dtype):
            losses = self._loss(self.params, idx=x, targets=y, weights=weights, splits=splits)
        # shared: the gradient of the replicas' mean loss; else replica m's parameters get its own
        (losses.mean() if self.shared else losses.sum()).backward()
        return losses.detach().float()

    def fill_missing_gradients(self) -> None:
        """A zero gradient for every parameter that got none (what DP's mean over a collective
        hands such a parameter: it still takes AdamW's step)."""
        self.opts[0].fill_missing_gradients()

    def load_state_dict(self, state: dict, data: bool = True) -> None:
        """:meth:`Replicas.load_state_dict`; shared (DP), also a checkpoint written when every
        replica had a slice of its own, whose slices are then equal (ValueError where not)."""
        if self.shared:
            state = {**state, "inner": [_one_slice(o, len(self.models)) for o in state["inner"]]}
            first = state["models"][0]
            for i, ms in enumerate(state["models"][1:], 1):
                if ms.keys() != first.keys() or not all(torch.equal(ms[k], first[k]) for k in first):
                    raise ValueError(f"its DP replicas differ: replica {i}'s parameters are not replica 0's")
        super().load_state_dict(state, data)

    def update(self) -> None:
        opt = self.opts[0]
        opt.step(max_norm=self.cfg.optim.grad_clip or None)
        self.scheds[0].step()
        opt.zero_grad(set_to_none=True)


def _one_slice(opt_state: dict, M: int) -> dict:
    """An optimizer state dict over stacks of M slices, as one over stacks of one: each state
    tensor's first slice, where its M are equal (ValueError where not)."""
    state = {}
    for key, st in opt_state["state"].items():
        state[key] = dict(st)
        for name, t in st.items():
            if torch.is_tensor(t) and t.dim() > 0 and t.shape[0] == M > 1:
                if not all(torch.equal(t[m], t[0]) for m in range(1, M)):
                    raise ValueError(
                        f"its DP replicas differ: {name} of parameter {key} is not alike in all {M}"
                    )
                state[key][name] = t[:1].clone()
    return {**opt_state, "state": state}


def _view_parameters(model: nn.Module, views: dict[str, torch.Tensor]) -> None:
    """Make each of ``model``'s Parameters (tied ones once, under their first name) a new Parameter
    over ``views[name]``. Built on a ``detach()`` of the stack, each shares the stack's version
    counter: an in-place write through it (DiLoCo's outer step, ``load_state_dict``) shows on the
    stack, which ReplicaAdamW's copies watch (``p.data = view`` would keep a counter of its own)."""
    new = {id(p): nn.Parameter(views[n]) for n, p in model.named_parameters()}
    for mod in model.modules():
        for leaf, p in list(mod._parameters.items()):
            if p is not None and id(p) in new:
                mod._parameters[leaf] = new[id(p)]
