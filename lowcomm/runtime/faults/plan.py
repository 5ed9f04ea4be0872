"""Fault plans: which faults, where and when; checked before a job starts.

A plan is a TOML or JSON file (or repeated ``--fault`` flags)::

    seed = 7
    [[faults]]
    kind = "kill"          # SIGKILL; the chaos runner restarts the worker unless restart = false
    target = "worker:1"
    at_step = 60
    [[faults]]
    kind = "preempt"       # SIGTERM: it ends its step (and checkpoints it) and leaves; restarted too
    target = "worker:2"
    at_time = 30
    [[faults]]
    kind = "corrupt"
    target = "random"
    at_round = 3

Keys of a fault:
    kind: one of :data:`KINDS`.
    target: "worker:ID" (a worker id, or an index i meaning worker "w{i}" of a local job),
        "replica:N" / "rank:N" (the N-th worker), "random" (drawn from the seed), "coordinator".
    trigger, exactly one of: at_step (inner step, >= 1), at_round (collective number, >= 0),
        at_time (seconds since the worker started), probability (per inner step, in (0, 1]).
    duration: seconds the fault lasts (hang, delay, slow-link, partition; default 3).
    where: the hook point (default per kind, see :data:`DEFAULT_HOOK`); one of :data:`HOOKS`.
    restart: kill and preempt only: restart the worker afterwards (chaos runner; default true).
    delay: delay only: seconds added to every inner step while it lasts (default 0.5).
    bandwidth / latency: slow-link only, e.g. "10Mbit" and "50ms".
    direction: partition only: "peers" (cannot reach the other workers; the default) or
        "coordinator" (cannot reach the coordinator).
    nbytes: corrupt only: bytes flipped in the payload (default 16).

A plan is checked before the job starts (:meth:`FaultPlan.check`): unknown kinds or keys,
targets that do not exist and triggers out of range are refused with the value and what is
allowed. Everything random (targets "random", probabilities) is drawn from ``seed``, so a plan
replays the same faults.

Hooks: :class:`~lowcomm.runtime.faults.FaultInjector` fires a plan's faults at the hook points of
:class:`lowcomm.runtime.hooks.FaultHooks`; see :mod:`lowcomm.runtime.faults.injector`.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Any

from ..._checks import is_int, is_number
from ..._configfile import read_config_file
from ...comm.distributed import parse_bandwidth, parse_duration

__all__ = [
    "KINDS",
    "HOOKS",
    "ROUND_KINDS",
    "LASTING_KINDS",
    "STATIC_KINDS",
    "ENDING_KINDS",
    "STATIC_HOOKS",
    "Fault",
    "FaultPlan",
    "InjectedFault",
]

KINDS = (
    "kill",
    "preempt",
    "hang",
    "delay",
    "slow-link",
    "drop-round",
    "corrupt",
    "nan",
    "partition",
    "coordinator-kill",
    "checkpoint-fail",
)
#: where a fault may act (``where``); ``during_collective`` is a round's reduce: drop-round and
#: corrupt act as it starts, kill and hang between its two exchanges (a death mid-round)
HOOKS = (
    "before_step",
    "after_step",
    "before_collective",
    "during_collective",
    "during_transfer",
    "checkpoint_write",
)
TRIGGERS = ("at_step", "at_round", "at_time", "probability")
DEFAULT_HOOK = {
    "kill": None,  # by trigger: at_round -> during_collective, else before_step
    "preempt": "before_step",  # SIGTERM to itself: the step under way ends the run
    "hang": "before_step",
    "delay": "before_step",
    "slow-link": "before_step",
    "drop-round": "during_collective",
    "corrupt": "during_collective",
    "nan": "before_collective",
    "partition": "before_step",
    "coordinator-kill": None,  # the chaos runner acts on the coordinator
    "checkpoint-fail": "checkpoint_write",
}
ROUND_KINDS = ("drop-round", "corrupt", "nan")  # need a round to act on
#: end the worker's process (``restart``: the chaos runner starts it again; a static job's
#: launcher restarts the job)
ENDING_KINDS = ("kill", "preempt")
_STEP_HOOKS = ("before_step", "after_step")
#: what a static job (``lowcomm launch`` / torchrun) can inject: its rounds are unguarded, it has
#: no coordinator and no transfers, and a killed process fails the whole job (its launcher's
#: ``--max-restarts`` restarts it, and ``--resume auto`` continues from the checkpoints)
STATIC_KINDS = ("kill", "preempt", "hang", "delay", "checkpoint-fail")
STATIC_HOOKS = ("before_step", "after_step", "checkpoint_write")
LASTING_KINDS = ("hang", "delay", "slow-link", "partition")  # last ``duration`` seconds
_KEYS = {
    "kind",
    "target",
    *TRIGGERS,
    "duration",
    "where",
    "restart",
    "delay",
    "bandwidth",
    "latency",
    "direction",
    "nbytes",
    "id",
}


class InjectedFault(OSError):
    """Raised by a hook whose fault makes an operation fail (a checkpoint write, a transfer)."""


@dataclass
class Fault:
    kind: str
    target: str
    at_step: int | None = None
    at_round: int | None = None
    at_time: float | None = None
    probability: float | None = None
    duration: float = 3.0
    where: str | None = None
    restart: bool = True
    delay: float = 0.5
    bandwidth: str | None = None
    latency: str | None = None
    direction: str = "peers"
    nbytes: int = 16
    id: int = 0

    @property
    def trigger(self) -> str:
        return next(t for t in TRIGGERS if getattr(self, t) is not None)

    @property
    def hook(self) -> str | None:
        if self.where is not None:
            return self.where
        if self.kind == "kill":
            return "during_collective" if self.at_round is not None else "before_step"
        return DEFAULT_HOOK[self.kind]

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _fault(i: int, raw: Any) -> Fault:
    where = f"fault {i}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a table of keys, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_KEYS)}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{where}: kind={kind!r} is not allowed; allowed: {list(KINDS)}")
    if not isinstance(raw.get("target"), str):
        raise ValueError(f"{where}: target must be a string like 'worker:1', 'random' or 'coordinator'")
    triggers = [t for t in TRIGGERS if raw.get(t) is not None]
    if len(triggers) != 1:
        raise ValueError(f"{where}: give exactly one trigger of {list(TRIGGERS)}, got {triggers}")
    f = Fault(**{**raw, "id": i})
    t = f.trigger
    v = getattr(f, t)
    if t == "at_step" and not is_int(v, 1):
        raise ValueError(f"{where}: at_step={v!r} must be an int >= 1")
    if t == "at_round" and not is_int(v, 0):
        raise ValueError(f"{where}: at_round={v!r} must be an int >= 0")
    if t == "at_time" and not (is_number(v) and v >= 0):  # (inf: a fault that never fires)
        raise ValueError(f"{where}: at_time={v!r} must be seconds >= 0")
    if t == "probability" and not (is_number(v) and 0 < v <= 1):
        raise ValueError(f"{where}: probability={v!r} must be in (0, 1]")
    if kind in ROUND_KINDS and t != "at_round":
        raise ValueError(f"{where}: a {kind} fault acts on a round: use at_round")
    if f.where is not None and f.where not in HOOKS:
        raise ValueError(f"{where}: where={f.where!r} is not a hook point; allowed: {list(HOOKS)}")
    if kind == "preempt" and t == "at_round":
        raise ValueError(f"{where}: a preempt fault comes at a step: use at_step, at_time or probability")
    if kind == "preempt" and f.hook not in _STEP_HOOKS:
        raise ValueError(
            f"{where}: a preempt fault comes at a step: where={f.where!r}; allowed: {list(_STEP_HOOKS)}"
        )
    if not (is_number(f.duration) and 0 < f.duration <= 3600):
        raise ValueError(f"{where}: duration={f.duration!r} must be seconds in (0, 3600]")
    if not (is_number(f.delay) and 0 <= f.delay <= 60):
        raise ValueError(f"{where}: delay={f.delay!r} must be seconds in [0, 60]")
    if f.direction not in ("peers", "coordinator"):
        raise ValueError(f"{where}: direction={f.direction!r}; allowed: 'peers', 'coordinator'")
    if not is_int(f.nbytes, 1):
        raise ValueError(f"{where}: nbytes={f.nbytes!r} must be an int >= 1")
    if not isinstance(f.restart, bool):  # ("no", a string, would restart it)
        raise ValueError(f"{where}: restart={f.restart!r} must be true or false")
    if kind == "slow-link":
        if f.bandwidth is None and f.latency is None:
            raise ValueError(f"{where}: a slow-link fault needs bandwidth and/or latency")
        if f.bandwidth is not None:
            parse_bandwidth(f.bandwidth)
        if f.latency is not None:
            parse_duration(f.latency)
    if (kind == "coordinator-kill") != (f.target == "coordinator"):
        raise ValueError(f"{where}: target 'coordinator' goes with kind 'coordinator-kill' (and only it)")
    return f


@dataclass
class FaultPlan:
    seed: int = 0
    faults: list[Fault] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict) -> FaultPlan:
        if not isinstance(data, dict):
            raise ValueError("a fault plan is a table with 'seed' and a list 'faults'")
        unknown = sorted(set(data) - {"seed", "faults"})
        if unknown:
            raise ValueError(f"fault plan: unknown key(s) {unknown}; allowed: ['faults', 'seed']")
        seed = data.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"fault plan: seed={seed!r} must be an int")
        raw = data.get("faults", [])
        if not isinstance(raw, list):
            raise ValueError("fault plan: 'faults' must be a list of tables")
        return cls(seed, [_fault(i, r) for i, r in enumerate(raw)])

    @classmethod
    def load(cls, spec: str | os.PathLike) -> FaultPlan:
        """From a .toml or .json file, or inline JSON text."""
        text = str(spec)
        if text.lstrip().startswith("{"):
            try:
                return cls.from_dict(json.loads(text))
            except json.JSONDecodeError as e:
                raise ValueError(f"fault plan (inline JSON) is not valid JSON: {e}") from None
        data = read_config_file(spec, "fault plan")  # (its errors name the file)
        try:
            return cls.from_dict(data)
        except ValueError as e:  # the plan's own errors ("fault 2: ...") name the file too
            raise ValueError(f"fault plan {text!r}: {str(e).removeprefix('fault plan: ')}") from None

    @classmethod
    def from_flags(cls, flags: list[str], seed: int = 0) -> FaultPlan:
        """``--fault kind=kill,target=worker:1,at_step=60`` (values parsed as JSON where they can be)."""
        faults = []
        for text in flags:
            entry = {}
            for part in text.split(","):
                if "=" not in part:
                    raise ValueError(f"--fault {text!r}: write key=value pairs separated by commas")
                k, v = part.split("=", 1)
                try:
                    entry[k.strip()] = json.loads(v)
                except json.JSONDecodeError:
                    entry[k.strip()] = v.strip()
            faults.append(entry)
        return cls.from_dict({"seed": seed, "faults": faults})

    def to_dict(self) -> dict:
        return {"seed": self.seed, "faults": [f.to_dict() for f in self.faults]}

    def check_static(self, world: int, procs_per_replica: int, steps: int) -> FaultPlan:
        """:meth:`check` for a static job of ``world`` processes, whose workers are its ranks
        ("0", "1", ...): "rank:N" and "worker:N" name rank N, "replica:N" the first process of
        replica N. Kinds, hook points and triggers a static job cannot serve (rounds, the
        coordinator, partitions, slow links, transfers) are refused, naming the fault.
        """
        out = []
        for f in self.faults:
            where = f"fault {f.id} ({f.kind})"
            if f.kind not in STATIC_KINDS:
                raise ValueError(
                    f"{where}: kind={f.kind!r} needs an elastic job (--coordinator); a static job "
                    f"(launch/torchrun) injects {list(STATIC_KINDS)}"
                )
            if f.at_round is not None:
                raise ValueError(f"{where}: at_round needs an elastic job's numbered rounds; use at_step")
            if not f.restart:
                raise ValueError(
                    f"{where}: restart=false is the chaos runner's; a static job is restarted, all of "
                    "it, by its launcher (lowcomm launch --max-restarts / torchrun --max-restarts)"
                )
            if f.hook not in STATIC_HOOKS:
                raise ValueError(
                    f"{where}: where={f.hook!r} needs an elastic job; a static job's hook points are "
                    f"{list(STATIC_HOOKS)}"
                )
            kind, _, n = f.target.partition(":")
            if kind == "replica" and n.isdigit():
                if int(n) >= world // procs_per_replica:
                    raise ValueError(
                        f"{where}: target {f.target!r} out of range: replica in [0, "
                        f"{world // procs_per_replica - 1}]"
                    )
                f = Fault(**{**asdict(f), "target": f"rank:{int(n) * procs_per_replica}"})
            out.append(f)
        return FaultPlan(self.seed, out).check([str(r) for r in range(world)], steps=steps)

    def check(self, workers: list[str], steps: int | None = None, rounds: int | None = None) -> FaultPlan:
        """Resolve targets against the job's workers and check triggers against its length.

        Returns a plan whose targets are all "worker:ID" or "coordinator" (``random`` drawn from
        the seed). Raises ValueError naming the fault, the value and what is allowed.
        """
        rng = random.Random(self.seed)
        out = []
        for f in self.faults:
            where = f"fault {f.id} ({f.kind})"
            target = f.target
            if target == "random":
                target = f"worker:{rng.choice(workers)}"
            elif target != "coordinator":
                kind, _, name = target.partition(":")
                if kind == "worker":
                    if name in workers:
                        pass
                    elif f"w{name}" in workers:
                        name = f"w{name}"
                    else:
                        raise ValueError(f"{where}: target {f.target!r} names no worker; workers: {workers}")
                elif kind in ("replica", "rank"):
                    if not (name.isdigit() and int(name) < len(workers)):
                        raise ValueError(
                            f"{where}: target {f.target!r} out of range: {kind} in [0, {len(workers) - 1}]"
                        )
                    name = workers[int(name)]
                else:
                    raise ValueError(
                        f"{where}: target {f.target!r}; allowed: 'worker:ID', 'replica:N', 'rank:N', "
                        "'random', 'coordinator'"
                    )
                target = f"worker:{name}"
            if steps is not None and f.at_step is not None and f.at_step > steps:
                raise ValueError(f"{where}: at_step={f.at_step} is past the job's last step {steps}")
            if rounds is not None and f.at_round is not None and f.at_round >= rounds:
                raise ValueError(f"{where}: at_round={f.at_round} is past the job's last round {rounds - 1}")
            out.append(Fault(**{**asdict(f), "target": target}))
        return FaultPlan(self.seed, out)
