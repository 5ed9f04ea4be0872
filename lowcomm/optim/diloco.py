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
import hashlib
import logging
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .._checks import refuse
from .._compat import dtensor_type
from ..comm import Codec, ReplicaGroup, Work, get_codec
from ..comm.distributed import gather_shards, mesh_position, shard_position
from ..comm.group import ReduceStats, device_wait_s
from ..comm.reduce import shard_bounds
from .config import DiLoCoConfig
from .fragments import assign_buffers, build_fragments, find_blocks, synced_buffers
from .outer import NesterovState, apply_update, nesterov_init, nesterov_update
from .schedule import sends_at

__all__ = ["DiLoCo", "RoundStats", "build_fragments", "find_blocks", "step_replicas", "finish_replicas"]

log = logging.getLogger(__name__)

#: the most bytes of parameters one start-up broadcast carries (:meth:`DiLoCo.__init__`)
START_BUCKET_BYTES = 64 << 20

#: the round statistics kept until :meth:`DiLoCo.drain_round_stats` (the oldest go first)
MAX_UNDRAINED_ROUNDS = 4096

#: buffers (running statistics) are averaged exactly, whatever the pseudo-gradients' codec
_BUFFER_CODEC = get_codec("fp32")
STATE_VERSION = 2  # 2: one in-flight slot per fragment (a fixed layout, for torch.distributed.checkpoint)
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
    #: seconds the training stream stood still for this round on a GPU (CUDA buffers of a
    #: process group: :func:`~lowcomm.comm.group.device_wait_s`; None elsewhere), read by
    #: :meth:`DiLoCo.drain_round_stats`
    device_wait_s: float | None = None

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
    buffers: list[str] = field(default_factory=list)  # the model's buffers synced with this fragment
    global_buffers: torch.Tensor | None = None  # their mean (fp32; bitwise alike on every replica)

    def locals(self) -> list[torch.Tensor]:
        """What this process holds of the fragment's parameters: a DTensor's local shard (looked
        up each time: FSDP2 may give a parameter a new local tensor at its first forward)."""
        return [local_tensor(p) for p in self.params]


