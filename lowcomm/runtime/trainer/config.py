"""The trainer's configuration: small frozen sections, loadable from TOML, JSON and the command line.

``TrainConfig`` holds one section per concern, each a frozen dataclass that checks its own values:

    [run]      mode, replicas, steps, evaluation, seed, run directory, device   (RunConfig)
    [model]    the reference GPT and its matmul precision                        (ModelConfig)
    [optim]    the inner AdamW and its schedule                                   (OptimConfig)
    [data]     the corpus and the batch                                           (DataConfig)
    [diloco]   how replicas synchronize                                          (lowcomm.optim.DiLoCoConfig)
    [link]     an emulated slower network between processes                      (LinkConfig)
    [elastic]  the coordinator of an elastic job and the worker's part in it     (ElasticConfig)

Every field also has a flat name, the command-line flag without its dashes (``--model-dim`` is
``model_dim``, ``--link-latency`` is ``link_latency``, every other field is its own name), so a
configuration file may use sections or flat keys, and :meth:`TrainConfig.replace` takes flat
names. ``config.json`` in a run directory records the flat form.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ... import _compat
from ..._checks import env_int, is_int, is_number, refuse
from ..._configfile import read_config_file
from ...comm.distributed import local_gpu_index, parse_bandwidth, parse_duration
from ...kernels.linear import FAST_ACCUM, FAST_ACCUM_MODES, PRECISIONS
from ...optim.config import DiLoCoConfig

__all__ = [
    "MODES",
    "DEVICES",
    "DTYPES",
    "REPLICA_BATCHING",
    "TrainConfig",
    "RunConfig",
    "ModelConfig",
    "OptimConfig",
    "DataConfig",
    "LinkConfig",
    "ElasticConfig",
    "load_config_file",
    "FLAT",
]

from ..net import check_endpoint, valid_host, valid_name
from .metrics import METRICS
from .profiling import parse_profile_steps

MODES = ("diloco", "dp")
DEVICES = ("cpu", "cuda", "auto")  # and "cuda:N", GPU N
DTYPES = ("auto", "fp32", "bf16")
REPLICA_BATCHING = ("auto", "batched", "sequential")
#: the largest --seed (numpy's range)
SEED_MAX = 2**32 - 1


def _is_gpu_index(v: Any) -> bool:
    """``v`` is ``cuda:N``, N a decimal GPU index."""
    return isinstance(v, str) and v.startswith("cuda:") and v[5:].isdigit() and v[5:].isascii()


def _int(obj: Any, name: str, lo: int, flag: str | None = None, hi: int | None = None) -> None:
    v = getattr(obj, name)
    if not (is_int(v, lo) and (hi is None or v <= hi)):
        raise refuse(flag or name, v, f"an int >= {lo}" if hi is None else f"an int in [{lo}, {hi}]")


def _num(obj: Any, name: str, ok, allowed: str, flag: str | None = None) -> None:
    v = getattr(obj, name)
    if not (is_number(v) and ok(v)):
        raise refuse(flag or name, v, allowed)


def _choice(obj: Any, name: str, choices: tuple, flag: str | None = None) -> None:
    v = getattr(obj, name)
    if v not in choices:
        raise refuse(flag or name, v, f"one of {list(choices)}")


def _bool(obj: Any, name: str, flag: str | None = None) -> None:
    v = getattr(obj, name)
    if not isinstance(v, bool):
        raise refuse(flag or name, v, "true or false")


def _text(obj: Any, name: str, optional: bool = False) -> None:
    v = getattr(obj, name)
    if not (isinstance(v, str) and v) and not (optional and v is None):
        raise refuse(name, v, "a non-empty string" + (" or unset" if optional else ""))


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """What runs, where, and what it records.

    Attributes:
        mode: "diloco" (DiLoCo / Streaming DiLoCo) or "dp" (a fp32 gradient mean every step).
        replicas: M, replicas in one process (a multi-process job has one replica per
            ``procs_per_replica`` processes, whatever this says).
        steps: inner steps per replica.
        final_sync: after the last step, sync every fragment that has unsynced progress.
        eval_every: evaluate the global parameters every this many steps (0 = only at the end).
        eval_batches: validation batches per evaluation (fixed windows).
        seed: seeds the model init and every replica's data stream.
        run_dir: where the run's records go.
        threads: torch intra-op threads (0 = torch's default).
        device: where the replicas train: "cpu", "cuda", "cuda:N" (GPU N), or "auto" (cuda when
            available). "cuda" is the current GPU, or in a process of torchrun or ``lowcomm
            launch``, GPU ``LOCAL_RANK`` (modulo the GPUs it sees); "cuda:N" picks one for a
            process no launcher placed (an elastic worker on a machine with several GPUs).
        dtype: compute precision: "bf16" (autocast; master weights and optimizer state stay fp32),
            "fp32" (TF32 matmuls allowed on CUDA), or "auto" (bf16 on CUDA, fp32 on CPU).
        compile: torch.compile the model's forward and backward (the DiLoCo step stays outside).
        replica_batching: how the replicas of one process compute: "batched" (the reference GPT's
            M replicas as one batched computation), "sequential" (one after the other), or "auto"
            (batched on CUDA when there are several replicas and the precision is fp32; sequential
            on CPU, where it gives the same bits as a multi-process job).
        log_every: losses stay on the device and are read back (recorded, checked, shown) every
            this many steps, at evaluations and at the end; no host sync in between.
        metrics: where metrics go besides the JSONL records: "jsonl" (the records alone),
            "tensorboard" (<run_dir>/tensorboard) or "wandb" (offline unless WANDB_MODE says otherwise).
        overwrite: replace the run in a run directory that already holds files: its records,
            checkpoints and injected faults, once the new run is under way (a run refused before,
            by a check or by the coordinator, leaves them; without it, such a directory is refused
            and left as it is).
        procs_per_replica: processes per replica in a multi-process job (inner DDP group); the
            launcher's LOWCOMM_PROCS_PER_REPLICA wins when set.
        timeout: seconds a peer may stay silent in a collective before the round fails.
        profile: "A:B" profiles steps A+1 to B with torch.profiler: a Chrome trace and a table of
            the operators by their own GPU (or CPU) time in the run directory
            (profile-steps<A+1>-<B>[-rank<R>].json / .txt); "" (the default) profiles nothing.
    """

    mode: str = "diloco"
    replicas: int = 4
    steps: int = 600
    final_sync: bool = True
    eval_every: int = 100
    eval_batches: int = 8
    seed: int = 0
    run_dir: str = "runs/default"
    threads: int = 0
    device: str = "cpu"
    dtype: str = "auto"
    compile: bool = False
    replica_batching: str = "auto"
    log_every: int = 10
    metrics: str = "jsonl"
    overwrite: bool = False
    procs_per_replica: int = 1
    timeout: float = 300.0
    profile: str = ""

    def job_procs_per_replica(self) -> int:
        """k of a multi-process job: the launcher's LOWCOMM_PROCS_PER_REPLICA when it set one (it
        placed the processes), else ``procs_per_replica``."""
        return env_int("LOWCOMM_PROCS_PER_REPLICA", 0) or self.procs_per_replica

    def __post_init__(self) -> None:
        _choice(self, "mode", MODES)
        if not (self.device in DEVICES or _is_gpu_index(self.device)):
            raise refuse("device", self.device, f"one of {list(DEVICES)} or 'cuda:N' (GPU N)")
        _choice(self, "dtype", DTYPES)
        _choice(self, "replica_batching", REPLICA_BATCHING)
        _choice(self, "metrics", METRICS)
        for name in ("replicas", "steps", "eval_batches", "procs_per_replica", "log_every"):
            _int(self, name, 1)
        for name in ("eval_every", "threads"):
            _int(self, name, 0)
        # numpy's range; the samplers' seeds (seed * 1_000_003 + stream) stay within int64
        _int(self, "seed", 0, hi=SEED_MAX)
        _bool(self, "final_sync")
        _bool(self, "compile")
        _bool(self, "overwrite")
        _text(self, "run_dir")
        _num(self, "timeout", lambda v: v > 0, "a number of seconds > 0")
        parse_profile_steps(self.profile, self.steps)

    def torch_device(self) -> torch.device:
        """The device ``device`` names on this machine (``auto``: cuda when available).

        Raises:
            ValueError: ``cuda`` on a machine without a usable GPU.
        """
        if self.device == "cpu" or (self.device == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise refuse("device", self.device, "'cpu' or 'auto' on this machine (torch sees no CUDA GPU)")
        count, launched = torch.cuda.device_count(), local_gpu_index()
        if _is_gpu_index(self.device):
            n = int(self.device.removeprefix("cuda:"))
            if launched is not None:
                raise refuse(
                    "device",
                    self.device,
                    f"'cuda' in a process of a launcher, which takes GPU LOCAL_RANK % {count} = {launched}",
                )
            if n >= count:
                raise refuse("device", self.device, f"cuda:0 .. cuda:{count - 1} (torch sees {count} GPU(s))")
            return torch.device("cuda", n)
        return torch.device("cuda", launched if launched is not None else torch.cuda.current_device())

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """The autocast dtype on ``device`` (float32: no autocast).

        Raises:
            ValueError: bf16 on a GPU without bf16 support.
        """
        if self.dtype == "fp32" or (self.dtype == "auto" and device.type != "cuda"):
            return torch.float32
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise refuse(
                "dtype", self.dtype, f"'fp32' on this GPU ({torch.cuda.get_device_name(device)} has no bf16)"
            )
        return torch.bfloat16

    def check_compile(self, precision: str = "fp32") -> str | None:
        """Raises ValueError when ``compile`` is asked for and torch.compile cannot run here;
        returns what a log should say when it runs the model's ``precision`` layers (not fp32)
        outside the graph (torch < 2.7), else None."""
        if not self.compile:
            return None
        try:
            import torch._dynamo as dynamo

            supported = dynamo.is_dynamo_supported()
        except Exception:  # an old or partial torch
            supported = False
        if not supported:
            raise refuse("compile", True, "false on this Python/torch (torch.compile is not supported here)")
        if precision != "fp32" and not _compat.compiles_layer_backward():
            return (
                f"torch {torch.__version__} cannot compile the {precision} layers' backward (from torch 2.7 "
                "it can): --compile runs each of them outside the graph, as in eager mode"
            )
        return None


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The reference GPT (see :mod:`lowcomm.lm.model`).

    Attributes:
        dim: width (flag ``--model-dim``); a multiple of ``heads``.
        layers: transformer blocks.
        heads: attention heads.
        seq_len: context length in tokens.
        precision: matmul precision of the Linear layers: "fp32", "mxfp8", "mxfp8_fast",
            "fp8_rowwise", "fp8_tensorwise" or "fp8_delayed" (tensorwise, scales from the last
            16 steps' maxima); emulated on CPU, on a GPU run on its fp8 or MX hardware or refused
            at start-up (fp8: sm_89+; mxfp8: sm_90 with Triton, or sm_100; mxfp8_fast: sm_90);
            the output head stays in full precision.
        fast_accum: which GEMMs of the fp8 precisions sum in the fp8 MMA's own precision on a GPU
            (torch._scaled_mm's fast accumulation) instead of promoting to fp32: "fprop" (the
            forward's, as TransformerEngine and torchao do), "all" or "none"; no effect on the MX
            precisions or on a CPU's emulated GEMMs.
    """

    dim: int = 128
    layers: int = 4
    heads: int = 4
    seq_len: int = 128
    precision: str = "fp32"
    fast_accum: str = FAST_ACCUM

    def __post_init__(self) -> None:
        _int(self, "dim", 1, "model_dim")
        for name in ("layers", "heads", "seq_len"):
            _int(self, name, 1)
        _choice(self, "precision", PRECISIONS)
        _choice(self, "fast_accum", FAST_ACCUM_MODES)
        if self.dim % self.heads:
            raise refuse("heads", self.heads, f"a divisor of model_dim={self.dim}")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """The inner optimizer: AdamW, β = (0.9, 0.99), linear warm-up then cosine decay.

    Attributes:
        lr: peak learning rate.
        min_lr_ratio: final fraction of the peak learning rate.
        warmup: linear warm-up steps.
        weight_decay: AdamW decay on matrices (not on biases, norms).
        grad_clip: global gradient-norm clip (0 = off).
    """

    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        _num(self, "lr", lambda v: v > 0, "a number > 0")
        _num(self, "min_lr_ratio", lambda v: 0 <= v <= 1, "a number in [0, 1]")
        _int(self, "warmup", 0)
        _num(self, "weight_decay", lambda v: v >= 0, "a number >= 0")
        _num(self, "grad_clip", lambda v: v >= 0, "a number >= 0 (0 = off)")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """What the replicas read.

    Attributes:
        corpus: "stdlib" (the Python standard library's sources), a directory of text files, a
            text file (bytes), or a .bin file of uint16 tokens.
        batch_size: sequences per replica (per process of a replica) per inner step.
    """

    corpus: str = "stdlib"
    batch_size: int = 8

    def __post_init__(self) -> None:
        _text(self, "corpus")
        _int(self, "batch_size", 1)


