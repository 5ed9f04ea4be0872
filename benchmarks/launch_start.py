"""How soon a launched job trains, and what a restart costs: ``lowcomm launch --start exec``
against ``--start forkserver``.

    python benchmarks/launch_start.py --json benchmarks/results/launch_start.json

For each start method and each ``--replicas`` count, a ``lowcomm launch`` of ``lowcomm train``
(a tiny model on a small corpus, 4 steps, a checkpoint every step): the seconds from the
launcher's start to rank 0's first step (its events' clock), the launcher's whole wall time, and
the same job with rank 1 killed at step 2 and the job restarted once (``--max-restarts 1``, a fault
plan; it resumes from step 1's checkpoint). The medians of ``--reps`` runs, and the machine's CPU
seconds over each run (``/proc/stat``, every process on the machine counted: run it on a quiet
machine; null elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import stamp, write_result

MODES = ("exec", "forkserver")
TINY = ["--model-dim", "16", "--layers", "1", "--heads", "2", "--seq-len", "8", "--batch-size", "2"]


def _cpu_seconds() -> float | None:
    """The machine's CPU seconds so far (user, nice, system, irq, softirq), or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    return sum(int(fields[i]) for i in (1, 2, 3, 6, 7)) / os.sysconf("SC_CLK_TCK")


def _corpus(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.py").write_text("".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(2000)))
    return str(folder)


def one_job(mode: str, replicas: int, corpus: str, tmp: Path, restart: bool) -> dict:
    """One launched job: seconds to rank 0's first step, the launcher's wall, the machine's CPU."""
    run_dir = tmp / f"{mode}-{replicas}-{restart}-{time.time_ns()}"
    train = [sys.executable, "-m", "lowcomm", "train", *TINY, "--corpus", corpus, "--steps", "4"]
    train += ["--sync-every", "2", "--eval-every", "0", "--checkpoint-every", "1", "--resume", "auto"]
    train += ["--quiet", "--run-dir", str(run_dir)]
    cmd = [sys.executable, "-m", "lowcomm", "launch", "--replicas", str(replicas), "--start", mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if restart:
        cmd += ["--max-restarts", "1"]
        env["LOWCOMM_FAULTS"] = json.dumps({"faults": [{"kind": "kill", "target": "rank:1", "at_step": 2}]})
    cpu0, t0, wall0 = _cpu_seconds(), time.monotonic(), time.time()
    res = subprocess.run([*cmd, "--", *train], capture_output=True, text=True, timeout=600, env=env)
    wall = time.monotonic() - t0
    cpu1 = _cpu_seconds()
    if res.returncode != 0:
        raise RuntimeError(
            f"{mode} x{replicas} (restart={restart}) exited {res.returncode}: {res.stderr[-2000:]}"
        )
    steps = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line]
    first = min(e["wall"] for e in steps if e.get("kind") == "step")
    restarted = "restarting it (restart 1 of 1)" in res.stderr
    if restart and not restarted:
        raise RuntimeError(f"{mode} x{replicas}: the job was not restarted: {res.stderr[-2000:]}")
    return {
        "first_step_s": first - wall0,
        "wall_s": wall,
        "cpu_s": None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
    }


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r[key] is not None]
    return round(statistics.median(values), 2) if values else None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", default="2,4", help="comma list of process counts (default 2,4)")
    ap.add_argument("--reps", type=int, default=3, help="runs of each job, medians reported (default 3)")
    ap.add_argument("--no-restart", action="store_true", help="leave out the restarted jobs")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    counts = [int(n) for n in args.replicas.split(",")]
    if args.reps < 1 or any(n < 1 for n in counts):
        ap.error(f"--reps {args.reps} and --replicas {args.replicas} must be >= 1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = _corpus(Path(tmp) / "corpus")
        for replicas in counts:
            for restart in (False,) if args.no_restart else (False, True):
                for mode in MODES:
                    runs = [one_job(mode, replicas, corpus, Path(tmp), restart) for _ in range(args.reps)]
                    row = {"start": mode, "replicas": replicas, "restarted_once": restart}
                    row.update({k: _median(runs, k) for k in ("first_step_s", "wall_s", "cpu_s")})
                    rows.append(row)
                    print(row, flush=True)
    out = {**stamp("launch_start"), "reps": args.reps, "results": rows}
    write_result(out, args.json, echo=False)  # (each row was printed)
    return out


if __name__ == "__main__":
    main()
