"""An elastic job on this machine (127.0.0.1): a coordinator process and worker processes.

Used by the chaos runner, the elastic benchmarks, the examples and the tests. Each worker is
``python -m lowcomm train --coordinator ... --worker-id ID --run-dir DIR/runs/ID``; its output goes
to ``DIR/ID-*.log``.

``start="forkserver"`` forks each process (the same command line, run as ``python -m lowcomm``
runs it) from a server that imported torch and lowcomm once (``lowcomm.runtime.forkserver``, which
says what such a process shares and what it does not): a worker is training in a fraction of a
second instead of after the ~4 s of CPU a new interpreter spends importing torch and Dynamo. A
test that starts dozens of workers spends most of its CPU there. A script that starts such a job
guards its main (``if __name__ == "__main__":``), as ``multiprocessing`` asks of any script whose
processes it starts this way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..._checks import threads_env
from ...comm.net import free_port
from .. import forkserver
from ..errors import CoordinatorError
from .client import CoordinatorClient
from .protocol import new_key

__all__ = ["LocalJob", "pace"]


def pace(workers, delay=0.04, extra=()):
    """A fault plan that slows every worker's steps a little (so a test can act mid-run), plus ``extra``."""
    faults = [
        {"kind": "delay", "target": f"worker:{w}", "at_step": 1, "delay": delay, "duration": 3600}
        for w in workers
    ]
    return {"seed": 0, "faults": faults + list(extra)}


#: what the fork server imports once, for its processes to share: the modules a ``lowcomm``
#: process imports first (names for the server; this module imports none of them)
_PRELOAD = [*forkserver.DEFAULT_PRELOAD, "lowcomm.runtime.elastic.server"]


class LocalJob:
    """Args: tmp: the job's folder; flags: ``lowcomm train`` flags of every worker (model, data,
    schedule); coord_flags: flags of ``lowcomm coordinator``; start: "exec" (each process a new
    ``python -m lowcomm``) or "forkserver" (forked from a server that imported torch once: see
    the module's docstring); workers: how many workers will share this machine's cores at once
    (each gets its share as OMP_NUM_THREADS, unless that is set: ``_checks.threads_env``)."""

    def __init__(
        self,
        tmp: Path,
        flags: list[str],
        coord_flags: list[str] = (),
        start: str = "exec",
        workers: int | None = None,
    ):
        forkserver.check_start(start)
        self.start = start
        self.tmp, self.flags = Path(tmp), list(flags)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.key = new_key()
        self.port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.coord_flags = list(coord_flags)
        self.coord: subprocess.Popen | forkserver.Forked | None = None
        self.workers: dict[str, subprocess.Popen | forkserver.Forked] = {}
        self.env = {**os.environ, "LOWCOMM_KEY": self.key, "PYTHONUNBUFFERED": "1"}
        self.worker_env = threads_env(workers or 1)

    def _start(self, name: str, argv: list[str], env: dict[str, str], program: str | None = None):
        """``python -m lowcomm ARGV`` (or ``python PROGRAM ARGV``) as this job starts its
        processes, its output to ``tmp/NAME-<ns>.log``."""
        log = self.tmp / f"{name}-{time.time_ns()}.log"
        if self.start == "forkserver":
            cmd = forkserver.PythonCommand(
                "module" if program is None else "path", program or "lowcomm", tuple(argv)
            )
            return forkserver.start(cmd, env, log_path=str(log), preload=_PRELOAD)
        with open(log, "w") as out:  # (the child holds its own descriptor)
            return subprocess.Popen(
                [sys.executable, *(["-m", "lowcomm"] if program is None else [program]), *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=forkserver.die_with_parent,
            )

    def start_coordinator(self, extra: list[str] = ()) -> None:
        argv = ["--log-level", "INFO", "coordinator", "--bind", self.endpoint, *self.coord_flags, *extra]
        self.coord = self._start("coordinator", argv, self.env)

    def start_worker(
        self,
        wid: str,
        plan: dict | None = None,
        extra: list[str] = (),
        env: dict | None = None,
        program: str | None = None,
    ):
        """Start worker ``wid`` (``plan``: its fault plan; ``extra``: more train flags; ``program``:
        a Python script run in place of ``python -m lowcomm``, taking the same arguments)."""
        e = dict(self.env, **self.worker_env, **(env or {}))
        if plan is not None:
            e["LOWCOMM_FAULTS"] = json.dumps(plan)
        argv = ["--log-level", "WARNING", "train", "--coordinator", self.endpoint, "--worker-id", wid]
        argv += ["--run-dir", str(self.run_dir(wid)), "--quiet", *self.flags, *extra]
        self.workers[wid] = self._start(wid, argv, e, program)
        return self.workers[wid]

    def status(self) -> dict | None:
        c = CoordinatorClient(self.endpoint, bytes.fromhex(self.key), f"test-{time.time_ns()}", timeout_s=1.0)
        try:
            return c.request("status", {}).body
        except CoordinatorError:
            return None
        finally:
            c.close()

    def wait_until(self, pred, timeout: float, what: str) -> dict:
        """The first status for which ``pred(status)`` holds; raises TimeoutError (with the logs)."""
        end = time.time() + timeout
        while time.time() < end:
            st = self.status()
            if st is not None and pred(st):
                return st
            time.sleep(0.2)
        raise TimeoutError(
            f"timed out after {timeout}s waiting for {what}; last status {self.status()}\n" + self.logs()
        )

    def wait_workers(self, names, timeout: float) -> dict[str, int]:
        """Each worker's exit code once all of ``names`` ended; raises TimeoutError (with the logs)."""
        end = time.time() + timeout
        codes = {}
        for n in names:
            try:
                codes[n] = self.workers[n].wait(timeout=max(end - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"worker {n} did not finish in {timeout}s\n" + self.logs()) from None
        return codes

    def run_dir(self, wid: str) -> Path:
        """Worker ``wid``'s run directory."""
        return self.tmp / "runs" / wid

    def summary(self, wid: str) -> dict:
        return json.loads((self.run_dir(wid) / "summary.json").read_text())

    def events(self, wid: str, kind: str | None = None) -> list[dict]:
        path = self.run_dir(wid) / "events.jsonl"
        out = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [e for e in out if kind is None or e["kind"] == kind]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp.glob("*.log")))

    def close(self) -> None:
        for p in [*self.workers.values(), self.coord]:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(10)
