"""Processes of one job on one machine: each with its share of the cores, or each with a torch
thread per core (what they had before ``lowcomm launch`` and ``LocalJob(workers=)`` set
``OMP_NUM_THREADS``).

    python benchmarks/threads_share.py --json benchmarks/results/threads_share.json

Two jobs of a tiny model, each run ``--reps`` times both ways: ``lowcomm launch --replicas 2 --
lowcomm train`` (DiLoCo, ``--steps`` steps; tokens/s from its summary) and a local elastic job of
two workers and a coordinator (``LocalJob``; the wall from the coordinator's start to the last
worker's end). "own share": the launcher and LocalJob set each process's ``OMP_NUM_THREADS``
(``lowcomm._checks.threads_env``); "a thread per core": ``OMP_NUM_THREADS`` set to the machine's
core count, as torch takes when nothing is set. Medians of the reps. Run it on a quiet machine:
the slow case is thread pools spinning against each other, and its time varies from run to run.
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

from lowcomm._checks import threads_env

TINY = ["--model-dim", "16", "--layers", "1", "--heads", "2", "--seq-len", "16", "--eval-every", "100"]


def _env(share: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if not share:
        env["OMP_NUM_THREADS"] = str(len(os.sched_getaffinity(0)))
    return env


def launched(share: bool, steps: int, tmp: Path) -> dict:
    """``lowcomm launch --replicas 2 -- lowcomm train``: its tokens/s and the launcher's wall."""
    run_dir = tmp / f"launch-{share}-{time.time_ns()}"
    train = [sys.executable, "-m", "lowcomm", "train", *TINY, "--steps", str(steps), "--quiet"]
    train += ["--run-dir", str(run_dir)]
    cmd = [sys.executable, "-m", "lowcomm", "launch", "--replicas", "2", "--", *train]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=_env(share))
    wall = time.monotonic() - t0
    if res.returncode != 0:
        raise RuntimeError(f"the launched job failed: {res.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"wall_s": wall, "tokens_per_second": summary["tokens_per_second"]}


def elastic(share: bool, steps: int, tmp: Path) -> dict:
    """Two elastic workers and a coordinator (LocalJob): the wall to the last worker's end."""
    from lowcomm.runtime.elastic import LocalJob

    saved = os.environ.pop("OMP_NUM_THREADS", None)  # (LocalJob passes its environment on)
    if not share:
        os.environ["OMP_NUM_THREADS"] = str(len(os.sched_getaffinity(0)))
    try:
        job = LocalJob(
            tmp / f"elastic-{share}-{time.time_ns()}",
            [*TINY, "--steps", str(steps), "--sync-every", "50"],
            ["--min-workers", "2"],
            workers=2 if share else None,
        )
        t0 = time.monotonic()
        job.start_coordinator()
        for w in ("w0", "w1"):
            job.start_worker(w)
        codes = job.wait_workers(["w0", "w1"], 900)
        wall = time.monotonic() - t0
        job.close()
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)
        if saved is not None:
            os.environ["OMP_NUM_THREADS"] = saved
    if set(codes.values()) != {0}:
        raise RuntimeError(f"the elastic job failed: {codes}\n{job.logs()[-3000:]}")
    return {"wall_s": wall, "omp_num_threads": job.worker_env.get("OMP_NUM_THREADS")}


def _share() -> str:
    """OMP_NUM_THREADS each of two processes gets (the user's setting aside)."""
    saved = os.environ.pop("OMP_NUM_THREADS", None)
    try:
        return threads_env(2)["OMP_NUM_THREADS"]
    finally:
        if saved is not None:
            os.environ["OMP_NUM_THREADS"] = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--ways", default="share,per-core", help="which ways to run, of share and per-core (default: both)"
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    result = {
        **stamp("threads_share"),
        "cores": cores,
        "share": _share(),
        "steps": args.steps,
        "reps": args.reps,
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="lowcomm-threads-") as d:
        tmp = Path(d)
        for job, fn in (("launch 2 ranks", launched), ("elastic 2 workers", elastic)):
            for share in [w == "share" for w in args.ways.split(",")]:
                runs = [fn(share, args.steps, tmp) for _ in range(args.reps)]
                row = {
                    "job": job,
                    "threads": "own share" if share else "a thread per core",
                    "wall_s": statistics.median(r["wall_s"] for r in runs),
                    "walls_s": [r["wall_s"] for r in runs],
                }
                if "tokens_per_second" in runs[0]:
                    row["tokens_per_second"] = statistics.median(r["tokens_per_second"] for r in runs)
                result["rows"].append(row)
                print(row, file=sys.stderr, flush=True)
    write_result(result, args.json)


if __name__ == "__main__":
    main()
