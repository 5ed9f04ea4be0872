"""Fault plans and their injection at named hook points of the runtime.

A plan is a TOML or JSON file (or repeated ``--fault`` flags)::

    seed = 7
    [[faults]]
    kind = "kill"          # SIGKILL; the chaos runner restarts the worker unless restart = false
    target = "worker:1"
    at_step = 60
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
    restart: kill only: restart the worker afterwards (chaos runner; default true).
    delay: delay only: seconds added to every inner step while it lasts (default 0.5).
    bandwidth / latency: slow-link only, e.g. "10Mbit" and "50ms".
    direction: partition only: "peers" (cannot reach the other workers; the default) or
        "coordinator" (cannot reach the coordinator).
    nbytes: corrupt only: bytes flipped in the payload (default 16).

A plan is checked before the job starts (:meth:`FaultPlan.check`): unknown kinds or keys,
targets that do not exist and triggers out of range are refused with the value and what is
allowed. Everything random (targets "random", probabilities) is drawn from ``seed``, so a plan
replays the same faults.

Hooks: the runtime calls :class:`FaultInjector` at ``before_step``, ``after_step``,
``before_collective``, ``during_collective`` (between the two phases of the reduce),
``during_transfer`` and ``checkpoint_write``. A user's own elastic training loop gets the same
faults (see ``examples/embed_elastic.py``)::

    hooks = FaultInjector.from_env(worker_id, record=log_event)   # $LOWCOMM_FAULTS; None if unset
    if hooks is not None:
        hooks.attach(agent, group)       # collectives, transfers, partitions, slow links
    ...
        hooks.before_step(step)          # kill, hang, delay, partition, slow-link start here
        ...train one step...
        hooks.after_step(step)

Every injection is recorded as a ``fault`` event before it acts (lasting ones with ``ends_at``,
wall clock), and the end of a delay, slow link or partition as a ``fault_ended`` event.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["KINDS", "HOOKS", "Fault", "FaultPlan", "FaultInjector", "InjectedFault"]

log = logging.getLogger(__name__)

KINDS = (
    "kill",
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
    if t == "at_step" and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        raise ValueError(f"{where}: at_step={v!r} must be an int >= 1")
    if t == "at_round" and not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
        raise ValueError(f"{where}: at_round={v!r} must be an int >= 0")
    if t == "at_time" and not (isinstance(v, (int, float)) and v >= 0):
        raise ValueError(f"{where}: at_time={v!r} must be seconds >= 0")
    if t == "probability" and not (isinstance(v, (int, float)) and 0 < v <= 1):
        raise ValueError(f"{where}: probability={v!r} must be in (0, 1]")
    if kind in ROUND_KINDS and t != "at_round":
        raise ValueError(f"{where}: a {kind} fault acts on a round: use at_round")
    if f.where is not None and f.where not in HOOKS:
        raise ValueError(f"{where}: where={f.where!r} is not a hook point; allowed: {list(HOOKS)}")
    if not (isinstance(f.duration, (int, float)) and 0 < f.duration <= 3600):
        raise ValueError(f"{where}: duration={f.duration!r} must be seconds in (0, 3600]")
    if not (isinstance(f.delay, (int, float)) and 0 <= f.delay <= 60):
        raise ValueError(f"{where}: delay={f.delay!r} must be seconds in [0, 60]")
    if f.direction not in ("peers", "coordinator"):
        raise ValueError(f"{where}: direction={f.direction!r}; allowed: 'peers', 'coordinator'")
    if not (isinstance(f.nbytes, int) and f.nbytes >= 1):
        raise ValueError(f"{where}: nbytes={f.nbytes!r} must be an int >= 1")
    if kind == "slow-link":
        from ..comm.distributed import parse_bandwidth, parse_duration

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
            return cls.from_dict(json.loads(text))
        p = Path(spec)
        if not p.exists():
            raise FileNotFoundError(f"fault plan {text!r} does not exist")
        if p.suffix == ".toml":
            import tomllib

            return cls.from_dict(tomllib.loads(p.read_text()))
        if p.suffix == ".json":
            return cls.from_dict(json.loads(p.read_text()))
        raise ValueError(f"fault plan {text!r} must end in .toml or .json")

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


class FaultInjector:
    """The faults of one worker, fired at the runtime's hook points.

    Args:
        plan: a checked plan (targets resolved).
        worker_id: this worker.
        record: ``record(kind, **fields)`` (the run's event log).
        done: ids of faults that already fired in an earlier process of this worker.
    """

    def __init__(
        self,
        plan: FaultPlan,
        worker_id: str,
        record: Callable[..., None] | None = None,
        done: set[int] | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.faults = [
            f for f in plan.faults if f.target == f"worker:{worker_id}" and f.id not in (done or set())
        ]
        self.record = record or (lambda kind, **f: None)
        self.t0 = time.monotonic()
        self._rng = random.Random(f"{plan.seed}/{worker_id}")
        self.fired: set[int] = set()
        # lasting faults in force: "kind" or "partition:direction" -> (monotonic end, the fault)
        self.until: dict[str, tuple[float, Fault]] = {}
        self.agent = None  # set by the runtime: partition and slow-link act on it
        self.group = None
        self._delay = 0.0  # seconds per step of the active delay fault
        self._nbytes = 16  # bytes the pending corrupt fault flips
        self._restore_link = None  # the link emulation a slow-link fault replaced

    def attach(self, agent, group) -> FaultInjector:
        """Wire this injector into an elastic worker: its WorkerAgent (partitions from the
        coordinator, state-transfer hooks) and its ElasticGroup (collective hooks, slow links).
        The step and checkpoint hooks are the training loop's to call. Returns ``self``."""
        self.agent, self.group = agent, group
        agent.hooks = group.hooks = self
        return self

    @classmethod
    def from_env(cls, worker_id: str, record=None, done: set[int] | None = None) -> FaultInjector | None:
        """From $LOWCOMM_FAULTS (a path or inline JSON); None when unset."""
        spec = os.environ.get("LOWCOMM_FAULTS")
        if not spec:
            return None
        if done is None and os.environ.get("LOWCOMM_FAULTS_DONE"):
            done = {int(x) for x in os.environ["LOWCOMM_FAULTS_DONE"].split(",") if x.strip()}
        return cls(FaultPlan.load(spec), worker_id, record, done)

    # ---- state the runtime asks about ------------------------------------------------------------

    def active(self, kind: str, direction: str | None = None) -> bool:
        key = kind if direction is None else f"{kind}:{direction}"
        entry = self.until.get(key)
        return entry is not None and time.monotonic() < entry[0]

    def partitioned_from(self, what: str) -> bool:
        """True while a partition cuts this worker off from ``what`` ("peers" or "coordinator")."""
        return self.active("partition", what)

    # ---- hooks ---------------------------------------------------------------------------------

    def _due(self, f: Fault, hook: str, step: int | None = None, rnd: int | None = None) -> bool:
        if f.id in self.fired or f.hook != hook:
            return False
        t = f.trigger
        if t == "at_step":
            return step is not None and step >= f.at_step
        if t == "at_round":
            return rnd is not None and rnd >= f.at_round
        if t == "at_time":
            return time.monotonic() - self.t0 >= f.at_time
        return step is not None and self._rng.random() < f.probability

    def _fire(self, f: Fault, hook: str, **where: Any) -> None:
        self.fired.add(f.id)
        info = {"id": f.id, "fault": f.kind, "hook": hook, "worker": self.worker_id, **where}
        if f.kind in LASTING_KINDS:
            info["ends_at"] = time.time() + f.duration  # wall clock, like the event's own "wall"
        log.warning("injecting fault %s", info)
        self.record("fault", **info, spec=f.to_dict())

    def _last(self, key: str, f: Fault) -> None:
        self.until[key] = (time.monotonic() + f.duration, f)

    def _expire(self) -> None:
        """End the lasting faults whose time is up (a slow link gets its old emulation back)."""
        now = time.monotonic()
        for key, (end, f) in list(self.until.items()):
            if now < end:
                continue
            del self.until[key]
            if f.kind == "slow-link" and self.group is not None:
                self.group.link = self._restore_link
            self.record("fault_ended", id=f.id, fault=f.kind, worker=self.worker_id)

    def before_step(self, step: int) -> None:
        self._lasting("before_step", step=step)
        if self.active("delay"):
            time.sleep(self._delay)

    def after_step(self, step: int) -> None:
        self._lasting("after_step", step=step)

    def _lasting(self, hook: str, step: int | None = None, rnd: int | None = None) -> None:
        self._expire()
        for f in self.faults:
            if f.kind in ROUND_KINDS or f.kind == "checkpoint-fail" or not self._due(f, hook, step, rnd):
                continue
            self._fire(f, hook, step=step, round=rnd)
            if f.kind == "kill":
                _kill_self()
            elif f.kind == "hang":
                _hang_self(f.duration)
            elif f.kind == "delay":
                self._delay = f.delay
                self._last("delay", f)
            elif f.kind == "partition":
                self._last(f"partition:{f.direction}", f)
            elif f.kind == "slow-link" and self.group is not None:
                from ..comm.distributed import LinkEmulator

                if "slow-link" not in self.until:  # a second slow link replaces the first, not the original
                    self._restore_link = self.group.link
                self.group.link = LinkEmulator.parse(f.bandwidth, f.latency)
                self._last("slow-link", f)

    def before_collective(self, rnd: int, buffer: torch.Tensor) -> None:
        self._lasting("before_collective", rnd=rnd)
        for f in self.faults:
            if f.kind == "nan" and self._due(f, "before_collective", rnd=rnd):
                self._fire(f, "before_collective", round=rnd)
                buffer[: max(1, buffer.numel() // 100)] = float("nan")

    def during_collective(self, rnd: int, phase: str = "start") -> str | None:
        """Called on the communication thread as a round's reduce starts (``phase="start"``) and
        between its two exchanges (``"middle"``: a kill or hang here is a death mid-round).

        Returns "drop" when this worker's contribution must never arrive, "corrupt" when the
        payload it sends next must be damaged.
        """
        action = None
        for f in self.faults:
            mid = f.kind in ("kill", "hang")
            if (phase == "middle") != mid or not self._due(f, "during_collective", rnd=rnd):
                continue
            self._fire(f, "during_collective", round=rnd)
            if f.kind == "kill":
                _kill_self()
            elif f.kind == "hang":
                _hang_self(f.duration)
            elif f.kind in ("drop-round", "corrupt"):
                action = "drop" if f.kind == "drop-round" else "corrupt"
                self._nbytes = f.nbytes
        if phase == "start" and self.partitioned_from("peers"):
            action = "drop"
        return action

    def corrupt(self, payload: torch.Tensor) -> None:
        """Flip bytes of a uint8 payload in place (positions drawn from the plan's seed)."""
        n = min(self._nbytes, payload.numel())
        for i in self._rng.sample(range(payload.numel()), n):
            payload[i] ^= 0xFF

    def during_transfer(self, role: str) -> None:
        for f in self.faults:
            if self._due(f, "during_transfer"):
                self._fire(f, "during_transfer", role=role)
                if f.kind == "kill":
                    _kill_self()
                elif f.kind == "hang":
                    _hang_self(f.duration)
        if self.partitioned_from("peers"):
            raise InjectedFault("partitioned from the other workers: the state transfer cannot connect")

    def checkpoint_write(self, step: int) -> int | None:
        """Bytes after which the checkpoint write at ``step`` must fail, or None."""
        for f in self.faults:
            if f.kind == "checkpoint-fail" and self._due(f, "checkpoint_write", step=step):
                self._fire(f, "checkpoint_write", step=step)
                return 100
        return None


def _kill_self() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _hang_self(seconds: float) -> None:
    """Stop this whole process (every thread, heartbeats included) for ``seconds``."""
    subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import os,time,signal; time.sleep({float(seconds)}); os.kill({os.getpid()}, signal.SIGCONT)",
        ],
        start_new_session=True,
    )
    os.kill(os.getpid(), signal.SIGSTOP)
