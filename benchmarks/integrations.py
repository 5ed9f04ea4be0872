"""Bytes a process sends between replicas under Lightning, with replicas of one and of two
processes (``lowcomm launch --procs-per-replica k``; the framework's DDP inside a replica).

    python benchmarks/integrations.py --out benchmarks/results/integrations.json

Two replicas of examples/lightning_diloco.py's model train 2 epochs (32 optimizer steps a
replica whatever its processes: a replica of k takes k times the data, sharded by Lightning),
``sync_every=8, fragments=2, overlap=1``, fp32 rounds, no final sync. Each process reports the
bytes its rounds sent (``DiLoCo.drain_round_stats()``, kept as the callback drains them at each
step): with k processes each sends its 1/k shard of every fragment, so a replica sends what a
one-process replica sends.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import launch_command, stamp, write_result  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def worker(out: Path) -> None:
    """One process of the launched job: fit, then write what its rounds sent."""
    sys.path.insert(0, str(EXAMPLES))
    import lightning.pytorch as pl
    from lightning_diloco import Regressor, data

    from lowcomm.integrations.lightning import DiLoCoCallback, replica_group

    class Kept(DiLoCoCallback):
        """The callback, keeping the rounds it drains at each step (to log them on the replica's
        first process): drained after the fit, they were gone."""

        rounds: list = []

        def on_fit_start(self, trainer, pl_module):
            super().on_fit_start(trainer, pl_module)
            drain = self.diloco.drain_round_stats

            def kept():
                out = drain()
                self.rounds.extend(out)
                return out

            self.diloco.drain_round_stats = kept

    group = replica_group()
    k = int(os.environ.get("WORLD_SIZE", "1"))  # (the replica's processes, after replica_group())
    pl.seed_everything(0)
    callback = Kept(group, sync_every=8, fragments=2, overlap=1, final_sync=False)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=k,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(Regressor(), data(seed=group.rank, n=512 * k))
    callback.diloco.drain_round_stats()  # (any left: kept too)
    rounds = callback.rounds
    report = {
        "replica": group.rank,
        "process": trainer.global_rank,
        "optimizer_steps": trainer.global_step,
        "rounds": len(rounds),
        "parameters_synced": sum(r.numel for r in rounds),
        "bytes_sent": sum(r.bytes_sent for r in rounds),
    }
    (out / f"r{group.rank}p{trainer.global_rank}.json").write_text(json.dumps(report))


def run(procs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = launch_command(2, sys.executable, __file__, "--worker", tmp, procs_per_replica=procs)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        wall = time.perf_counter() - start
        reports = sorted(
            (json.loads(p.read_text()) for p in Path(tmp).glob("*.json")),
            key=lambda r: (r["replica"], r["process"]),
        )
    if len(reports) != 2 * procs or not all(r["rounds"] for r in reports):  # (it once reported 0 bytes)
        raise SystemExit(f"each of the {2 * procs} processes should report its rounds: {reports}")
    per_replica = [sum(r["bytes_sent"] for r in reports if r["replica"] == i) for i in range(2)]
    return {
        "procs_per_replica": procs,
        "processes": reports,
        "bytes_sent_per_replica": per_replica,
        "wall_s": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="where to write the JSON (also printed)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(Path(args.worker))
        return
    result = {**stamp("integrations"), "runs": [run(k) for k in (1, 2)]}
    write_result(result, args.out)


if __name__ == "__main__":
    main()
