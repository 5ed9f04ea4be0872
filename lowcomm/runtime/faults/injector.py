"""FaultInjector: a worker's faults from a plan, fired at the runtime's hook points.

The injector implements :class:`lowcomm.runtime.hooks.FaultHooks`; the runtime receives it in its
constructors (the trainer from ``$LOWCOMM_FAULTS``, a user's own elastic loop as below) and calls
it at named points. It never changes another object: a slow link is the link it returns to the
group for a round, a partition is what it answers when asked whether a peer can be reached::

    hooks = FaultInjector.from_env(worker_id, record=log_event) or NO_FAULTS
    agent = WorkerAgent(endpoint, key, worker_id, hooks=hooks)   # partitions, transfers
    group = ElasticGroup(agent, hooks=hooks)                      # rounds: nan, drop, corrupt, kill
    ...
        hooks.before_step(step)          # kill, preempt, hang, delay, partition, slow-link start here
        ...train one step...
        hooks.after_step(step)

Every injection is recorded as a ``fault`` event before it acts (lasting ones with ``ends_at``,
wall clock), and the end of a delay, slow link or partition as a ``fault_ended`` event.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from ...comm.distributed import LinkEmulator
from ..files import private_open
from ..hooks import Opener
from .plan import LASTING_KINDS, ROUND_KINDS, Fault, FaultPlan, InjectedFault

__all__ = ["FaultInjector", "failing_opener"]

log = logging.getLogger(__name__)

#: bytes a checkpoint-fail fault lets through before the write fails
CHECKPOINT_FAIL_AFTER = 100


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
        self._delay = 0.0  # seconds per step of the active delay fault
        self._nbytes = 16  # bytes the pending corrupt fault flips
        self._slow: LinkEmulator | None = None  # the link of the active slow-link fault

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

    def link(self, default: Any) -> Any:
        """The slow link while a slow-link fault lasts, else ``default``."""
        self._expire()
        return self._slow if self.active("slow-link") else default

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
        """End the lasting faults whose time is up."""
        now = time.monotonic()
        for key, (end, f) in list(self.until.items()):
            if now < end:
                continue
            del self.until[key]
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
            elif f.kind == "preempt":  # (lowcomm train ends the step and leaves: ``train(stop=)``)
                os.kill(os.getpid(), signal.SIGTERM)
            elif f.kind == "hang":
                _hang_self(f.duration)
            elif f.kind == "delay":
                self._delay = f.delay
                self._last("delay", f)
            elif f.kind == "partition":
                self._last(f"partition:{f.direction}", f)
            elif f.kind == "slow-link":
                self._slow = LinkEmulator.parse(f.bandwidth, f.latency)
                self._last("slow-link", f)

    def before_collective(self, rnd: int, buffer: torch.Tensor) -> None:
        self._lasting("before_collective", rnd=rnd)
        for f in self.faults:
            if f.kind == "nan" and self._due(f, "before_collective", rnd=rnd):
                self._fire(f, "before_collective", round=rnd)
                buffer[: max(1, buffer.numel() // 100)] = float("nan")

    def collective_action(self, rnd: int) -> str | None:
        """As round ``rnd``'s reduce starts: "drop" when this worker's contribution must never
        arrive (a drop-round fault, or a partition from the peers), "corrupt" when the payload it
        sends must be damaged, else None."""
        action = None
        for f in self.faults:
            if f.kind in ("drop-round", "corrupt") and self._due(f, "during_collective", rnd=rnd):
                self._fire(f, "during_collective", round=rnd)
                action = "drop" if f.kind == "drop-round" else "corrupt"
                self._nbytes = f.nbytes
        if self.partitioned_from("peers"):
            action = "drop"
        return action

    def between_phases(self, rnd: int) -> None:
        """Between a round's two exchanges: a kill or hang here is a death mid-round."""
        for f in self.faults:
            if f.kind in ("kill", "hang") and self._due(f, "during_collective", rnd=rnd):
                self._fire(f, "during_collective", round=rnd)
                _kill_self() if f.kind == "kill" else _hang_self(f.duration)

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

    def checkpoint_opener(self, step: int) -> Opener | None:
        """An opener whose file fails after a few bytes, when a checkpoint-fail fault is due."""
        for f in self.faults:
            if f.kind == "checkpoint-fail" and self._due(f, "checkpoint_write", step=step):
                self._fire(f, "checkpoint_write", step=step)
                return failing_opener(CHECKPOINT_FAIL_AFTER)
        return None


class _FailingFile:
    """A binary file that raises InjectedFault once more than ``limit`` bytes were written."""

    def __init__(self, f, limit: int) -> None:
        self._f, self._left, self._limit = f, limit, limit

    def write(self, data: bytes) -> int:
        if len(data) > self._left:
            self._f.write(data[: self._left])
            self._left = 0
            raise InjectedFault(f"injected checkpoint write failure after {self._limit} bytes")
        self._left -= len(data)
        return self._f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _FailingFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()


def failing_opener(limit: int) -> Opener:
    """An ``open`` whose files fail with InjectedFault after ``limit`` bytes (a full disk, say)."""

    def opener(path: str, mode: str):
        return _FailingFile(private_open(path, mode), limit)

    return opener


def _kill_self() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _hang_self(seconds: float) -> None:
    """Stop this whole process (every thread, heartbeats included) for ``seconds``. The process
    that continues it holds none of its output: killed while stopped (its launcher stopping the
    job), it left a traceback (ProcessLookupError) on the job's output, and whoever read that
    output to its end waited for it."""
    wake = (
        f"import os, signal, time\ntime.sleep({float(seconds)})\n"
        f"try:\n    os.kill({os.getpid()}, signal.SIGCONT)\nexcept ProcessLookupError:\n    pass\n"
    )
    quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    subprocess.Popen([sys.executable, "-c", wake], start_new_session=True, **quiet)
    os.kill(os.getpid(), signal.SIGSTOP)
