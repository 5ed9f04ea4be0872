"""``lowcomm launch``: a static multi-process job on this machine, like ``torchrun --standalone``.

``lowcomm launch --replicas M --procs-per-replica k -- CMD ...`` starts ``M·k`` processes of
``CMD`` with torchrun's variables set (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR=127.0.0.1, MASTER_PORT) plus LOWCOMM_PROCS_PER_REPLICA; when one fails the others
are stopped and its exit code is returned. With ``--max-restarts N`` a failed job is started
again, all of it, up to N times, as torchrun does (TORCHELASTIC_RESTART_COUNT counts the
restarts): ``lowcomm train --checkpoint-every K --resume auto`` then continues from its
checkpoints. A refusal of the input (exit code 2) and an interrupt are not restarted: a restart
would meet them again. SIGTERM to the launcher (a scheduler stopping the job) stops its processes
as Ctrl-C does, so none outlives it (exit code 143).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time

from ..._checks import refuse
from ...comm.net import free_port
from ..errors import ExitCode

__all__ = ["launch"]

log = logging.getLogger(__name__)


def launch(
    command: list[str],
    replicas: int,
    procs_per_replica: int = 1,
    *,
    port: int | None = None,
    grace_s: float = 5.0,
    max_restarts: int = 0,
) -> int:
    """Run ``replicas · procs_per_replica`` copies of ``command`` on this machine, again after a
    failure up to ``max_restarts`` times; returns an exit code (the last attempt's).

    Raises:
        ValueError: counts below 1, a port outside 0-65535, a negative ``max_restarts`` or an
            empty command.
    """
    if not command:
        raise ValueError("launch needs a command after '--'")
    if replicas < 1 or procs_per_replica < 1:
        raise ValueError(f"replicas={replicas} and procs_per_replica={procs_per_replica} must be >= 1")
    if port is not None and not 0 <= port <= 65535:
        raise refuse("port", port, "a TCP port, 1-65535, or 0 for a free one (the default)")
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise refuse("max_restarts", max_restarts, "an int >= 0 (times a failed job is started again)")
    previous = None
    if threading.current_thread() is threading.main_thread():  # (signal handlers live there only)
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _attempts(
            command, replicas * procs_per_replica, procs_per_replica, port, grace_s, max_restarts
        )
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Terminated(BaseException):
    """SIGTERM reached the launcher (raised in its main thread by :func:`_terminate`)."""


def _terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # (a second one must not cut the ranks' stop short)
    raise _Terminated()


_FINAL = (ExitCode.OK, ExitCode.USAGE, ExitCode.INTERRUPTED, ExitCode.TERMINATED)


def _attempts(command, world: int, procs_per_replica: int, port, grace_s: float, max_restarts: int) -> int:
    attempt = 0
    while True:
        env = {"TORCHELASTIC_RESTART_COUNT": str(attempt), "TORCHELASTIC_MAX_RESTARTS": str(max_restarts)}
        code = _run_once(command, world, procs_per_replica, port or free_port(), env, grace_s)
        if code in _FINAL or attempt == max_restarts:
            if code == ExitCode.USAGE and attempt < max_restarts:
                log.error("exit code 2 is a refusal of the input: the job is not restarted")
            elif attempt:
                log.warning("the job ended with exit code %d after %d restart(s)", code, attempt)
            return code
        attempt += 1
        log.error(
            "the job failed (exit code %d): restarting it (restart %d of %d)", code, attempt, max_restarts
        )


def _run_once(
    command: list[str], world: int, procs_per_replica: int, port: int, extra: dict, grace_s: float
) -> int:
    """One attempt: start every process, stop the others when one fails; returns the exit code."""
    running: dict[int, subprocess.Popen] = {}
    code = 0
    try:
        _start(command, world, procs_per_replica, port, extra, running)
        while running:
            for rank, p in list(running.items()):
                rc = p.poll()
                if rc is None:
                    continue
                del running[rank]
                if rc != 0 and code == 0:
                    code = rc
                    log.error("rank %d exited with code %d; stopping the other ranks", rank, rc)
                    _stop(list(running.values()), grace_s)
            time.sleep(0.05)
    except KeyboardInterrupt:
        log.error("interrupted: stopping every rank")
        try:
            # a terminal's Ctrl-C reached the ranks too: they end themselves (and say where their
            # records are); the ones that do not, are stopped
            _settle(list(running.values()), min(grace_s, 2.0))
            _stop(list(running.values()), grace_s)
        except KeyboardInterrupt:  # a second Ctrl-C: at once
            for p in running.values():
                if p.poll() is None:
                    p.kill()
        return ExitCode.INTERRUPTED
    except _Terminated:
        log.error("terminated (SIGTERM): stopping every rank")
        _stop(list(running.values()), grace_s)
        return ExitCode.TERMINATED
    return code


def _start(
    command: list[str], world: int, procs_per_replica: int, port: int, extra: dict, running: dict
) -> None:
    """Start the job's processes into ``running`` (rank -> process), each as soon as it exists."""
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "LOWCOMM_PROCS_PER_REPLICA": str(procs_per_replica),
            **extra,
        }
        running[rank] = subprocess.Popen(command, env=env)


def _settle(procs: list[subprocess.Popen], timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for ``procs`` to exit by themselves."""
    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.time(), 0.01))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
