"""The DiLoCo / Streaming DiLoCo wrapper: one per replica, called after each inner step.

    diloco = lowcomm.DiLoCo(model, inner_optimizer, group, sync_every=100, fragments=4,
                            overlap=1, alpha=0.5, outer_lr=0.7, outer_momentum=0.9, codec="e3m0")
    # or: lowcomm.DiLoCo(model, inner_optimizer, group, config=lowcomm.DiLoCoConfig(...))
    for batch in data:
        loss(model, batch).backward(); inner_optimizer.step(); inner_optimizer.zero_grad()
        diloco.step()

Per fragment ``p`` the wrapper keeps an fp32 global copy ``g_p`` (bitwise identical on every
replica) and a Nesterov buffer ``v_p``. At a send step it computes the pseudo-gradient
``Δ = g_p − θ_p`` and starts an asynchronous mean all-reduce; ``overlap`` steps later it waits,
takes the outer step on ``g_p`` and merges ``θ_p ← α·θ_p + (1 − α)·g_p``. ``fragments=1,
overlap=0`` is vanilla DiLoCo.

``step()`` is ``send_due()`` followed by ``apply_due()``. With several replicas in one thread
(LocalGroup) call each phase on every replica in turn: :func:`step_replicas` does that.

References:
    Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models" (2023).
    Douillard et al., "Streaming DiLoCo with overlapping communication" (2025), Algorithm 1.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..comm import Codec, ReplicaGroup, Work, get_codec
from ..comm.distributed import gather_shards, shard_position
from ..comm.reduce import shard_bounds
from .config import DiLoCoConfig
from .outer import NesterovState, apply_update, nesterov_init, nesterov_update
from .schedule import PATTERNS, partition_blocks, sends_at

__all__ = ["DiLoCo", "RoundStats", "build_fragments", "find_blocks", "step_replicas", "finish_replicas"]

STATE_VERSION = 1
#: RoundStats fields computed on the device (read back by drain_round_stats)
_DEVICE_STATS = ("pseudo_grad_norm", "mean_pseudo_grad_norm", "cosine_to_mean", "momentum_norm")


@dataclass
class RoundStats:
    """One completed round of one fragment on this replica (``to_dict()`` is the metrics record).

    The norms and the cosine are computed on the device when the round is applied and read back
    only by :meth:`DiLoCo.drain_round_stats`, so applying a round costs no host sync.
    """

    fragment: int
    send_step: int
    apply_step: int
    numel: int
    bytes_sent: int
    pseudo_grad_norm: float
    mean_pseudo_grad_norm: float
    cosine_to_mean: float
    momentum_norm: float
    encode_s: float
    comm_s: float
    decode_s: float
    wait_s: float
    send_s: float
    outer_s: float
    final: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Fragment:
    names: list[str]
    params: list[nn.Parameter]
    numels: list[int]
    global_: torch.Tensor
    momentum: NesterovState
    residual: torch.Tensor | None
    lo: int = 0  # this process's shard of the fragment (the whole fragment without a shard group)
    hi: int = 0
    last_send: int = 0


@dataclass
class _InFlight:
    work: Work
    send_step: int
    due_step: int
    delta: torch.Tensor
    norm: torch.Tensor  # 0-dim, on the outer device
    final: bool = False
    send_s: float = 0.0


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's repeated blocks: the ``nn.ModuleList`` holding the most parameters, or None."""
    best, best_n = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList):
            n = sum(p.numel() for p in mod.parameters())
            if n > best_n:
                best, best_n = (name, mod), n
    return best


