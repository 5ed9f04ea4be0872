"""``lowcomm launch``: a static multi-process job on this machine, like ``torchrun --standalone``.

``lowcomm launch --replicas M --procs-per-replica k -- CMD ...`` starts ``M·k`` processes of
``CMD`` with torchrun's variables set (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR=127.0.0.1, MASTER_PORT) plus LOWCOMM_PROCS_PER_REPLICA, and OMP_NUM_THREADS (the
machine's cores divided among the processes) unless it is set; when one fails the others
are stopped and its exit code is returned. With ``--max-restarts N`` a failed job is started
again, all of it, up to N times, as torchrun does (TORCHELASTIC_RESTART_COUNT counts the
restarts): ``lowcomm train --checkpoint-every K --resume auto`` then continues from its
checkpoints. A refusal of the input (exit code 2) and an interrupt are not restarted: a restart
would meet them again; a process terminated alone (exit code 143: its node preempted) is. SIGTERM
to the launcher (a scheduler stopping the job) goes on to its processes, which end their step and
write their checkpoint (``lowcomm train``); those still running ``TERM_GRACE_S`` later are killed,
so none outlives it, and the job is not restarted (exit code 143).

``--start forkserver`` forks each process of a Python command (``python SCRIPT``, ``python -m
MODULE``, ``lowcomm train``) from a server that imported torch once, and the modules of
``--preload``: a process (and a restarted job) is training in a fraction of a second instead of
after seconds of imports (``lowcomm.runtime.forkserver`` says what such a process does not share
with a started one). The launcher itself imports no torch either way.

Each process writes to the launcher's terminal, as under torchrun, or with ``--log-dir DIR`` to
``DIR/attempt<N>/rank<R>.log`` (its stdout and stderr, written through): a failed rank's last
lines are then shown by the launcher, and ``--tee`` copies every line to the launcher's stdout
too, behind its rank (``[rank 1]: ...``). A folder that holds an earlier job's logs is refused.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..._checks import is_int, refuse, threads_env
from ...comm.net import check_free_port, free_port
from ...comm.slurm import srun_env
from .. import forkserver
from ..errors import ExitCode
from ..files import check_folder, private_open

__all__ = ["launch"]

log = logging.getLogger(__name__)

#: how long the job's processes have after a SIGTERM to the launcher before they are killed (a
#: ``lowcomm train`` process ends its step and writes its checkpoint; schedulers commonly give
#: 30 s between their SIGTERM and SIGKILL)
TERM_GRACE_S = 30.0


def launch(
    command: list[str],
    replicas: int,
    procs_per_replica: int = 1,
    *,
    port: int | None = None,
    grace_s: float = 5.0,
    max_restarts: int = 0,
    start: str = "exec",
    preload=(),
    log_dir: str | os.PathLike | None = None,
    tee: bool = False,
) -> int:
    """Run ``replicas · procs_per_replica`` copies of ``command`` on this machine, again after a
    failure up to ``max_restarts`` times; returns an exit code (the last attempt's). ``start``:
    "exec" (each process a new one) or "forkserver" (forked from a server that imported torch and
    the modules ``preload``: see the module's docstring). ``log_dir``: each process's output goes
    to ``log_dir/attempt<N>/rank<R>.log`` instead of this process's terminal; ``tee``: each line
    of them to this process's stdout too, behind its rank.

    Raises:
        ValueError: counts below 1 or more than ``forkserver.MAX_PROCS`` processes, a port outside
            0-65535, a negative ``max_restarts``, an empty command or one that is not found; with
            forkserver a command that is not this interpreter's Python, a ``preload`` module that
            is not installed; one task of an ``srun`` step of several (each would start a job); a
            ``log_dir`` that cannot be written or holds an earlier job's logs; ``tee`` without one.
    """
    if not command:
        raise ValueError("launch needs a command after '--'")
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS")
    if srun_env(os.environ) is not None:  # each task would start a job of its own, alone
        raise ValueError(
            f"lowcomm launch runs a job on one machine, and this is one of {tasks} tasks of an srun "
            "step: each would start a job of its own; run the command itself under srun (srun "
            "lowcomm train ..., one task a process), or launch from a step of one task (srun -n 1)"
        )
    forkserver.check_start(start)
    if preload and start != "forkserver":
        raise ValueError(
            f"preload {list(preload)} needs start forkserver (--start forkserver): exec starts every "
            "process anew"
        )
    if start == "forkserver":
        forkserver.check_preload(preload)
        command = forkserver.python_command(command)
    elif shutil.which(command[0]) is None:  # before any process starts (each would fail alike)
        raise ValueError(
            f"command {command[0]!r} was not found: give a program on PATH or its path after '--', "
            "e.g. lowcomm launch --replicas 2 -- lowcomm train ..."
        )
    forkserver.check_procs(replicas, procs_per_replica)  # --replicas 1e20 started processes until killed
    if port is not None and not (is_int(port, 0) and port <= 65535):
        raise refuse("port", port, "a TCP port, 1-65535, or 0 for a free one (the default)")
    if port:  # taken: rank 0's store failed in a traceback (EADDRINUSE) and the job with it
        check_free_port("port", port)
    if not is_int(max_restarts, 0):
        raise refuse("max_restarts", max_restarts, "an int >= 0 (times a failed job is started again)")
    if log_dir is not None:
        _check_log_dir(log_dir)
    elif tee:
        raise refuse("tee", tee, "it copies the logs of a log_dir (--log-dir DIR), and none was given")
    signals = _Signals()
    previous = {}
    if threading.current_thread() is threading.main_thread():  # (signal handlers live there only)
        previous = {sig: signal.signal(sig, signals.note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        starter = _starter(command, [*forkserver.DEFAULT_PRELOAD, *preload])
        world = replicas * procs_per_replica
        return _attempts(
            starter, world, procs_per_replica, port, grace_s, max_restarts, signals, log_dir, tee
        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Signals:
    """Ctrl-C and SIGTERM as counts that the launcher's loops read between their steps. A handler
    that raised (KeyboardInterrupt) could land inside subprocess's own bookkeeping: in ``poll()``
    between taking a process's waitpid lock and the ``try`` that gives it back, after which every
    ``wait()`` on that process blocks for good (CPython's subprocess): the launcher hung after a
    Ctrl-C instead of stopping its ranks (once in CI, under load)."""

    def __init__(self) -> None:
        self.interrupts = 0
        self.terminated = False

    def note(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
        else:
            self.terminated = True

    @property
    def stopping(self) -> bool:
        return bool(self.interrupts) or self.terminated


def _check_log_dir(log_dir) -> None:
    """Refuse a log folder that cannot be written, or that holds an earlier job's logs (a new
    job's would be appended to them)."""
    if not str(log_dir).strip():  # ("" is the working folder)
        raise refuse("log_dir", str(log_dir), "a folder's path")
    check_folder("log_dir", log_dir)
    folder = Path(log_dir)
    earlier = (
        sorted(p.name for p in folder.glob("attempt*") if p.name[7:].isdigit()) if folder.is_dir() else []
    )
    if earlier:
        raise refuse(
            "log_dir", str(log_dir), f"it holds an earlier job's logs ({earlier[0]}/): choose another"
        )


def _starter(command, preload):
    """How a process of the job starts, given its environment and the file its output goes to
    (None: this process's terminal): a new process of the command, or a fork of the server
    (``command`` a ``forkserver.PythonCommand``)."""
    if isinstance(command, forkserver.PythonCommand):
        return lambda env, log: forkserver.start(command, env, log_path=log, preload=preload)

    def start(env, log):
        if log is None:
            return subprocess.Popen(command, env=env)
        with private_open(log, "ab") as f:  # (written through by a Python process, as a fork's)
            env = {**env, "PYTHONUNBUFFERED": env.get("PYTHONUNBUFFERED") or "1"}
            return subprocess.Popen(command, env=env, stdout=f, stderr=subprocess.STDOUT)

    return start


class _Tee(threading.Thread):
    """Copies the lines the processes write to their logs (``folder/rank<R>.log``) to this
    process's stdout as they come, each behind its rank; whole lines only, until :meth:`close`
    (which copies what is left, a last line without its newline too). A carriage return ends a
    line too (a progress bar's redraw: each shows as a line of its own); blank lines are left
    out."""

    def __init__(self, folder: Path, world: int, every_s: float = 0.1) -> None:
        super().__init__(daemon=True, name="lowcomm-launch-tee")
        self.folder, self.world, self.every_s = folder, world, every_s
        self.files: dict[int, Any] = {}
        self.partial = [b""] * world
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every_s):
            self._copy(last=False)

    def close(self) -> None:
        self.done.set()
        self.join()
        self._copy(last=True)
        for f in self.files.values():
            f.close()

    def _copy(self, last: bool) -> None:
        out = []
        for rank in range(self.world):
            f = self.files.get(rank)
            if f is None:
                try:
                    f = self.files[rank] = open(self.folder / f"rank{rank}.log", "rb")
                except FileNotFoundError:  # (not started yet)
                    continue
            *lines, self.partial[rank] = re.split(rb"[\r\n]", self.partial[rank] + f.read())
            if last:
                lines, self.partial[rank] = [*lines, self.partial[rank]], b""
            out += [f"[rank {rank}]: {line.decode(errors='replace')}\n" for line in lines if line.strip()]
        if out:
            sys.stdout.write("".join(out))
            sys.stdout.flush()


def _tail(path: str, lines: int = 20, limit: int = 1 << 16) -> str:
    """The last ``lines`` lines of a process's log (of its last ``limit`` bytes)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
            text = f.read().decode(errors="replace")
    except OSError as e:
        return f"(its log could not be read: {e})"
    return "\n".join(text.splitlines()[-lines:])


#: exit codes after which a job is not started again (as are those of a launcher signalled itself);
#: a process terminated alone (SIGTERM to it: its node preempted) is restarted, and has written its
#: checkpoint at the step it stopped at, as have the others (``lowcomm train``)
_FINAL = (ExitCode.OK, ExitCode.USAGE, ExitCode.INTERRUPTED)


def _attempts(
    starter,
    world: int,
    procs_per_replica: int,
    port,
    grace_s: float,
    max_restarts: int,
    signals: _Signals,
    log_dir=None,
    tee: bool = False,
) -> int:
    attempt = 0
    threads = threads_env(world)  # (the processes share this machine's cores)
    if threads:
        log.info("OMP_NUM_THREADS=%s for each of the %d processes", threads["OMP_NUM_THREADS"], world)
    while True:
        env = {
            "TORCHELASTIC_RESTART_COUNT": str(attempt),
            "TORCHELASTIC_MAX_RESTARTS": str(max_restarts),
            **threads,
        }
        logs = None
        if log_dir is not None:
            logs = Path(log_dir) / f"attempt{attempt}"
            logs.mkdir(parents=True, mode=0o700)
            print(f"lowcomm launch: the processes' output in {logs}/rank<R>.log", file=sys.stderr, flush=True)
        copy = _Tee(logs, world) if tee and logs is not None else None
        if copy is not None:
            copy.start()
        try:
            code = _run_once(
                starter, world, procs_per_replica, port or free_port(), env, grace_s, signals, logs
            )
        finally:
            if copy is not None:
                copy.close()
        if code in _FINAL or signals.stopping or attempt == max_restarts:
            if code == ExitCode.USAGE and attempt < max_restarts:
                log.error("exit code 2 is a refusal of the input: the job is not restarted")
            elif attempt:
                log.warning("the job ended with exit code %d after %d restart(s)", code, attempt)
            if logs is not None:  # (the processes' last words are in their logs, not on this terminal)
                print(f"lowcomm launch: exit code {code}; the processes' output in {logs}", file=sys.stderr)
            return code
        attempt += 1
        log.error(
            "the job failed (exit code %d): restarting it (restart %d of %d)", code, attempt, max_restarts
        )


def _run_once(
    starter,
    world: int,
    procs_per_replica: int,
    port: int,
    extra: dict,
    grace_s: float,
    signals: _Signals,
    logs: Path | None = None,
) -> int:
    """One attempt: start every process, stop the others when one fails; returns the exit code
    (on a signal: INTERRUPTED or TERMINATED, every process stopped). ``logs``: the folder of the
    processes' output (None: this process's terminal)."""
    running: dict[int, subprocess.Popen] = {}
    code = 0
    try:
        _start(starter, world, procs_per_replica, port, extra, running, signals, logs)
    except OSError as e:  # (the system's process or memory limits): the others would wait for it
        log.error(
            "could not start rank %d of %d (%s): stopping the %d started",
            len(running),
            world,
            e,
            len(running),
        )
        _stop(list(running.values()), grace_s, lambda: signals.stopping)
        return ExitCode.FAILED
    while running and not signals.stopping:
        for rank, p in list(running.items()):
            rc = p.poll()
            if rc is None:
                continue
            del running[rank]
            if rc != 0 and code == 0:
                code = rc
                log.error("rank %d exited with code %d; stopping the other ranks", rank, rc)
                if logs is not None:
                    path = str(logs / f"rank{rank}.log")
                    log.error("the last lines of %s:\n%s", path, _tail(path))
                _stop(list(running.values()), grace_s, lambda: signals.stopping)
        time.sleep(0.05)
    procs = list(running.values())
    if signals.interrupts:
        log.error("interrupted: stopping every rank")

        # a terminal's Ctrl-C reached the ranks too: they end themselves (and say where their
        # records are); the ones that do not, are stopped; a second Ctrl-C stops them at once
        def hurry() -> bool:
            return signals.interrupts > 1

        _settle(procs, min(grace_s, 2.0), hurry)
        _stop(procs, grace_s, hurry)
        return ExitCode.INTERRUPTED
    if signals.terminated:
        log.error("terminated (SIGTERM): stopping every rank")
        _stop(procs, max(grace_s, TERM_GRACE_S), lambda: signals.interrupts > 0)
        return ExitCode.TERMINATED
    return code


def _start(
    starter,
    world: int,
    procs_per_replica: int,
    port: int,
    extra: dict,
    running: dict,
    signals: _Signals,
    logs: Path | None = None,
) -> None:
    """Start the job's processes into ``running`` (rank -> process), each as soon as it exists;
    no more once a signal came; each one's output to ``logs/rank<R>.log`` (None: the terminal)."""
    for rank in range(world):
        if signals.stopping:
            return
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
        running[rank] = starter(env, None if logs is None else str(logs / f"rank{rank}.log"))


def _settle(procs: list[subprocess.Popen], timeout_s: float, hurry=lambda: False) -> None:
    """Wait up to ``timeout_s`` for ``procs`` to exit by themselves (no longer once ``hurry()``)."""
    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline and not hurry():
        time.sleep(0.05)


def _stop(procs: list[subprocess.Popen], grace_s: float, hurry=lambda: False) -> None:
    """SIGTERM to the processes still running; those still running ``grace_s`` later (or once
    ``hurry()``) are killed. Every one is reaped."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    _settle(procs, grace_s, hurry)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
