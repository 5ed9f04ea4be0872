"""The trainer's configuration: one frozen dataclass, loadable from TOML or JSON and the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..comm import CODECS
from ..comm.distributed import parse_bandwidth, parse_duration
from ..comm.reduce import REDUCE_METHODS
from ..kernels.linear import PRECISIONS
from ..optim.schedule import PATTERNS, validate_schedule

__all__ = ["TrainConfig", "MODES", "load_config_file"]

MODES = ("diloco", "dp")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a reference training run depends on.

    Attributes:
        mode: "diloco" (DiLoCo / Streaming DiLoCo) or "dp" (a fp32 gradient mean every step).
        replicas: M, number of replicas (each trains on its own data stream).
        sync_every: H, inner steps between two syncs of a fragment.
        fragments: P, fragments synced in turn (1 = vanilla DiLoCo).
        pattern: how blocks are split into fragments: "strided" or "sequential".
        overlap: τ, inner steps a fragment's all-reduce overlaps with (0 = blocking); τ·P < H.
        alpha: merge weight of local parameters, in [0, 1] (0 = take the global ones).
        outer_lr: η of the outer Nesterov step.
        outer_momentum: μ of the outer Nesterov step, in [0, 1).
        codec: wire format of the pseudo-gradients (DP always sends fp32).
        codec_block: elements per scale of block-scaled codecs.
        error_feedback: carry each round's quantization error into the next.
        reduce: "two_phase" or "all_gather" mean all-reduce.
        final_sync: after the last step, sync every fragment that has unsynced progress.
        model_dim, layers, heads, seq_len: shape of the reference GPT.
        batch_size: sequences per replica per inner step.
        steps: inner steps per replica.
        lr: peak inner AdamW learning rate; warmup then cosine to ``lr * min_lr_ratio``.
        min_lr_ratio: final fraction of the peak learning rate.
        warmup: linear warm-up steps.
        weight_decay: AdamW decay on matrices (not on biases, norms).
        grad_clip: global gradient-norm clip (0 = off).
        eval_every: evaluate the global parameters every this many steps (0 = only at the end).
        eval_batches: validation batches per evaluation (fixed windows).
        seed: seeds the model init and every replica's data stream.
        corpus: "stdlib", a directory of text files, or a .bin file of uint16 tokens.
        run_dir: where the run's records go.
        threads: torch intra-op threads (0 = torch's default).
        outer_device: device of DiLoCo's outer state ("cpu" keeps it off the accelerator).
        device: where the replicas train ("cpu", "cuda", or "auto").
        procs_per_replica: processes per replica in a multi-process job (inner DDP group); the
            launcher's LOWCOMM_PROCS_PER_REPLICA wins when set.
        link_bandwidth: emulate this bandwidth per replica on the outer collectives, e.g. "100Mbit"
            (multi-process jobs only).
        link_latency: emulate this latency per outer collective, e.g. "20ms".
        timeout: seconds a peer may stay silent in a collective before the round fails.
        precision: matmul precision of the Linear layers: "fp32", "mxfp8", "fp8_rowwise" or
            "fp8_tensorwise" (emulated on CPU; the output head stays in full precision).
        coordinator: "tcp://host:port" of an elastic job's coordinator: this process is one
            worker (one replica) that may join at any time; the key comes from $LOWCOMM_KEY.
        worker_id: this worker's name in the elastic job (default: hostname-pid); it also picks
            the worker's data stream.
        advertise_addr: the address peers should use for this worker (collectives and state
            transfers); default: this host's address on the route to the coordinator.
        transfer_inner_state: joiners also receive the donor's inner optimizer state.
        heartbeat: seconds between an elastic worker's heartbeats.
        checkpoint_every: an elastic worker writes its whole state to run_dir/checkpoint.lcs
            every this many steps (0 = never); atomically, with a checksum.
        resume: a checkpoint to continue from ("auto" = run_dir/checkpoint.lcs if it exists).
    """

    mode: str = "diloco"
    replicas: int = 4
    sync_every: int = 50
    fragments: int = 1
    pattern: str = "strided"
    overlap: int = 0
    alpha: float = 0.0
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    codec: str = "fp32"
    codec_block: int = 128
    error_feedback: bool = False
    reduce: str = "two_phase"
    final_sync: bool = True
    model_dim: int = 128
    layers: int = 4
    heads: int = 4
    seq_len: int = 128
    batch_size: int = 8
    steps: int = 600
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    seed: int = 0
    corpus: str = "stdlib"
    run_dir: str = "runs/default"
    threads: int = 0
    outer_device: str | None = None
    device: str = "cpu"
    procs_per_replica: int = 1
    link_bandwidth: str | None = None
    link_latency: str | None = None
    timeout: float = 300.0
    precision: str = "fp32"
    coordinator: str | None = None
    worker_id: str | None = None
    advertise_addr: str | None = None
    transfer_inner_state: bool = False
    heartbeat: float = 0.5
    checkpoint_every: int = 0
    resume: str | None = None

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, allowed: str) -> None:
            if not cond:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed: {allowed}")

        def is_int(name: str, lo: int) -> bool:
            v = getattr(self, name)
            return isinstance(v, int) and not isinstance(v, bool) and v >= lo

        def is_num(name: str) -> bool:
            v = getattr(self, name)
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        need(self.mode in MODES, "mode", f"one of {list(MODES)}")
        need(self.codec in CODECS, "codec", f"one of {list(CODECS)}")
        need(self.pattern in PATTERNS, "pattern", f"one of {list(PATTERNS)}")
        need(self.reduce in REDUCE_METHODS, "reduce", f"one of {list(REDUCE_METHODS)}")
        need(self.device in ("cpu", "cuda", "auto"), "device", "'cpu', 'cuda' or 'auto'")
        need(self.precision in PRECISIONS, "precision", f"one of {list(PRECISIONS)}")
        for name in (
            "replicas",
            "procs_per_replica",
            "sync_every",
            "fragments",
            "model_dim",
            "layers",
            "heads",
            "seq_len",
            "batch_size",
            "steps",
            "eval_batches",
            "codec_block",
        ):
            need(is_int(name, 1), name, "an int >= 1")
        for name in ("overlap", "warmup", "eval_every", "seed", "threads", "checkpoint_every"):
            need(is_int(name, 0), name, "an int >= 0")
        need(is_num("alpha") and 0 <= self.alpha <= 1, "alpha", "a number in [0, 1]")
        need(is_num("outer_lr") and self.outer_lr > 0, "outer_lr", "a number > 0")
        need(
            is_num("outer_momentum") and 0 <= self.outer_momentum < 1, "outer_momentum", "a number in [0, 1)"
        )
        need(is_num("lr") and self.lr > 0, "lr", "a number > 0")
        need(is_num("min_lr_ratio") and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "a number in [0, 1]")
        need(is_num("weight_decay") and self.weight_decay >= 0, "weight_decay", "a number >= 0")
        need(is_num("grad_clip") and self.grad_clip >= 0, "grad_clip", "a number >= 0 (0 = off)")
        need(is_num("timeout") and self.timeout > 0, "timeout", "a number of seconds > 0")
        need(is_num("heartbeat") and 0 < self.heartbeat <= 10, "heartbeat", "a number of seconds in (0, 10]")
        if self.coordinator is not None:
            need(
                isinstance(self.coordinator, str) and self.coordinator.startswith("tcp://"),
                "coordinator",
                "an endpoint like 'tcp://host:29400'",
            )
            need(self.mode == "diloco", "mode", "'diloco' in an elastic job (--coordinator)")
            need(
                self.procs_per_replica == 1,
                "procs_per_replica",
                "1 in an elastic job (one process per worker)",
            )
        else:  # a static job: every replica runs to the end or the job fails (torchrun restarts it)
            need(
                self.checkpoint_every == 0,
                "checkpoint_every",
                "0 without --coordinator (elastic workers write them)",
            )
            need(self.resume is None, "resume", "unset without --coordinator (elastic workers resume)")
        for name, parse in (("link_bandwidth", parse_bandwidth), ("link_latency", parse_duration)):
            if getattr(self, name) is not None:
                parse(getattr(self, name))  # raises, naming the value and the accepted forms
        need(self.model_dim % self.heads == 0, "heads", f"a divisor of model_dim={self.model_dim}")
        need(
            self.fragments <= self.layers + 1,
            "fragments",
            f"at most layers + 1 = {self.layers + 1} (blocks plus one fragment for embeddings, head, norm)",
        )
        if self.mode == "diloco":
            validate_schedule(self.sync_every, self.fragments, self.overlap)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a mapping; keys may use '-' or '_'; an unknown key raises ValueError naming it."""
        known = {f.name for f in fields(cls)}
        clean = {}
        for k, v in data.items():
            key = str(k).replace("-", "_")
            if key not in known:
                raise ValueError(f"unknown config key {k!r}; allowed: {sorted(known)}")
            clean[key] = v
        return cls(**clean)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (``.toml``) or JSON config file into a dict (a ``[train]`` table is unwrapped)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file {str(p)!r} does not exist")
    text = p.read_text()
    if p.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        data = tomllib.loads(text)
    elif p.suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"config file {str(p)!r} must end in .toml or .json")
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(p)!r} must hold a table of keys")
    return data.get("train", data)