def build_fragments(
    model: nn.Module, fragments: int | Sequence[Sequence[str | nn.Module]], pattern: str = "strided"
) -> list[list[str]]:
    """Parameter names of each fragment, every trainable parameter in exactly one.

    Args:
        model: the replica's model.
        fragments: a count ``P``, or explicit fragments as lists of parameter names and/or modules.
            With a count, ``P = 1`` is the whole model; for ``P > 1`` the parameters outside the
            blocks (embeddings, head, final norm) form the last fragment of their own and the
            blocks are split over the other ``P − 1`` by ``pattern`` (a model with no parameters
            outside its blocks splits them over all ``P``).
        pattern: "strided" (block ℓ to fragment ℓ mod P) or "sequential".

    Raises:
        ValueError: a count out of range, no blocks to split, a name that is not a parameter, a
            parameter in two fragments or in none.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    all_names = [n for n, _ in named]
    if pattern not in PATTERNS:
        raise ValueError(f"unknown fragment pattern {pattern!r}; allowed: {list(PATTERNS)}")
    if isinstance(fragments, int) and not isinstance(fragments, bool):
        if fragments < 1:
            raise ValueError(f"fragments must be >= 1, got {fragments}")
        if fragments == 1:
            return [all_names]
        found = find_blocks(model)
        if found is None:
            raise ValueError(
                f"fragments={fragments} needs repeated blocks (an nn.ModuleList) to split; this model has "
                "none: pass fragments=1 or explicit fragments as lists of parameter names or modules"
            )
        prefix, blocks = found
        block_names = [[n for n, _ in named if n.startswith(f"{prefix}.{i}.")] for i in range(len(blocks))]
        in_blocks = {n for names in block_names for n in names}
        rest = [n for n in all_names if n not in in_blocks]
        groups = fragments - 1 if rest else fragments
        if groups > len(blocks):
            allowed = len(blocks) + (1 if rest else 0)
            raise ValueError(
                f"fragments={fragments} exceeds what the model allows: {len(blocks)} blocks"
                + (" plus one fragment for the parameters outside them" if rest else "")
                + f", so fragments must be in [1, {allowed}]"
            )
        out = [
            [n for b in grp for n in block_names[b]] for grp in partition_blocks(len(blocks), groups, pattern)
        ]
        return out + ([rest] if rest else [])
    # explicit fragments
    by_id = {id(p): n for n, p in named}
    out, seen = [], {}
    for i, frag in enumerate(fragments):
        names: list[str] = []
        for item in frag:
            if isinstance(item, nn.Module):
                names.extend(by_id[id(p)] for p in item.parameters() if id(p) in by_id)
            elif isinstance(item, str):
                if item not in all_names:
                    raise ValueError(f"fragment {i}: {item!r} is not a trainable parameter of the model")
                names.append(item)
            else:
                raise ValueError(
                    f"fragment {i}: entries must be parameter names or modules, got {type(item).__name__}"
                )
        names = list(dict.fromkeys(names))
        for n in names:
            if n in seen:
                raise ValueError(f"parameter {n!r} is in fragment {seen[n]} and fragment {i}")
            seen[n] = i
        if not names:
            raise ValueError(f"fragment {i} holds no parameters")
        out.append(names)
    missing = [n for n in all_names if n not in seen]
    if missing:
        raise ValueError(f"parameters in no fragment: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return out


class DiLoCo:
    """DiLoCo / Streaming DiLoCo for one replica.

    Args:
        model: this replica's model; its parameters are the local parameters θ.
        inner_optimizer: the replica's inner optimizer (its state is never averaged). When given,
            :meth:`step` checks that it stepped exactly once since the previous call. None skips
            the check.
        group: the replicas this one synchronizes with.
        config: the settings (:class:`~lowcomm.optim.DiLoCoConfig`); keyword arguments override
            its fields (``sync_every=100, fragments=4, codec="e3m0"``, ...).
        shard_group: the torch.distributed group of the processes that hold this same replica
            (inner DDP). Each of its ``k`` processes syncs only its 1/k shard of every fragment
            over ``group`` (its outer group) and keeps momentum for that shard; after a round the
            shards of the global copy are all-gathered inside the replica.

    Raises:
        ValueError: any setting out of range, naming it and what is allowed.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_optimizer: torch.optim.Optimizer | None,
        group: ReplicaGroup,
        config: DiLoCoConfig | None = None,
        *,
        shard_group=None,
        **settings: Any,
    ) -> None:
        cfg = (config or DiLoCoConfig()).replace(**settings) if settings else (config or DiLoCoConfig())
        frag_names = build_fragments(model, cfg.fragments, cfg.pattern)

        self.config = cfg
        self.model, self.inner_optimizer, self.group = model, inner_optimizer, group
        self.sync_every, self.num_fragments, self.overlap = cfg.sync_every, len(frag_names), cfg.overlap
        self.pattern, self.alpha = cfg.pattern, float(cfg.alpha)
        self.outer_lr, self.outer_momentum = float(cfg.outer_lr), float(cfg.outer_momentum)
        self.codec = cfg.codec if isinstance(cfg.codec, Codec) else get_codec(cfg.codec, cfg.codec_block)
        self.error_feedback, self.reduce = cfg.error_feedback, cfg.reduce
        params = dict(model.named_parameters())
        first = next(iter(params.values()))
        self.outer_device = torch.device(cfg.outer_device) if cfg.outer_device is not None else first.device
        pin = self.outer_device.type == "cpu" and first.device.type == "cuda"

        self.step_count = 0
        self.shard_group = shard_group
        self.num_shards, self.shard = shard_position(shard_group)
        self._frags: list[_Fragment] = []
        for names in frag_names:
            ps = [params[n] for n in names]
            g = self._flatten(ps)
            if pin:
                g = g.pin_memory()
            lo, hi = shard_bounds(g.numel(), self.num_shards, self.codec.block)[self.shard]
            self._frags.append(
                _Fragment(
                    names=names,
                    params=ps,
                    numels=[p.numel() for p in ps],
                    global_=g,
                    momentum=nesterov_init(g[lo:hi]),
                    residual=torch.zeros_like(g[lo:hi]) if cfg.error_feedback else None,
                    lo=lo,
                    hi=hi,
                )
            )
        self._inflight: dict[int, _InFlight] = {}
        self._rounds: list[RoundStats] = []
        # inner steps taken since the last step(): the ordering check (see step())
        self._inner_steps = 0
        self._hook = (
            inner_optimizer.register_step_post_hook(self._count_inner_step)
            if inner_optimizer is not None
            else None
        )
        group.verify_same("DiLoCo configuration", self._fingerprint())

    def _count_inner_step(self, *_: Any) -> None:
        self._inner_steps += 1

    # ---- public API -------------------------------------------------------------------------

    @property
    def fragment_names(self) -> list[list[str]]:
        """Parameter names of each fragment."""
        return [list(f.names) for f in self._frags]

    def fragment_numels(self) -> list[int]:
        return [f.global_.numel() for f in self._frags]

    def step(self) -> None:
        """Call once after every inner ``optimizer.step()``.

        Raises:
            RuntimeError: with an inner optimizer given, when it did not step exactly once since
                the previous call (``step()`` before ``optimizer.step()``, twice for one inner
                step, or a missed call): the schedule counts inner steps, so it would drift.
        """
        self.send_due()
        self.apply_due()

    def send_due(self, final: bool = False) -> None:
        """Count one inner step and start the all-reduce of every fragment due to send now.

        With ``final=True`` no step is counted: every outstanding round is applied, and every
        fragment with local progress since its last send sends once more, due at once.
        """
        if final:
            for p in sorted(self._inflight):
                self._apply(p)
            for p, frag in enumerate(self._frags):
                if frag.last_send < self.step_count:
                    self._send(p, due=self.step_count, final=True)
            return
        if self._hook is not None and self._inner_steps != 1:
            raise RuntimeError(
                f"DiLoCo step {self.step_count + 1}: the inner optimizer stepped {self._inner_steps} "
                "times since the last diloco.step(); call diloco.step() exactly once after each "
                "optimizer.step()"
            )
        self._inner_steps = 0
        self.step_count += 1
        for p in sends_at(self.step_count, self.sync_every, self.num_fragments):
            self._send(p, due=self.step_count + self.overlap)

    def apply_due(self, final: bool = False) -> None:
        """Finish every round due at the current step (all outstanding ones with ``final``)."""
        for p in sorted(self._inflight):
            if final or self._inflight[p].due_step <= self.step_count:
                self._apply(p)

    def finish(self) -> None:
        """Bring every fragment's global copy up to date with all local progress (blocking)."""
        self.send_due(final=True)
        self.apply_due(final=True)

    def drain_round_stats(self) -> list[RoundStats]:
        """Round statistics completed since the last call (their norms read back in one go)."""
        out, self._rounds = self._rounds, []
        if out:
            values = torch.stack([torch.stack([getattr(r, f) for r in out]) for f in _DEVICE_STATS]).tolist()
            for f, vals in zip(_DEVICE_STATS, values):
                for r, v in zip(out, vals):
                    setattr(r, f, v)
        return out

    def global_vector(self) -> torch.Tensor:
        """All global fragments concatenated (fp32), e.g. to compare replicas."""
        return torch.cat([f.global_ for f in self._frags])

    @contextlib.contextmanager
    def global_parameters(self) -> Iterator[nn.Module]:
        """Temporarily load the global (outer) parameters into the model, e.g. for evaluation."""
        saved = [p.detach().clone() for f in self._frags for p in f.params]
        try:
            with torch.no_grad():
                for f in self._frags:
                    for p, g in zip(f.params, self._views(f)):
                        p.copy_(g)
            yield self.model
        finally:
            with torch.no_grad():
                for p, s in zip((p for f in self._frags for p in f.params), saved):
                    p.copy_(s)

    def sync_local_parameters(self) -> None:
        """Set the local parameters to the global ones (a joiner starts from the job's state, so
        its first pseudo-gradient holds only its own progress)."""
        with torch.no_grad():
            for f in self._frags:
                for p, g in zip(f.params, self._views(f)):
                    p.copy_(g)

    @property
    def in_flight(self) -> int:
        """Rounds sent and not yet applied."""
        return len(self._inflight)

    # ---- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to continue bit for bit (tensors are copies, on the outer device)."""
        return {
            "version": STATE_VERSION,
            "step": self.step_count,
            "config": self._config_key(),
            "fragments": [
                {
                    "names": list(f.names),
                    "global": f.global_.clone(),
                    "momentum": f.momentum.momentum.clone(),
                    "residual": None if f.residual is None else f.residual.clone(),
                    "last_send": f.last_send,
                }
                for f in self._frags
            ],
            "inflight": [
                {
                    "fragment": p,
                    "send_step": i.send_step,
                    "due_step": i.due_step,
                    "delta": i.delta.clone(),
                    "norm": float(i.norm),
                    "final": i.final,
                }
                for p, i in sorted(self._inflight.items(), key=lambda kv: kv[1].send_step)
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output; in-flight rounds are started again in send order.

        Raises:
            ValueError: a state from another version, configuration or model.
        """
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"DiLoCo state version must be {STATE_VERSION}, got {got!r}")
        if state["config"] != self._config_key():
            diff = {
                k: (v, self._config_key().get(k))
                for k, v in state["config"].items()
                if self._config_key().get(k) != v
            }
            raise ValueError(f"DiLoCo state was saved with another configuration (saved, current): {diff}")
        if len(state["fragments"]) != len(self._frags):
            raise ValueError(
                f"state has {len(state['fragments'])} fragments, this wrapper {len(self._frags)}"
            )
        for i, (fs, f) in enumerate(zip(state["fragments"], self._frags)):
            if fs["names"] != f.names or fs["global"].numel() != f.global_.numel():
                raise ValueError(f"fragment {i} of the state holds other parameters than this model's")
        for fs, f in zip(state["fragments"], self._frags):
            f.global_.copy_(fs["global"])
            f.momentum.momentum.copy_(fs["momentum"])
            if f.residual is not None:
                f.residual.copy_(fs["residual"])
            f.last_send = int(fs["last_send"])
        self.step_count = int(state["step"])
        self._inflight.clear()
        for it in state["inflight"]:
            delta = it["delta"].to(self.outer_device, torch.float32).clone()
            work = self.group.all_reduce_mean(delta, self.codec, self.reduce)
            norm = torch.tensor(float(it["norm"]), device=delta.device)
            self._inflight[int(it["fragment"])] = _InFlight(
                work, int(it["send_step"]), int(it["due_step"]), delta, norm, bool(it["final"])
            )

    # ---- internals ----------------------------------------------------------------------------

    def _fingerprint(self) -> dict:
        """What every replica must agree on: the schedule, the codec, the outer step, the model shape."""
        return {
            **self._config_key(),
            "pattern": self.pattern,
            "alpha": self.alpha,
            "outer_lr": self.outer_lr,
            "outer_momentum": self.outer_momentum,
            # one key per parameter, so that a mismatch names the parameter: [fragment, *shape]
            **{
                f"param {n}": [i, *p.shape]
                for i, f in enumerate(self._frags)
                for n, p in zip(f.names, f.params)
            },
        }

    def _config_key(self) -> dict:
        return {
            "sync_every": self.sync_every,
            "num_fragments": self.num_fragments,
            "overlap": self.overlap,
            "codec": self.codec.name,
            "codec_block": self.codec.block,
            "error_feedback": self.error_feedback,
            "reduce": self.reduce,
            "num_shards": self.num_shards,
        }

    def _flatten(self, params: list[nn.Parameter]) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).to(self.outer_device, torch.float32) for p in params])

    def _views(self, f: _Fragment) -> list[torch.Tensor]:
        return [g.view(p.shape) for g, p in zip(torch.split(f.global_, f.numels), f.params)]

    def _send(self, p: int, due: int, final: bool = False) -> None:
        t0 = time.perf_counter()
        f = self._frags[p]
        delta = f.global_[f.lo : f.hi] - self._flatten(f.params)[f.lo : f.hi]  # Δ = θ_global − θ_local, fp32
        if f.residual is not None:
            delta += f.residual
        norm = delta.norm()
        work = self.group.all_reduce_mean(delta, self.codec, self.reduce)
        f.last_send = self.step_count
        self._inflight[p] = _InFlight(
            work, self.step_count, due, delta, norm, final, time.perf_counter() - t0
        )

    def _apply(self, p: int) -> None:
        f, inf = self._frags[p], self._inflight.pop(p)
        mean = inf.work.wait()
        t0 = time.perf_counter()
        mean_norm = mean.norm()
        # agreement of this replica with the group: cos(Δ_m, mean Δ) (1 = all replicas moved alike)
        denom = inf.norm * mean_norm
        cosine = torch.where(denom > 0, torch.dot(inf.delta, mean) / denom, torch.zeros_like(denom))
        if f.residual is not None:
            torch.sub(inf.delta, inf.work.sent, out=f.residual)
            torch.nan_to_num_(f.residual, nan=0.0, posinf=0.0, neginf=0.0)  # never carry a NaN forward
        direction, _ = nesterov_update(mean, f.momentum, self.outer_momentum)
        apply_update(f.global_[f.lo : f.hi], direction, self.outer_lr)
        if self.shard_group is not None:
            self._gather_shards(f)
        with torch.no_grad():
            for param, g in zip(f.params, self._views(f)):
                g = g.to(param.device, param.dtype, non_blocking=True)
                if self.alpha == 0.0:
                    param.copy_(g)
                elif self.alpha < 1.0:
                    param.mul_(self.alpha).add_(g, alpha=1.0 - self.alpha)
        outer_s = time.perf_counter() - t0
        s = inf.work.stats
        self._rounds.append(
            RoundStats(
                fragment=p,
                send_step=inf.send_step,
                apply_step=self.step_count,
                numel=f.global_.numel(),
                bytes_sent=s.bytes_sent,
                pseudo_grad_norm=inf.norm,
                mean_pseudo_grad_norm=mean_norm,
                cosine_to_mean=cosine,
                momentum_norm=f.momentum.momentum.norm(),
                encode_s=s.encode_s,
                comm_s=s.comm_s,
                decode_s=s.decode_s,
                wait_s=s.wait_s,
                send_s=inf.send_s,
                outer_s=outer_s,
                final=inf.final,
            )
        )

    def _gather_shards(self, f: _Fragment) -> None:
        """Rebuild the whole global fragment from the shards of the processes of this replica."""
        gather_shards(
            f.global_, shard_bounds(f.global_.numel(), self.num_shards, self.codec.block), self.shard_group
        )


def step_replicas(dilocos: Sequence[DiLoCo]) -> None:
    """``step()`` for several replicas driven by one thread (LocalGroup): all sends, then all applies."""
    for d in dilocos:
        d.send_due()
    for d in dilocos:
        d.apply_due()


def finish_replicas(dilocos: Sequence[DiLoCo]) -> None:
    """``finish()`` for several replicas driven by one thread."""
    for d in dilocos:
        d.send_due(final=True)
    for d in dilocos:
        d.apply_due(final=True)