# the DiLoCo each inner optimizer steps through attach() (one at most)
_ATTACHED: weakref.WeakKeyDictionary[torch.optim.Optimizer, DiLoCo] = weakref.WeakKeyDictionary()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (what this process holds and its optimizer updates; writing to
    it writes the parameter), any other tensor as it is."""
    cls = dtensor_type()
    if cls is not None and isinstance(t, cls):
        with torch.no_grad():  # the local tensor itself, not an autograd view of it
            return t.to_local()
    return t


@dataclass
class _InFlight:
    work: Work
    send_step: int
    due_step: int
    delta: torch.Tensor
    norm: torch.Tensor  # 0-dim, on the outer device
    final: bool = False
    send_s: float = 0.0
    buffers: Work | None = None  # the mean of the fragment's buffers (sync_buffers)
    buffers_sent: torch.Tensor | None = None


class DiLoCo:
    """DiLoCo / Streaming DiLoCo for one replica.

    Args:
        model: this replica's model; its parameters are the local parameters θ.
        inner_optimizer: the replica's inner optimizer (its state is never averaged), or a
            framework's wrapper of one (accelerate's: its inner optimizer is taken). When given,
            :meth:`step` checks that it stepped exactly once since the previous call. None skips
            the check.
        group: the replicas this one synchronizes with.
        config: the settings (:class:`~lowcomm.optim.DiLoCoConfig`); keyword arguments override
            its fields (``sync_every=100, fragments=4, codec="e3m0"``, ...).
        shard_group: the torch.distributed group of the processes that hold this same replica
            (inner DDP). Each of its ``k`` processes syncs only its 1/k shard of every fragment
            over ``group`` (its outer group) and keeps momentum for that shard; after a round the
            shards of the global copy are all-gathered inside the replica. Not for parameters
            that are sharded already: with FSDP2 (``fully_shard``: DTensor parameters over the
            replica's own processes) each process syncs its local shards over ``group``, its
            outer group (the same position in every replica), and nothing more is needed.

    A replica spread over ``k`` processes (``shard_group``, or DTensor parameters) is ``k``
    parts: :meth:`state_dict` keys each process's state by its part, so that
    ``torch.distributed.checkpoint`` over the replica's processes keeps every part.

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
        inner_optimizer = unwrap_optimizer(inner_optimizer)
        _check_types(model, inner_optimizer, group)
        cfg = (config or DiLoCoConfig()).replace(**settings) if settings else (config or DiLoCoConfig())
        wrappers = _wrappers(model)
        module = wrappers[-1]  # parameters and buffers by the model's own names
        frag_names = build_fragments(module, cfg.fragments, cfg.pattern)

        self.config = cfg
        self.model, self.inner_optimizer, self.group = model, inner_optimizer, group
        self._module = module
        self.sync_every, self.num_fragments, self.overlap = cfg.sync_every, len(frag_names), cfg.overlap
        self.pattern, self.alpha = cfg.pattern, float(cfg.alpha)
        self.outer_lr, self.outer_momentum = float(cfg.outer_lr), float(cfg.outer_momentum)
        self.codec = cfg.codec if isinstance(cfg.codec, Codec) else get_codec(cfg.codec, cfg.codec_block)
        self.error_feedback, self.reduce = cfg.error_feedback, cfg.reduce
        _warn_if_wrapped_across_replicas(wrappers, group)
        if not cfg.sync_buffers:
            _warn_of_buffers(module, group)
        buffer_names = assign_buffers(module, frag_names) if cfg.sync_buffers else [[] for _ in frag_names]
        params = dict(module.named_parameters())
        buffers = [module.get_buffer(n) for names in buffer_names for n in names]
        synced = [n for names in frag_names for n in names]
        is_synced = set(synced)
        frozen = [n for n in params if n not in is_synced]  # copied at start-up, never synced
        meta = [n for n in synced + frozen if params[n].is_meta]
        if meta:
            raise ValueError(
                f"parameter {meta[0]!r} is on the meta device (it has no values yet): build DiLoCo "
                "once the model's weights exist (after model.to_empty(device=...) and their init)"
            )
        for n in synced:
            if not params[n].is_floating_point():
                raise ValueError(
                    f"parameter {n!r} is {params[n].dtype}: DiLoCo syncs floating-point parameters "
                    "(its global copy and pseudo-gradients are fp32); hold it as a buffer or as real "
                    "and imaginary parts (torch.view_as_real)"
                )
        _check_optimizer_updates(inner_optimizer, [params[n] for n in synced])
        # before any traffic: replicas built from different models are refused naming the parameter
        # that differs (a broadcast of unequal sizes fails in the backend, or hangs), and so are
        # replicas told to start alike in different ways (one broadcasting while the others resume
        # with init "none" would wait in a collective no other replica enters)
        group.verify_same(
            "model's parameters and init",
            {
                "init": cfg.init,
                **{
                    f"{'param' if n in is_synced else 'frozen param'} {n}": [
                        str(params[n].dtype),
                        *local_tensor(params[n]).shape,
                    ]
                    for n in synced + frozen
                },
            },
        )
        first = params[synced[0]]
        self.outer_device = _usable_outer_device(cfg.outer_device, first.device)
        self.shard_group = shard_group
        self.num_shards, self.shard = shard_position(shard_group)
        self.part = _part_of(params, group, shard_group, self.shard, self.num_shards)
        self._fsdp_modules = [m for m in module.modules() if _is_fsdp2(m)]
        self._reshard()
        # frozen parameters too (as DDP does): replicas that differ in them would never agree
        self._start_from_the_same_weights(
            group,
            [local_tensor(params[n]) for n in synced] + buffers + [local_tensor(params[n]) for n in frozen],
            cfg.init,
        )
        pin = self.outer_device.type == "cpu" and first.device.type == "cuda"

        self.step_count = 0
        self._frags: list[_Fragment] = []
        for names, bufs in zip(frag_names, buffer_names):
            ps = [params[n] for n in names]
            g = self._flatten([local_tensor(p) for p in ps])
            if pin:
                g = g.pin_memory()
            lo, hi = shard_bounds(g.numel(), self.num_shards, self.codec.block)[self.shard]
            self._frags.append(
                _Fragment(
                    names=names,
                    params=ps,
                    numels=[local_tensor(p).numel() for p in ps],
                    global_=g,
                    momentum=nesterov_init(g[lo:hi]),
                    residual=torch.zeros_like(g[lo:hi]) if cfg.error_feedback else None,
                    lo=lo,
                    hi=hi,
                    buffers=bufs,
                )
            )
            self._frags[-1].global_buffers = self._flatten(self._buffers(self._frags[-1]))
        self._inflight: dict[int, _InFlight] = {}
        self._rounds: list[tuple[RoundStats, ReduceStats]] = []  # each with its reduce's device events
        # inner steps taken since the last step(): the ordering check (see step())
        self._inner_steps = 0
        self._attached = None  # the optimizer hook of attach()
        self._hook = (
            inner_optimizer.register_step_post_hook(self._count_inner_step)
            if inner_optimizer is not None
            else None
        )
        group.verify_same("DiLoCo configuration", self._fingerprint())

    def _count_inner_step(self, *_: Any) -> None:
        self._inner_steps += 1

    @staticmethod
    def _start_from_the_same_weights(group: ReplicaGroup, params: list[nn.Parameter], init: str) -> None:
        """Every replica must start from the same weights (replicas that do not train apart for
        ever: nothing in DiLoCo pulls them together). ``params``: the synced parameters, buffers
        and frozen parameters. ``broadcast``: replica 0's bytes are copied to every replica, as
        DDP does; ``check``: a digest of each replica's is compared and replicas that differ are
        refused by name. Groups that cannot broadcast (an elastic job, whose joiners get the job's
        state from a member) check.

        Their bytes go in buckets of at most :data:`START_BUCKET_BYTES` (a tensor larger than
        that alone, in place), so start-up holds no copy of the whole model (one of a 7B model in
        bf16 is 14 GB, on the GPU beside its weights); the digest is of all of them in order, the
        same as of one concatenation."""
        digest = hashlib.sha256()
        with torch.no_grad():
            for bucket in _byte_buckets(params, START_BUCKET_BYTES):
                # their bytes, whatever their dtypes: every replica gets replica 0's bits exactly
                # (an fp64 or fp16 parameter too)
                alone = len(bucket) == 1 and bucket[0].is_contiguous()
                flat = (
                    bucket[0].detach().view(-1).view(torch.uint8)  # (a view: broadcast in place)
                    if alone
                    else torch.cat([p.detach().reshape(-1).view(torch.uint8) for p in bucket])
                )
                if init == "broadcast":
                    try:
                        group.broadcast_(flat)
                    except NotImplementedError:  # (at the first bucket, before any traffic)
                        init = "check"
                    else:
                        offset = 0
                        for p in bucket if not alone else ():
                            n = p.numel() * p.element_size()
                            p.copy_(flat[offset : offset + n].clone().view(p.dtype).view_as(p))
                            offset += n
                if init != "none":
                    digest.update(flat.cpu().numpy())
        if init != "none":
            group.verify_same("initial parameters", {"sha256": digest.hexdigest()})

    # ---- hook mode ----------------------------------------------------------------------------

    def attach(self) -> DiLoCo:
        """Step DiLoCo from the inner optimizer: after every ``optimizer.step()`` (a post hook, as
        torchft does), so a training loop needs no ``diloco.step()`` call; gradient accumulation
        counts optimizer steps, as it should. One replica per process (with ``LocalGroup`` drive
        the replicas with :func:`step_replicas`). Returns ``self``.

        Raises:
            ValueError: no inner optimizer was given, or another DiLoCo is attached to it (a cell
                run twice in a notebook: both would sync every round and step it twice).
        """
        if self.inner_optimizer is None:
            raise ValueError("attach() steps DiLoCo from the inner optimizer: pass it to DiLoCo(...)")
        other = _ATTACHED.get(self.inner_optimizer)
        if other is not None and other is not self:
            raise ValueError(
                "another DiLoCo is attached to this inner optimizer (both would sync every round): "
                "call detach() on the first one, or keep using it"
            )
        if self._attached is None:
            self._attached = self.inner_optimizer.register_step_post_hook(lambda *_: self.step())
            _ATTACHED[self.inner_optimizer] = self
        return self

    def detach(self) -> None:
        """Stop stepping from the optimizer (call :meth:`step` yourself again)."""
        if self._attached is not None:
            self._attached.remove()
            self._attached = None
            _ATTACHED.pop(self.inner_optimizer, None)

    @contextlib.contextmanager
    def attached(self) -> Iterator[DiLoCo]:
        """``with diloco.attached(): train(...)``: :meth:`attach` for the block."""
        self.attach()
        try:
            yield self
        finally:
            self.detach()

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
        """Round statistics completed since the last call (their norms read back in one go); the
        last :data:`MAX_UNDRAINED_ROUNDS` of them, so that a loop that never calls it does not
        hold every round of a long run."""
        drained, self._rounds = self._rounds, []
        out = [r for r, _ in drained]
        if out:
            values = torch.stack([torch.stack([getattr(r, f) for r in out]) for f in _DEVICE_STATS]).tolist()
            for f, vals in zip(_DEVICE_STATS, values):
                for r, v in zip(out, vals):
                    setattr(r, f, v)
            for r, stats in drained:  # (the read above waited for the device: both events have run)
                r.device_wait_s = device_wait_s(stats)
                log.debug("round of fragment %d at step %d: %s", r.fragment, r.apply_step, r.to_dict())
        return out

    def global_vector(self) -> torch.Tensor:
        """All global fragments concatenated (fp32), e.g. to compare replicas."""
        return torch.cat([f.global_ for f in self._frags])

    @contextlib.contextmanager
    def global_parameters(self) -> Iterator[nn.Module]:
        """Temporarily load the global (outer) parameters into the model, e.g. for evaluation
        (with ``sync_buffers``, the synchronized buffers' last mean too)."""
        saved = [t.detach().clone() for t, _ in self._global_pairs()]
        try:
            self.sync_local_parameters()
            yield self.model
        finally:
            self._reshard()  # (evaluation's forwards leave FSDP2's root gathered)
            with torch.no_grad():
                for (t, _), s in zip(self._global_pairs(), saved):
                    t.copy_(s)

    def sync_local_parameters(self) -> None:
        """Set the local parameters (and synchronized buffers) to the global ones (a joiner starts
        from the job's state, so its first pseudo-gradient holds only its own progress)."""
        self._reshard()
        with torch.no_grad():
            for t, g in self._global_pairs():
                t.copy_(g)

    def _reshard(self) -> None:
        """Before the parameters' shards are written: FSDP2 keeps a module's parameters gathered
        after a forward that no backward followed (its root's after every forward; evaluation's),
        and its next forward uses them as they are. Resharded, the next forward gathers the
        shards as DiLoCo wrote them."""
        for m in self._fsdp_modules:
            m.reshard()

    def _global_pairs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(local tensor, its global values) for every parameter and synchronized buffer."""
        for f in self._frags:
            yield from zip(f.locals(), self._views(f))
            yield from self._buffer_views(f, f.global_buffers)

    @property
    def in_flight(self) -> int:
        """Rounds sent and not yet applied."""
        return len(self._inflight)

    # ---- state --------------------------------------------------------------------------------

    def state_dict(self, *, compact: bool = False) -> dict:
        """Everything needed to continue bit for bit.

        As ``nn.Module.state_dict()``, the tensors are the live state, on the outer device, not
        copies: save the state before training on (a save that runs beside training copies it
        first, as asynchronous checkpointers do). No tensor is allocated on the outer device.

        The layout is fixed by the configuration and the model (each fragment has one in-flight
        slot, empty or not), so the state saves and loads with ``torch.distributed.checkpoint``
        beside the model and optimizer (DiLoCo is ``Stateful``), which loads into the tensors of
        the layout in place: an empty slot holds zeros of its fragment's size, in host memory.
        ``compact=True`` gives an empty slot empty tensors instead, for a save that is not
        ``torch.distributed.checkpoint``'s (``torch.save``: vanilla DiLoCo's state is then two
        thirds of the size; :meth:`load_state_dict` takes either). A replica of ``k > 1`` processes
        (:attr:`part`) nests each process's state under its part, ``{"version": 2, "part i of k":
        {...}}``: its processes hold different shards, and a checkpoint over the replica's
        processes keeps one entry per key. Save each replica's state apart (its own process group
        and folder): the replicas' local parameters and in-flight rounds differ too."""
        out = {
            "step": self.step_count,
            "replica": self.group.rank,  # (whose it is: see load_state_dict's own)
            "config": self._config_key(),
            "fragments": [],
        }

        def empty(like: torch.Tensor) -> torch.Tensor:  # (an empty slot: never on the accelerator)
            return torch.zeros(0 if compact else like.shape, dtype=like.dtype)

        for p, f in enumerate(self._frags):
            inf = self._inflight.get(p)
            out["fragments"].append(
                {
                    "names": list(f.names),
                    "global": f.global_,
                    "momentum": f.momentum.momentum,
                    "residual": f.residual,
                    "last_send": f.last_send,
                    "global_buffers": f.global_buffers,  # (empty for a fragment without any)
                    "inflight": {
                        "active": inf is not None,
                        "send_step": inf.send_step if inf else 0,
                        "due_step": inf.due_step if inf else 0,
                        "delta": inf.delta if inf else empty(f.momentum.momentum),  # (this process's shard)
                        "norm": float(inf.norm) if inf else 0.0,
                        "final": inf.final if inf else False,
                        # the buffers' delta as sent (sync_buffers; empty for a fragment without any)
                        "buffers": (
                            inf.buffers_sent
                            if inf is not None and inf.buffers_sent is not None
                            else empty(f.global_buffers)
                        ),
                    },
                }
            )
        if self.part[1] == 1:
            return {"version": STATE_VERSION, **out}
        return {"version": STATE_VERSION, self._part_key(): out}

    def _part_key(self) -> str:
        return f"part {self.part[0]} of {self.part[1]}"

    def load_state_dict(self, state: dict, own: bool | None = None, *, rounds: bool | None = None) -> None:
        """Restore :meth:`state_dict` output; in-flight rounds are started again in send order.
        ``own`` False: the state is another replica's (a static job that resumes with another
        number of replicas starts each from one replica's checkpoint): only the job's part is
        taken (the global parameters, the outer momentum, the schedule's position); the local
        parameters are set to the global ones, that replica's rounds in flight are not sent and
        its error-feedback residual is not kept.

        ``rounds`` (default: ``own``) starts the state's rounds in flight again. A replica that
        takes another's state among replicas that resume their own (which start theirs again)
        passes True, or the replicas' collectives would not line up; it then sends that
        replica's contributions to them (the one it resumes as a copy of).

        ``own`` None (the default, and what ``torch.distributed.checkpoint`` calls): the state
        is this replica's own unless it records another replica's (a replica added to a resumed
        job, loading replica 0's checkpoint), which is then taken as above, its rounds in flight
        sent again (``rounds`` True) as the replicas that resume their own send theirs.

        Raises:
            ValueError: a state from another version, configuration, model or part.
        """
        if not isinstance(state, dict) or "version" not in state:
            got = (
                f"a dict of keys {sorted(map(str, state))[:5]}"
                if isinstance(state, dict)
                else type(state).__name__
            )
            raise ValueError(
                f"not a DiLoCo state (what DiLoCo.state_dict() returns, with its 'version'): {got}"
            )
        if state["version"] != STATE_VERSION:
            raise ValueError(
                f"DiLoCo state version must be {STATE_VERSION}, got {state['version']!r} (another lowcomm "
                "version's state)"
            )
        parts = sorted(k for k in state if isinstance(k, str) and k.startswith("part "))
        if self.part[1] > 1 and self._part_key() in state:
            state = state[self._part_key()]
        elif parts:  # (one process's own state, unnested, is taken as it is)
            raise ValueError(
                f"DiLoCo state holds {parts}, the parts of a replica of several processes; this "
                f"process is {self._part_key()} (a state saved by another layout of processes)"
            )
        missing = sorted({"step", "config", "fragments"} - set(state))
        if missing:
            keys = sorted(map(str, state))
            raise ValueError(f"DiLoCo state lacks {missing} (its keys: {keys}): not a DiLoCo state")
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
                saved, here = set(fs["names"]), set(f.names)
                diff = sorted(saved ^ here)[:4]
                raise ValueError(
                    f"fragment {i} of the state holds other parameters than this model's ({diff} "
                    f"in one and not the other; saved {len(saved)}, here {len(here)}): a state of "
                    "another model, or of another fragment layout (explicit fragments, pattern, or "
                    "a lowcomm whose split by count placed the parameters outside the blocks elsewhere)"
                )
        if own is None:
            saved_by = state.get("replica", self.group.rank)  # (an older lowcomm's: this replica's)
            own = saved_by == self.group.rank
            rounds = True if rounds is None else rounds
            if not own:
                log.warning(
                    "replica %d takes replica %s's DiLoCo state (step %s): the job's part of it (global "
                    "parameters, outer momentum, step); its local parameters are the global ones, and it "
                    "sends replica %s's rounds in flight again",
                    self.group.rank,
                    saved_by,
                    state["step"],
                    saved_by,
                )
        for fs, f in zip(state["fragments"], self._frags):
            f.global_.copy_(fs["global"])
            f.momentum.momentum.copy_(fs["momentum"])
            if f.residual is not None and own:
                f.residual.copy_(fs["residual"])
            elif f.residual is not None:  # (another replica's quantization error is not this one's)
                f.residual.zero_()
            f.last_send = int(fs["last_send"])
            saved = fs.get("global_buffers")  # (a state of an older lowcomm has none: keep the current)
            if isinstance(saved, torch.Tensor) and saved.numel() == f.global_buffers.numel():
                f.global_buffers.copy_(saved)
        self.step_count = int(state["step"])
        # a loaded state starts the ordering check afresh: a checkpoint loader may have stepped the
        # optimizer to make its state (torch.distributed.checkpoint.state_dict's get_state_dict,
        # at lr 0), which is no training step
        self._inner_steps = 0
        self._inflight.clear()
        if not own:
            self.sync_local_parameters()
        if not (own if rounds is None else rounds):
            return
        slots = [(p, fs["inflight"]) for p, fs in enumerate(state["fragments"]) if fs["inflight"]["active"]]
        for p, it in sorted(slots, key=lambda pit: int(pit[1]["send_step"])):  # started again in send order
            delta = it["delta"].to(self.outer_device, torch.float32).clone()
            work = self.group.all_reduce_mean(delta, self.codec, self.reduce, tag=int(it["send_step"]))
            norm = torch.tensor(float(it["norm"]), device=delta.device)
            inf = _InFlight(work, int(it["send_step"]), int(it["due_step"]), delta, norm, bool(it["final"]))
            f = self._frags[p]
            if f.buffers:  # a state saved without them (an older lowcomm's) sends the buffers as they are
                sent = it.get("buffers")
                fits = isinstance(sent, torch.Tensor) and sent.numel() == f.global_buffers.numel()
                self._send_buffers(
                    inf, sent.to(self.outer_device, torch.float32).clone() if fits else self._buffer_delta(f)
                )
            self._inflight[p] = inf

    # ---- internals ----------------------------------------------------------------------------

    def _fingerprint(self) -> dict:
        """What every replica must agree on: the schedule, the codec, the outer step, the model shape."""
        return {
            **self._config_key(),
            "pattern": self.pattern,
            "alpha": self.alpha,
            "outer_lr": self.outer_lr,
            "outer_momentum": self.outer_momentum,
            "part": list(self.part),
            # the buffers each fragment syncs (every replica must send the same ones)
            **{
                f"buffer {n}": [i, *self._module.get_buffer(n).shape]
                for i, f in enumerate(self._frags)
                for n in f.buffers
            },
            # one key per parameter, so that a mismatch names the parameter: [fragment, *shape]
            **{
                f"param {n}": [i, *p.shape]
                for i, f in enumerate(self._frags)
                for n, p in zip(f.names, f.locals())
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

    def _flatten(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """``tensors`` in one fp32 vector on the outer device (empty for none)."""
        flat = [t.detach().reshape(-1).to(self.outer_device, torch.float32) for t in tensors]
        return torch.cat(flat) if flat else torch.zeros(0, device=self.outer_device)

    def _views(self, f: _Fragment) -> list[torch.Tensor]:
        return [g.view(p.shape) for g, p in zip(torch.split(f.global_, f.numels), f.locals())]

    def _send(self, p: int, due: int, final: bool = False) -> None:
        t0 = time.perf_counter()
        f = self._frags[p]
        delta = f.global_[f.lo : f.hi] - self._flatten(f.locals())[f.lo : f.hi]  # Δ = θ_global − θ_local
        if f.residual is not None:
            delta += f.residual
        norm = delta.norm()
        work = self.group.all_reduce_mean(delta, self.codec, self.reduce, tag=self.step_count)
        inf = _InFlight(work, self.step_count, due, delta, norm, final)
        if f.buffers:
            self._send_buffers(inf, self._buffer_delta(f))
        f.last_send = self.step_count
        inf.send_s = time.perf_counter() - t0
        self._inflight[p] = inf

    def _buffers(self, f: _Fragment) -> list[torch.Tensor]:
        """The fragment's buffers as the model holds them now (looked up by name: ``model.to()``
        replaces buffer tensors, where it keeps parameter objects)."""
        return [self._module.get_buffer(n) for n in f.buffers]

    def _buffer_views(self, f: _Fragment, flat: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(buffer, its values in ``flat``) for each of the fragment's buffers."""
        bufs = self._buffers(f)
        for buf, v in zip(bufs, torch.split(flat, [b.numel() for b in bufs])):
            yield buf, v.view(buf.shape).to(buf.device, buf.dtype, non_blocking=True)

    def _buffer_delta(self, f: _Fragment) -> torch.Tensor:
        """How far the fragment's buffers moved from their global values. Their mean is exchanged,
        not the values': a buffer equal on every replica (a constant table) stays bit for bit,
        where a mean of M equal values can be off by an ulp (about 15% of random fp32 values at
        M = 3) and would drift a little every round.

        Raises:
            RuntimeError: a buffer changed size since the wrapper was built (a cache that grows).
        """
        bufs = self._buffers(f)
        flat = self._flatten(bufs)
        if flat.numel() != f.global_buffers.numel():
            shapes = {n: tuple(b.shape) for n, b in zip(f.buffers, bufs)}
            raise RuntimeError(
                f"DiLoCo step {self.step_count}: buffers {shapes} hold {flat.numel()} values, "
                f"{f.global_buffers.numel()} when DiLoCo was built; synchronized buffers keep their "
                "size (pass sync_buffers=False for a model whose buffers grow)"
            )
        return flat - f.global_buffers

    def _send_buffers(self, inf: _InFlight, delta: torch.Tensor) -> None:
        """Start the mean of a fragment's :meth:`_buffer_delta` beside its pseudo-gradient (fp32:
        running statistics are values, not small differences a 4-bit code could carry)."""
        inf.buffers_sent = delta
        inf.buffers = self.group.all_reduce_mean(delta, _BUFFER_CODEC, self.reduce, tag=inf.send_step)

    def _apply_buffers(self, f: _Fragment, inf: _InFlight) -> int:
        """Move the fragment's global buffers by the mean delta (its buffers' mean) and merge them
        into the model (as the parameters: ``alpha``); returns the bytes the buffers' reduce sent."""
        f.global_buffers = f.global_buffers + inf.buffers.wait()
        self._merge(*zip(*self._buffer_views(f, f.global_buffers)))
        return inf.buffers.stats.bytes_sent

    @torch.no_grad()
    def _merge(self, targets=(), values=()) -> None:
        """``target = alpha·target + (1 − alpha)·value`` for each pair (the model's local tensors
        and their global values, already on their device and dtype), in a few multi-tensor
        operations, not two launches a tensor."""
        if self.alpha == 0.0:
            for t, v in zip(targets, values):
                t.copy_(v)
        elif self.alpha < 1.0 and targets:
            torch._foreach_mul_(list(targets), self.alpha)
            torch._foreach_add_(list(targets), list(values), alpha=1.0 - self.alpha)

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
        self._reshard()
        params = f.locals()
        self._merge(
            params, [g.to(p.device, p.dtype, non_blocking=True) for p, g in zip(params, self._views(f))]
        )
        outer_s = time.perf_counter() - t0
        s = inf.work.stats
        sent = s.bytes_sent + (self._apply_buffers(f, inf) if inf.buffers is not None else 0)
        log.info(
            "round of fragment %d: sent at step %d, applied at step %d, %d bytes sent, waited %.4fs",
            p,
            inf.send_step,
            self.step_count,
            sent,
            s.wait_s,
        )
        rs = RoundStats(
            fragment=p,
            send_step=inf.send_step,
            apply_step=self.step_count,
            numel=f.global_.numel(),
            bytes_sent=sent,
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
        self._rounds.append((rs, s))  # s: its device events, timed when the round is drained
        if len(self._rounds) > MAX_UNDRAINED_ROUNDS:  # a loop that never drains them holds no more
            del self._rounds[: len(self._rounds) - MAX_UNDRAINED_ROUNDS]

    def _gather_shards(self, f: _Fragment) -> None:
        """Rebuild the whole global fragment from the shards of the processes of this replica."""
        gather_shards(
            f.global_, shard_bounds(f.global_.numel(), self.num_shards, self.codec.block), self.shard_group
        )


def _usable_outer_device(outer_device: str | torch.device | None, params_device: torch.device):
    """``outer_device`` (unset: the parameters' device), refused by name where this process
    cannot allocate on it (``cuda`` without a GPU, a GPU index past the last, ``meta``)."""
    if outer_device is None:
        return params_device
    device = torch.device(outer_device)
    allowed = f"'cpu' or the parameters' device ({params_device}), or unset"
    if device.type == "meta":
        raise refuse("outer_device", str(outer_device), f"a device that holds values: {allowed}")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:  # torch without CUDA raises AssertionError
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise refuse(
            "outer_device", str(outer_device), f"{allowed}; this process cannot use it ({why})"
        ) from None
    return device


def _part_of(
    params: dict[str, torch.Tensor], group: ReplicaGroup, shard_group, shard: int, num_shards: int
) -> tuple[int, int]:
    """``(i, k)``: this process is part ``i`` of the ``k`` that hold one replica. With a
    ``shard_group``, its position there; with DTensor parameters (FSDP2), its position among the
    ranks of their device meshes; else ``(0, 1)``.

    Raises:
        ValueError: DTensor parameters beside a ``shard_group``, a parameter with a Partial
            placement, or device meshes that hold processes of two replicas (DiLoCo would average
            one replica's shard with another's shard of other values).
    """
    cls = dtensor_type()
    sharded = {n: p for n, p in params.items() if cls is not None and isinstance(p, cls)}
    if not sharded:
        return shard, num_shards
    first = next(iter(sharded))
    if shard_group is not None:
        raise ValueError(
            "shard_group is for a replica whose processes each hold the whole model (inner DDP); "
            f"parameter {first!r} is a DTensor (sharded, as by FSDP2's fully_shard): pass shard_group=None"
        )
    for n, p in sharded.items():
        if any(pl.is_partial() for pl in p.placements):
            raise ValueError(
                f"parameter {n!r} has placements {tuple(p.placements)}: DiLoCo syncs parameters that are "
                "sharded or replicated (Shard, Replicate), not Partial sums"
            )
    index, count, ranks = mesh_position({id(p.device_mesh): p.device_mesh for p in sharded.values()}.values())
    across = sorted(set(ranks) & set(group.global_ranks()))
    if len(across) > 1:
        raise ValueError(
            f"parameter {first!r} is sharded across replicas: global ranks {across} are in both its device "
            "mesh and DiLoCo's group, so one replica's shard would be averaged with another's of other "
            "values; shard each replica over its own processes (Topology.inner) and give DiLoCo the group "
            "of the same position in every replica (Topology.outer)"
        )
    return index, count


def _warn_of_buffers(model: nn.Module, group: ReplicaGroup) -> None:
    """With ``sync_buffers=False`` a floating-point buffer saved with the model (BatchNorm's
    running statistics) keeps each replica's own values, so replicas drift apart in it and an
    evaluation of the global parameters uses the evaluating replica's. Said once per job (by
    replica 0); constant buffers are unaffected, and transformers usually have none."""
    if group.rank != 0:
        return
    names = synced_buffers(model)
    if names:
        log.warning(
            "sync_buffers=False: the model's floating-point buffers are not synchronized (%s%s): "
            "each replica keeps its own values (BatchNorm statistics drift apart; constant buffers "
            "are unaffected)",
            ", ".join(names[:3]),
            f" and {len(names) - 3} more" if len(names) > 3 else "",
        )


def _is_fsdp2(module: nn.Module) -> bool:
    """Whether ``module`` was sharded by FSDP2's ``fully_shard`` (it became an ``FSDPModule``)."""
    return any(c.__name__ == "FSDPModule" for c in type(module).__mro__) and callable(
        getattr(module, "reshard", None)
    )


def _byte_buckets(tensors: list[torch.Tensor], limit: int) -> Iterator[list[torch.Tensor]]:
    """``tensors`` in order, in runs of at most ``limit`` bytes (a larger one alone)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        n = t.numel() * t.element_size()
        if bucket and size + n > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += n
    if bucket:
        yield bucket


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside a framework's wrapper (accelerate's ``AcceleratedOptimizer``,
    which the HF Trainer and ``Accelerator.prepare`` hand out): the one whose step hooks fire. The
    wrapper is an Optimizer without an Optimizer's own state, so a hook cannot be registered on
    it; its ``step()`` steps the inner one (or skips it, when gradients are still accumulating or
    a scaled step overflowed: no inner step, and DiLoCo counts none)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _check_types(model: Any, inner_optimizer: Any, group: Any) -> None:
    """TypeError naming the argument that is not what DiLoCo takes (it was an AttributeError from
    deep inside: "'str' object has no attribute 'named_parameters'")."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if inner_optimizer is not None and not (
        hasattr(inner_optimizer, "param_groups") and hasattr(inner_optimizer, "register_step_post_hook")
    ):
        raise TypeError(
            f"inner_optimizer must be a torch.optim.Optimizer or None, got {type(inner_optimizer).__name__}"
        )
    if not isinstance(group, ReplicaGroup):
        raise TypeError(
            f"group must be a lowcomm ReplicaGroup (LocalGroup.create(M)[i], DistributedGroup, ...), "
            f"got {type(group).__name__}"
        )


def _check_optimizer_updates(inner_optimizer: Any, synced: list[torch.Tensor]) -> None:
    """Refuse an inner optimizer that updates none of the synced parameters (built over another
    model's, a copy's): DiLoCo would sync weights the inner steps never change, and train nothing.
    A parameter counts as updated when the optimizer holds a tensor on its storage (the trainer's
    batched replicas are views of one stacked tensor per parameter)."""
    if inner_optimizer is None:
        return
    held = {
        local_tensor(q).untyped_storage().data_ptr()
        for g in inner_optimizer.param_groups
        for q in g["params"]
        if isinstance(q, torch.Tensor)
    }
    if not any(local_tensor(p).untyped_storage().data_ptr() in held for p in synced):
        raise ValueError(
            f"inner_optimizer updates none of the model's {len(synced)} trained parameters (was it built "
            "over another model, or a copy of this one?): build it over this model's parameters"
        )


def _wrappers(model: nn.Module) -> list[nn.Module]:
    """``model`` and the modules it wraps, down to the one whose parameter names are the model's
    own: torch.compile's wrapper adds ``_orig_mod.`` to every name and DDP ``module.``, so a
    replica that compiles (or wraps) and one that does not, or a run resumed without compiling,
    would otherwise hold the same parameters under other names."""
    from torch.nn.parallel import DistributedDataParallel

    chain = [model]
    while True:
        m = chain[-1]
        if isinstance(m, DistributedDataParallel):
            chain.append(m.module)
        elif type(m).__name__ == "OptimizedModule" and isinstance(getattr(m, "_orig_mod", None), nn.Module):
            chain.append(m._orig_mod)
        else:
            return chain


def _warn_if_wrapped_across_replicas(wrappers: list[nn.Module], group: ReplicaGroup) -> None:
    """DDP whose process group holds processes of two replicas all-reduces gradients every step
    across them: the communication DiLoCo exists to avoid (a framework that saw the launcher's
    RANK / WORLD_SIZE did it). Wrapping inside one replica (inner DDP) is fine."""
    from torch.nn.parallel import DistributedDataParallel

    ddp = next((m for m in wrappers if isinstance(m, DistributedDataParallel)), None)
    if ddp is None:
        return
    across = group.shared_ranks(ddp.process_group)
    if len(across) > 1:
        log.warning(
            "the model is wrapped in DistributedDataParallel across replicas (global ranks %s are in "
            "both its group and DiLoCo's): gradients are all-reduced every step, which DiLoCo is "
            "meant to avoid. Under lowcomm launch or torchrun with Lightning or the HF Trainer, call "
            "lowcomm.integrations.replica_group() before building the trainer",
            across,
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
