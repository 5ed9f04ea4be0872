"""DP vs DiLoCo vs Streaming DiLoCo on the reference model at equal tokens (issue: the core).

Prints and writes JSON: final eval loss of each run, loss relative to DP, wire bytes per replica
and their ratio to DP, and the outer-loop overhead (send: Δ + encode, decode + sum, outer step and
merge) as a fraction of the inner-step compute of one replica.

    python benchmarks/diloco_vs_dp.py --steps 600 --out runs/bench --json benchmarks/results/diloco_vs_dp.json
"""

from __future__ import annotations

import argparse
import json

import torch
from common import stamp, write_result

from lowcomm.runtime import TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--sync-every", type=int, default=50)
    ap.add_argument("--model-dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--runs", default="dp,diloco,streaming", help="comma list of run names (see below)")
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    base = TrainConfig.from_flat(
        replicas=args.replicas,
        steps=args.steps,
        sync_every=args.sync_every,
        model_dim=args.model_dim,
        layers=args.layers,
        heads=4,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_every=0,
        eval_batches=32,
        threads=args.threads,
    )
    variants = {
        "dp": dict(mode="dp"),
        "diloco": dict(mode="diloco", fragments=1, overlap=0, codec="fp32"),
        "streaming": dict(mode="diloco", fragments=4, overlap=1, codec="e3m0", alpha=0.5),
        "streaming_a0": dict(mode="diloco", fragments=4, overlap=1, codec="e3m0", alpha=0.0),
        "streaming_fp32": dict(mode="diloco", fragments=4, overlap=1, codec="fp32", alpha=0.5),
        "diloco_e3m0": dict(mode="diloco", fragments=1, overlap=0, codec="e3m0"),
    }
    results = {}
    for name in args.runs.split(","):
        cfg = base.replace(run_dir=f"{args.out}/{name}", **variants[name])
        s = train(cfg, progress=False)
        t = s["timing"]
        inner_per_replica = t["inner_s"] / cfg.run.replicas
        overhead = t["send_s"] + t["decode_s"] + t["outer_s"]
        results[name] = {
            "final_eval_loss": s["final_eval_loss"],
            "bytes_sent_per_replica": s["bytes_sent_per_replica"],
            "wall_seconds": s["wall_seconds"],
            "rounds": s["rounds"],
            "overhead_fraction": overhead / inner_per_replica if cfg.run.mode == "diloco" else None,
            "config": {k: v for k, v in variants[name].items()},
        }
        print(json.dumps({name: results[name]}), flush=True)
    dp = results.get("dp")
    for r in results.values():
        if dp:
            r["loss_vs_dp"] = r["final_eval_loss"] / dp["final_eval_loss"] - 1
            r["bytes_reduction_vs_dp"] = dp["bytes_sent_per_replica"] / r["bytes_sent_per_replica"]
    if "diloco" in results:
        for r in results.values():
            r["loss_vs_diloco"] = r["final_eval_loss"] / results["diloco"]["final_eval_loss"] - 1
    out = {
        **stamp("diloco_vs_dp"),
        "threads": torch.get_num_threads(),
        "args": vars(args),
        "results": results,
    }
    write_result(out, args.json)


if __name__ == "__main__":
    main()
