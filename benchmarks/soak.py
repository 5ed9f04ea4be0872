"""A long chaos run: hundreds of mixed faults, every worker killed at once, rogue workers. Prints JSON.

    python benchmarks/soak.py --faults 200 --json benchmarks/results/soak.json

4 workers of a tiny reference GPT on 127.0.0.1 (``lowcomm chaos`` underneath: the same job run
fault-free for reference, then under the plan). The plan, drawn from ``--seed``: kills with
restart, hangs, delays, slow links, dropped rounds, corrupt and NaN contributions, partitions in
both directions, failed checkpoint writes, coordinator kills, and ``--kill-all`` moments at which
every worker is killed at the same step (they come back with ``--resume auto`` from their
checkpoints; the newest wins). While the chaos job runs, rogue workers come at it: one without
the job's key every few seconds (it must be told the key is rejected and exit with code 2) and
one with the key but another model (refused for its configuration); neither may ever appear
among the members.

Reported (goals): data lost (0), survivors' global parameters bitwise identical, final loss
within 0.05 of the fault-free run, every rogue refused; plus the survival report's per-fault
table (report.md and loss.png next to the JSON's run folder).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import stamp, write_result

from lowcomm.runtime.elastic import new_key
from lowcomm.runtime.faults import FaultPlan
from lowcomm.runtime.faults.chaos import run_chaos

TINY = ["--model-dim", "16", "--layers", "2", "--heads", "2", "--seq-len", "16", "--batch-size", "2"]
TINY += ["--eval-batches", "2", "--threads", "1"]
WORKERS = ["w0", "w1", "w2", "w3"]
# kind -> relative weight in the draw (kills, coordinator kills and kill-alls are added on top)
MIX = {
    "hang": 2,
    "delay": 3,
    "slow-link": 3,
    "drop-round": 3,
    "corrupt": 4,
    "nan": 4,
    "partition": 3,
    "checkpoint-fail": 2,
}


def make_plan(n: int, steps: int, rounds: int, kill_alls: int, coordinator_kills: int, seed: int) -> dict:
    """``n`` faults: ``kill_alls`` moments with every worker killed, coordinator kills, one kill
    with restart in eight, the rest drawn from MIX; steps spread over the run."""
    rng = random.Random(seed)
    faults = []
    for k in range(kill_alls):  # every worker at once: only their checkpoints hold the job's state
        at = int(steps * (k + 1) / (kill_alls + 1))
        faults += [{"kind": "kill", "target": f"worker:{w}", "at_step": at} for w in WORKERS]
    for k in range(coordinator_kills):
        faults.append({"kind": "coordinator-kill", "target": "coordinator", "at_time": 20 + 40 * k})
    kinds, weights = list(MIX), list(MIX.values())
    while len(faults) < n:
        w = rng.choice(WORKERS)
        kind = "kill" if rng.random() < 1 / 8 else rng.choices(kinds, weights)[0]
        f = {"kind": kind, "target": f"worker:{w}"}
        if kind in ("drop-round", "corrupt", "nan"):
            f["at_round"] = rng.randrange(2, rounds - 2)
        else:
            f["at_step"] = rng.randrange(20, steps - 20)
        if kind == "hang":
            f["duration"] = rng.choice([1.0, 2.0, 4.0])
        elif kind == "delay":
            f.update(duration=rng.choice([1.0, 2.0]), delay=rng.choice([0.05, 0.2]))
        elif kind == "slow-link":
            f.update(duration=2.0, latency=rng.choice(["20ms", "80ms"]))
        elif kind == "partition":
            f.update(duration=rng.choice([2.0, 4.0]), direction=rng.choice(["peers", "coordinator"]))
        faults.append(f)
    return {"seed": seed, "faults": faults}


class Rogues:
    """Workers that must never get in: one without the key, one with another model."""

    def __init__(self, flags: list[str], every_s: float, folder: Path) -> None:
        self.flags, self.every_s, self.folder = flags, every_s, folder
        self.results: list[dict] = []
        self.members_seen: set[str] = set()
        self._last = 0.0
        self._threads: list[threading.Thread] = []

    def __call__(self, run) -> None:
        st = run.job.status()
        if st is not None:
            self.members_seen |= {m["worker_id"] for m in st["members"]}
        if time.time() - self._last < self.every_s or len(self.results) + len(self._threads) >= 40:
            return
        self._last = time.time()
        kind = "wrong_key" if len(self._threads) % 2 == 0 else "other_model"
        t = threading.Thread(target=self._attack, args=(run.job, kind, f"rogue{len(self._threads)}"))
        t.start()
        self._threads.append(t)

    def _attack(self, job, kind: str, name: str) -> None:
        env = {**job.env, "LOWCOMM_KEY": new_key() if kind == "wrong_key" else job.key}
        flags = [*self.flags]
        if kind == "other_model":
            flags[flags.index("--model-dim") + 1] = "32"
        cmd = [sys.executable, "-m", "lowcomm", "train", "--coordinator", job.endpoint, "--worker-id", name]
        # one sent as the job ends finds no coordinator: it gives up after 30 s, not the default 600
        cmd += ["--run-dir", str(self.folder / name), "--quiet", *flags, "--coordinator-timeout", "30"]
        t0 = time.time()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
            code, said = r.returncode, (r.stderr.strip().splitlines() or [""])[-1][:200]
        except subprocess.TimeoutExpired:  # counted against the goal, not lost with its thread
            code, said = None, "still running after 300 s (killed)"
        self.results.append(
            {"kind": kind, "worker": name, "returncode": code, "seconds": time.time() - t0, "said": said}
        )

    def outcome(self, r: dict) -> str:
        """refused (exit code 2: the key or the configuration), unanswered (it came after the job
        ended: no coordinator answered it), or what else happened (a failure of the goal)."""
        if r["returncode"] == 2:
            return "refused"
        if r["returncode"] == 1 and "no reply from the coordinator" in r["said"]:
            return "unanswered"
        return f"exit code {r['returncode']}"

    def join(self) -> None:
        for t in self._threads:
            t.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faults", type=int, default=200)
    # 960 rounds: a fault every ~5 rounds. At 2400 steps (a fault every 1.2 rounds) only 39 of 240
    # rounds had all four workers; the loss then measured how long workers were out, not the runtime
    ap.add_argument("--steps", type=int, default=9600)
    ap.add_argument("--sync-every", type=int, default=10)
    ap.add_argument("--kill-alls", type=int, default=3)
    ap.add_argument("--coordinator-kills", type=int, default=3)
    ap.add_argument("--rogue-every", type=float, default=8.0, help="seconds between rogue workers")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--out", default=None, help="folder of the runs and the report (default: a temp folder)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="lowcomm-soak-"))
    flags = [*TINY, "--steps", str(args.steps), "--sync-every", str(args.sync_every), "--eval-every", "200"]
    flags += ["--checkpoint-every", "20", "--resume", "auto"]
    rounds = args.steps // args.sync_every
    plan = FaultPlan.from_dict(
        make_plan(args.faults, args.steps, rounds, args.kill_alls, args.coordinator_kills, args.seed)
    )
    os.environ.setdefault("LOWCOMM_KEY", new_key())
    rogues = Rogues(flags, args.rogue_every, out / "rogues")
    t0 = time.time()
    report = run_chaos(plan, len(WORKERS), out, flags, timeout=3600.0, observer=rogues)
    rogues.join()
    outcomes = [rogues.outcome(r) for r in rogues.results]
    kinds = {f["kind"] for f in report["faults"]}
    result = {
        **stamp("soak"),
        "workers": len(WORKERS),
        "steps": args.steps,
        "faults_planned": report["faults_planned"],
        "faults_injected": report["faults_injected"],
        "faults_by_kind": {k: sum(f["kind"] == k for f in report["faults"]) for k in sorted(kinds)},
        "data_lost": report["data_lost"],
        "workers_finished": report["workers_finished"],
        "final_loss_delta": report["final_loss_delta"],
        "reference_final_loss": report["reference_final_loss"],
        "chaos_final_loss": report["chaos_final_loss"],
        "rogues": len(rogues.results),
        "rogues_refused": outcomes.count("refused"),
        "rogues_unanswered": outcomes.count("unanswered"),  # sent as the job ended
        "rogues_seen_as_members": sorted(w for w in rogues.members_seen if w.startswith("rogue")),
        "rogue_exit_codes": sorted({r["returncode"] for r in rogues.results}, key=str),
        "rogue_messages": sorted({r["said"] for r in rogues.results})[:4],
        "chaos_wall_s": report["chaos_wall_s"],
        "reference_wall_s": report["reference_wall_s"],
        "wall_s": time.time() - t0,
        "report": str(out / "report.md"),
    }  # fmt: skip
    result["goals_met"] = {
        "data_lost_0": result["data_lost"] == 0,
        "final_loss_within_0.05": result["final_loss_delta"] is not None
        and abs(result["final_loss_delta"]) <= 0.05,
        # every rogue that reached the job refused (none unanswered but those sent as it ended)
        "every_rogue_refused": result["rogues_refused"] > 0
        and result["rogues_refused"] + result["rogues_unanswered"] == result["rogues"]
        and not result["rogues_seen_as_members"],
    }  # fmt: skip
    write_result(result, args.json)


if __name__ == "__main__":
    main()
