"""Python processes forked from a server that imported torch once (``multiprocessing``'s
forkserver): ``LocalJob(..., start="forkserver")`` and ``lowcomm launch --start forkserver``.

A new interpreter that trains spends about 4 s of CPU before its first step importing torch and
Dynamo (an optimizer's first use imports it); Lightning's import is 8 s more. A job restarted after
a fault, or a test that starts dozens of processes, spends most of its CPU there. Forked from a
server that made those imports once, a process is training in a fraction of a second.

Each is still a process of its own: its own sockets and descriptors, killed by a signal and ended
with an exit code (``-N`` for signal N) as a started interpreter is, its ``atexit`` handlers run.
It runs the command as the interpreter would: ``python SCRIPT ARGS`` as ``__main__`` with the
script's folder first on ``sys.path``, ``python -m MODULE ARGS`` with the working folder first,
a console script (``lowcomm``, whose ``#!`` line names this interpreter) as its script. What it
does not get from a start of its own: whatever the interpreter and the server's imports read from
the environment when they started (``PYTHON*`` variables) is the starting process's (torch's thread
count is set from its own ``OMP_NUM_THREADS``), its standard input is empty (``/dev/null``), and an uncaught
exception's traceback is headed by the process's name. The server imports with
``PYTORCH_NVML_BASED_CUDA_CHECK=1`` so that nothing it imports initializes CUDA (a forked process
could not use it then); this path has run on CPU only. A module the server could not import is
named by each process it forks, which runs nothing and exits with code 2.

A script that starts such processes guards its main (``if __name__ == "__main__":``), as
``multiprocessing`` asks of any script whose processes it starts this way.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import shutil
import signal
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from typing import Any

from .._checks import is_int, refuse

__all__ = [
    "START_METHODS",
    "DEFAULT_PRELOAD",
    "PythonCommand",
    "Forked",
    "MAX_PROCS",
    "check_procs",
    "check_start",
    "python_command",
    "start",
]

log = logging.getLogger(__name__)

START_METHODS = ("exec", "forkserver")


def check_start(start: Any) -> None:
    """ValueError naming ``start`` unless it is one of :data:`START_METHODS`."""
    if start not in START_METHODS:
        raise refuse("start", start, f"one of {list(START_METHODS)}")


#: the most processes one job starts on one machine (``lowcomm launch``, ``lowcomm chaos``): eight
#: GPUs a node, or CPU ranks; a job on more machines starts one launch a node
MAX_PROCS = 1024


def check_procs(replicas: Any, procs_per_replica: Any = 1) -> None:
    """ValueError naming the count unless each is an int >= 1 and together they make at most
    :data:`MAX_PROCS` processes (``--replicas 1e20`` started processes, or built a list of names,
    until it was killed)."""
    for name, v in (("replicas", replicas), ("procs_per_replica", procs_per_replica)):
        if not is_int(v, 1):
            raise refuse(name, v, "an int >= 1")
    if replicas * procs_per_replica > MAX_PROCS:
        k = procs_per_replica
        at_most = f"at most {MAX_PROCS // k}" + (
            f" with procs_per_replica={k} ({MAX_PROCS} processes on one machine)"
            if k > 1
            else " processes on one machine"
        )
        raise refuse("replicas", replicas, f"{at_most}; a job on several machines starts one launch a node")


#: what the server imports first for the processes it forks (``lowcomm train``'s heavy imports)
DEFAULT_PRELOAD = ("torch", "torch._dynamo", "lowcomm.runtime.cli", "lowcomm.runtime.trainer.loop")

_HOW = (
    "--start forkserver runs this interpreter's Python: PYTHON [-u] SCRIPT ARGS, PYTHON [-u] -m MODULE "
    f"ARGS (PYTHON being {sys.executable}) or a console script whose #! line names it; "
    "--start exec runs any command"
)


#: the modules the server imports, named to it through its environment (it imports this module:
#: a failed import is told by the processes it forks, not by a server that dies at its start)
_PRELOAD_ENV = "LOWCOMM_FORKSERVER_PRELOAD"


def _import_preload(names: str | None) -> dict[str, str]:
    """Import each of the comma-separated ``names``; returns the failures (name -> error)."""
    failed = {}
    for name in (names or "").split(","):
        if name:
            try:
                importlib.import_module(name)
            except BaseException as e:  # (a module may raise anything at its import, SystemExit too)
                failed[name] = f"{type(e).__name__}: {e}"
    return failed


def _server_preload_from_env() -> str | None:
    """The modules to import when this process is a fork server started by ``_server`` (its
    environment names its starter's pid, its parent, and it runs ``python -c``): None in any other
    process, a stray value in a user's environment included."""
    value = os.environ.pop(_PRELOAD_ENV, None)
    starter, _, names = (value or "").partition(":")
    if value is None or sys.argv != ["-c"] or starter != str(os.getppid()):
        return None
    return names


def _leave_now() -> None:
    """The server's end, once its starter has gone: it has nothing to finish, and an interpreter's
    teardown with torch loaded takes a second, which a caller reading the starter's output (the
    server holds its stdout and stderr) would wait too."""
    os._exit(0)


def die_with_parent() -> None:
    """In a child (Linux): SIGKILL it when the process that started it dies, so a runner or test
    that is itself killed leaves no process of its behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG


@dataclass(frozen=True)
class PythonCommand:
    """A command this interpreter runs: ``kind`` "path" (a script) or "module" (``-m``)."""

    kind: str
    target: str
    args: tuple[str, ...]
    unbuffered: bool = False

    @property
    def argv(self) -> list[str]:
        return [self.target, *self.args]


def _this_interpreter(program: str) -> bool:
    """Whether ``program`` (a path or a name on PATH) is this interpreter: the same file, in the
    same folder (a virtual environment's python links to its base's, but is not it)."""
    found = shutil.which(program)
    if found is None:
        return False
    here, there = os.path.abspath(sys.executable), os.path.abspath(found)
    same_folder = os.path.dirname(here) == os.path.dirname(there)
    return same_folder and os.path.realpath(here) == os.path.realpath(there)


def _shebang(path: str) -> list[str] | None:
    """The ``#!`` line of a text file, split (None for anything else)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0].decode("utf-8", "replace").split()
    if line[:1] == ["/usr/bin/env"]:
        line = line[1:]
    return line or None


def python_command(command: list[str]) -> PythonCommand:
    """``command`` as a command of this interpreter (see the module's docstring).

    Raises:
        ValueError: an empty command, another program or interpreter, or a Python option other
            than ``-u`` and ``-m``, named, with the forms allowed.
    """
    if not command:
        raise ValueError("launch needs a command after '--'")
    head, rest = command[0], list(command[1:])
    if not _this_interpreter(head):
        path = shutil.which(head)
        line = _shebang(path) if path else None
        if line is None or len(line) != 1 or not _this_interpreter(line[0]):
            raise ValueError(f"command {head!r} is not this interpreter's Python: {_HOW}")
        return PythonCommand("path", path, tuple(rest))
    unbuffered = False
    while rest[:1] == ["-u"]:
        unbuffered, rest = True, rest[1:]
    if rest[:1] == ["-m"]:
        if len(rest) < 2:
            raise ValueError(f"'-m' needs a module name: {_HOW}")
        return PythonCommand("module", rest[1], tuple(rest[2:]), unbuffered)
    if not rest:
        raise ValueError(f"python needs a script or '-m MODULE': {_HOW}")
    if rest[0].startswith("-"):
        raise ValueError(f"python option {rest[0]!r} is not supported by --start forkserver: {_HOW}")
    if not os.path.exists(rest[0]):  # (a file, or as python runs them, a folder or zip with __main__.py)
        raise ValueError(f"script {rest[0]!r} was not found (from {os.getcwd()})")
    return PythonCommand("path", rest[0], tuple(rest[1:]), unbuffered)


def check_preload(modules) -> None:
    """Each name a module that can be imported (its top-level package found, nothing imported).

    Raises:
        ValueError: a name that is not a module name, or whose package is not installed.
    """
    for name in modules:
        if not isinstance(name, str) or not all(p.isidentifier() for p in name.split(".")):
            raise ValueError(f"preload module {name!r} is not a module name (such as lightning.pytorch)")
        if importlib.util.find_spec(name.split(".")[0]) is None:
            raise ValueError(f"preload module {name!r} is not installed in {sys.executable}")


def _body(cmd: PythonCommand, env: dict[str, str], cwd: str, log_path: str | None) -> None:
    """A forked process: its environment, folder and output, then the command as the interpreter
    runs it; its atexit handlers run at its end (an exit or an exception)."""
    atexit.unregister(_leave_now)  # (the server's, inherited: this process ends as a command does)
    die_with_parent()
    if _PRELOAD_FAILED:  # the command would meet the same error, or run without what it asked for
        name, error = next(iter(_PRELOAD_FAILED.items()))
        sys.stderr.write(
            f"lowcomm: error: preload module {name!r} failed to import in the fork server ({error}); "
            f"{cmd.target} was not run\n"
        )
        sys.exit(2)
    multiprocessing.current_process().daemon = False  # (its own children are allowed: a DataLoader's)
    os.environ.clear()
    os.environ.update(env)
    threads = env.get("OMP_NUM_THREADS", "")
    torch = sys.modules.get("torch")
    if torch is not None and threads.isdigit() and int(threads) > 0:  # (it read the server's)
        torch.set_num_threads(int(threads))
    os.chdir(cwd)
    if log_path is not None:  # its output to a log of its own, written through
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    if log_path is not None or cmd.unbuffered or env.get("PYTHONUNBUFFERED"):
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=True, write_through=True)
    try:
        if cmd.kind == "module":
            sys.path[0] = cwd  # as python -m puts it
            sys.argv = [cmd.target, *cmd.args]
            runpy.run_module(cmd.target, run_name="__main__", alter_sys=True)
        else:
            if os.path.isfile(cmd.target) and not zipfile.is_zipfile(cmd.target):
                sys.path[0] = os.path.dirname(os.path.abspath(cmd.target))  # as python SCRIPT puts it
            else:  # a folder or zip: run_path puts it first, as python does
                del sys.path[0]
            sys.argv = [cmd.target, *cmd.args]
            runpy.run_path(cmd.target, run_name="__main__")
    finally:
        atexit._run_exitfuncs()  # (multiprocessing ends its processes by os._exit)


