"""Overlap under an emulated slow link: 4 real processes on loopback (issue: multi-process).

For each variant it runs ``lowcomm launch --replicas M -- lowcomm train ... --link-bandwidth B
--link-latency L`` and reads the run's summary: wall time per inner step and the fraction of the
training loop spent computing (compute utilization). Variants: no communication at all (the
reference step time), DP (fp32 gradients every step), blocking vanilla DiLoCo (fp32), and
Streaming DiLoCo (P = 4, τ = 1, e3m0).

    python benchmarks/overlap.py --json benchmarks/results/overlap.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import launch_command, stamp, write_result

VARIANTS = {
    "no_comm": ["--sync-every", "1000000", "--no-final-sync"],
    "dp": ["--mode", "dp"],
    "diloco_blocking": ["--fragments", "1", "--overlap", "0", "--codec", "fp32"],
    "streaming": ["--fragments", "4", "--overlap", "1", "--codec", "e3m0", "--alpha", "0.5"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--sync-every", type=int, default=50)
    ap.add_argument("--bandwidth", default="100Mbit")
    ap.add_argument("--latency", default="20ms")
    ap.add_argument(
        "--model-args", default="--model-dim 128 --layers 4 --heads 4 --seq-len 128 --batch-size 8"
    )
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default="runs/overlap")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in args.variants.split(","):
        run_dir = f"{args.out}/{name}"
        extra = VARIANTS[name]
        sync = [] if name == "no_comm" else ["--sync-every", str(args.sync_every)]
        cmd = launch_command(args.replicas, sys.executable, "-m", "lowcomm")
        cmd += [
            "train",
            "--quiet",
            "--threads",
            "1",
            "--steps",
            str(args.steps),
            "--eval-every",
            "0",
            "--eval-batches",
            "4",
            *args.model_args.split(),
            *sync,
            *extra,
            "--link-bandwidth",
            args.bandwidth,
            "--link-latency",
            args.latency,
            "--run-dir",
            run_dir,
        ]
        t0 = time.time()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        s = json.loads(Path(run_dir, "summary.json").read_text())
        results[name] = {
            "step_seconds": s["step_seconds"],
            "comm_free_fraction": s["comm_free_fraction"],
            "bytes_sent_per_replica": s["bytes_sent_per_replica"],
            "wait_seconds": s["timing"]["wait_s"],
            "comm_wall_seconds": s["timing"]["comm_wall_s"],
            "final_eval_loss": s["final_eval_loss"],
            "launch_wall_seconds": time.time() - t0,
        }
        print(json.dumps({name: results[name]}), flush=True)
    if "no_comm" in results:
        for r in results.values():
            r["step_time_vs_no_comm"] = r["step_seconds"] / results["no_comm"]["step_seconds"]
    out = {**stamp("overlap"), "args": vars(args), "results": results}
    write_result(out, args.json)


if __name__ == "__main__":
    main()