@dataclass(frozen=True, kw_only=True)
class LinkConfig:
    """An emulated slower network on the outer collectives (multi-process jobs only).

    Attributes:
        bandwidth: per replica, e.g. "100Mbit" (flag ``--link-bandwidth``).
        latency: per collective, e.g. "20ms" (flag ``--link-latency``).
    """

    bandwidth: str | None = None
    latency: str | None = None

    def __post_init__(self) -> None:
        if self.bandwidth is not None:
            if not isinstance(self.bandwidth, str):  # (a TOML number: the unit is missing)
                raise refuse(
                    "link_bandwidth", self.bandwidth, "a rate with its unit, e.g. '100Mbit' or '50MB'"
                )
            parse_bandwidth(self.bandwidth)  # raises, naming the value and the accepted forms
        if self.latency is not None:
            if not isinstance(self.latency, str):
                raise refuse("link_latency", self.latency, "a duration with its unit, e.g. '20ms' or '1.5s'")
            parse_duration(self.latency)

    @property
    def emulated(self) -> bool:
        return self.bandwidth is not None or self.latency is not None


@dataclass(frozen=True, kw_only=True)
class ElasticConfig:
    """This process as one worker of an elastic job (set ``coordinator`` to join one).

    Attributes:
        coordinator: "tcp://host:port" of the job's coordinator; the key comes from $LOWCOMM_KEY
            or $LOWCOMM_KEY_FILE.
        worker_id: this worker's name in the job (default: hostname-pid); it also picks the
            worker's data stream.
        advertise_addr: the address peers should use for this worker (collectives and state
            transfers); default: this host's address on the route to the coordinator.
        transfer_inner_state: joiners also receive the donor's inner optimizer state.
        heartbeat: seconds between the worker's heartbeats.
        coordinator_timeout: seconds the worker waits for a coordinator that does not answer
            (registering, in a round, joining) before it gives up with an error; a restarted
            coordinator answers within seconds.
        checkpoint_every: write this process's whole state (every replica it trains; an elastic
            worker's own) to run_dir/checkpoint.lcs every this many steps (0 = never), atomically,
            with a checksum; each process of a static job of several writes
            run_dir/checkpoint-rank<RANK>.lcs. Also without ``coordinator``.
        resume: a checkpoint to continue from, bit for bit: a file, a run directory (its newest
            checkpoint), or "auto" (this process's file in run_dir if it exists, else a fresh
            start; a job of several processes takes "auto").
        max_retries: attempts of a round that fail in this worker itself (an error raised here
            naming no missing peer), in a row, after which it leaves the job with an error so
            the others go on without it (0 = retry for ever).
    """

    coordinator: str | None = None
    worker_id: str | None = None
    advertise_addr: str | None = None
    transfer_inner_state: bool = False
    heartbeat: float = 0.5
    coordinator_timeout: float = 600.0
    checkpoint_every: int = 0
    resume: str | None = None
    max_retries: int = 10

    def __post_init__(self) -> None:
        if self.coordinator is not None:
            check_endpoint(self.coordinator, "coordinator", "tcp://host:29400")
        _text(self, "worker_id", optional=True)
        if self.worker_id is not None and not valid_name(self.worker_id):
            raise refuse("worker_id", self.worker_id, "printable ASCII without spaces, 1..128 characters")
        _text(self, "advertise_addr", optional=True)
        if self.advertise_addr is not None and not valid_host(self.advertise_addr):
            raise refuse("advertise_addr", self.advertise_addr, "an IP address or a host name")
        _text(self, "resume", optional=True)
        _bool(self, "transfer_inner_state")
        _num(self, "heartbeat", lambda v: 0 < v <= 10, "a number of seconds in (0, 10]")
        _num(self, "coordinator_timeout", lambda v: v > 0, "a number of seconds > 0")
        _int(self, "checkpoint_every", 0)
        _int(self, "max_retries", 0)

    @property
    def enabled(self) -> bool:
        return self.coordinator is not None


SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "data": DataConfig,
    "diloco": DiLoCoConfig,
    "link": LinkConfig,
    "elastic": ElasticConfig,
}
#: flat names that are not their field's own name
_RENAMED = {
    ("model", "dim"): "model_dim",
    ("link", "bandwidth"): "link_bandwidth",
    ("link", "latency"): "link_latency",
}
#: flat name -> (section, field), for every field of every section
FLAT: dict[str, tuple[str, str]] = {
    _RENAMED.get((sec, f.name), f.name): (sec, f.name) for sec, cls in SECTIONS.items() for f in fields(cls)
}
#: the trainer's DiLoCo defaults differ from the wrapper's in one place: H = 50 suits its short runs
_DILOCO_DEFAULTS = {"sync_every": 50}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a training run depends on, in sections (see the module docstring)."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diloco: DiLoCoConfig = field(default_factory=lambda: DiLoCoConfig(**_DILOCO_DEFAULTS))
    link: LinkConfig = field(default_factory=LinkConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)

    def __post_init__(self) -> None:
        for sec, cls in SECTIONS.items():
            if not isinstance(getattr(self, sec), cls):
                raise refuse(sec, getattr(self, sec), f"a {cls.__name__}")
        run, el, d = self.run, self.elastic, self.diloco
        if not isinstance(d.fragments, int):
            raise refuse(
                "fragments", d.fragments, "a count in the trainer (explicit fragments are for DiLoCo())"
            )
        if d.fragments > self.model.layers + 1:
            raise refuse(
                "fragments",
                d.fragments,
                f"at most layers + 1 = {self.model.layers + 1} (blocks plus one fragment for embeddings, "
                "head, norm)",
            )
        if run.replica_batching == "batched" and self.model.precision != "fp32":
            raise refuse(
                "replica_batching",
                run.replica_batching,
                f"'sequential' or 'auto' with precision={self.model.precision!r} (its layers run one "
                "replica at a time)",
            )
        if el.enabled:
            if run.mode != "diloco":
                raise refuse("mode", run.mode, "'diloco' in an elastic job (--coordinator)")
            if run.procs_per_replica != 1:
                raise refuse(
                    "procs_per_replica", run.procs_per_replica, "1 in an elastic job (one process per worker)"
                )
            if d.reduce != "two_phase":
                raise refuse("reduce", d.reduce, "'two_phase' in an elastic job (its guarded reduce)")

    # ---- flat names ---------------------------------------------------------------------------

    @classmethod
    def from_flat(cls, **flat: Any) -> TrainConfig:
        """Build from flat names (``TrainConfig.from_flat(model_dim=64, codec="e3m0")``)."""
        return cls().replace(**flat)

    def replace(self, **flat: Any) -> TrainConfig:
        """A copy with the fields named by their flat names changed; an unknown name raises
        ValueError naming it and the allowed ones."""
        changes: dict[str, dict[str, Any]] = {}
        for name, value in flat.items():
            if name not in FLAT:
                raise ValueError(f"unknown config key {name!r}; allowed: {sorted(FLAT)}")
            sec, fname = FLAT[name]
            changes.setdefault(sec, {})[fname] = value
        sections = {sec: dataclasses.replace(getattr(self, sec), **kv) for sec, kv in changes.items()}
        return dataclasses.replace(self, **sections)

    def flat(self) -> dict[str, Any]:
        """Every field by its flat name (what ``config.json`` records)."""
        return {name: getattr(getattr(self, sec), fname) for name, (sec, fname) in FLAT.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a mapping of flat keys and/or section tables (``[model]``, ``[diloco]``, ...);
        keys may use '-' or '_'. An unknown key raises ValueError naming it and the allowed ones."""
        return cls.from_flat(**cls.flat_from_dict(data))

    @staticmethod
    def flat_from_dict(data: dict[str, Any]) -> dict[str, Any]:
        """:meth:`from_dict`'s mapping by flat names, not yet checked as a configuration: a config
        file's keys, to which a command line's flags are added before the whole is checked (a file
        with ``heads = 3`` and the flags ``--model-dim 24 --heads 2`` is a valid run)."""
        flat: dict[str, Any] = {}
        for k, v in data.items():
            key = str(k).replace("-", "_")
            if key in SECTIONS:
                if not isinstance(v, dict):
                    raise ValueError(f"config section [{key}] must be a table of keys, got {v!r}")
                for fk, fv in v.items():
                    fkey = str(fk).replace("-", "_")
                    names = {f.name for f in fields(SECTIONS[key])}
                    if fkey not in names:
                        raise ValueError(f"unknown key {fk!r} in section [{key}]; allowed: {sorted(names)}")
                    flat[_RENAMED.get((key, fkey), fkey)] = fv
            elif isinstance(v, dict) and key not in FLAT:  # a table: a misspelt section
                raise ValueError(f"unknown config section [{k}]; allowed: {[f'[{n}]' for n in SECTIONS]}")
            else:
                flat[key] = v  # (an unknown one is named when the configuration is built)
        return flat


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (``.toml``) or JSON config file into a dict (a ``[train]`` table is unwrapped;
    keys beside it, which it would hide, are refused naming them)."""
    data = read_config_file(path)
    if not isinstance(data.get("train"), dict):
        return data
    beside = sorted(k for k in data if k != "train")
    if beside:
        shown = [f"[{k}]" if isinstance(data[k], dict) else k for k in beside]
        raise ValueError(
            f"config file {str(path)!r} holds {shown} "
            "beside its [train] table, which would be ignored: put them inside [train] "
            "([train.diloco] for a section), or drop the [train] table"
        )
    return data["train"]