class Forked:
    """A forked process, with the ``subprocess.Popen`` calls that its users make (``poll``,
    ``wait``, ``kill``, ``terminate``, ``send_signal``, ``pid``, ``returncode``: ``-N`` for signal N)."""

    def __init__(self, process: Any, args: list[str]) -> None:
        self._p, self.args, self.pid = process, args, process.pid

    @property
    def returncode(self) -> int | None:
        return self._p.exitcode

    def poll(self) -> int | None:
        return self._p.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._p.join(timeout)
        if self._p.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._p.exitcode

    def send_signal(self, sig: int) -> None:
        if self._p.exitcode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # (ended since)
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


_server_preload: list[str] | None = None  # what this process's server imported


def _server(preload) -> Any:
    """This process's fork server, started at its first process with ``preload`` imported (a
    process has one server: the first start's modules are the ones it keeps)."""
    global _server_preload
    ctx = multiprocessing.get_context("forkserver")
    if _server_preload is not None:
        missing = [m for m in preload if m not in _server_preload]
        if missing:
            log.warning(
                "this process's fork server was started with %s: %s not imported there (each forked "
                "process imports what it needs itself)",
                _server_preload,
                missing,
            )
        return ctx
    _server_preload = list(preload)
    ctx.set_forkserver_preload([__name__])  # (which imports ``preload``: see _PRELOAD_ENV)
    # the server inherits these: the modules to import, and no CUDA initialized by them (see the
    # module's docstring)
    server_env = {_PRELOAD_ENV: f"{os.getpid()}:{','.join(preload)}", "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
    before = {k: os.environ.get(k) for k in server_env}
    os.environ.update(server_env)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        for k, v in before.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
    return ctx


def start(
    cmd: PythonCommand, env: dict[str, str], *, log_path: str | None = None, preload=DEFAULT_PRELOAD
) -> Forked:
    """Fork ``cmd`` from this process's server, with ``env`` as its whole environment, in this
    process's working folder; its output to ``log_path`` (else this process's stdout and stderr,
    those it had when the server started)."""
    process = _server(preload).Process(target=_body, args=(cmd, env, os.getcwd(), log_path), daemon=True)
    process.start()
    return Forked(process, cmd.argv)


# last, this module whole: in a server, the modules imported here may import it in turn
_SERVER_PRELOAD = _server_preload_from_env()
_PRELOAD_FAILED = _import_preload(_SERVER_PRELOAD)
if _SERVER_PRELOAD is not None:
    atexit.register(_leave_now)
