"""Throughput of lowcomm's mean all-reduce against plain gloo all_reduce on loopback.

    lowcomm launch --replicas 4 -- python benchmarks/collective.py --json benchmarks/results/collective.json

Rank 0 prints and writes JSON: for each buffer size, median seconds and algorithm bandwidth
(fp32 bytes of the buffer / time) of dist.all_reduce (fp32, then divided by M) and of
DistributedGroup.all_reduce_mean under fp32, int8 and e3m0, plus the bytes each sent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
from common import stamp, write_result

from lowcomm.comm import get_codec
from lowcomm.runtime.trainer.topology import init_from_torchrun


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="262144,1048576,4194304")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    topo = init_from_torchrun()
    group = topo.outer
    M = group.size
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        x = torch.randn(n)
        row = {"numel": n, "fp32_mbytes": n * 4 / 1e6}

        def plain(x=x):
            y = x.clone()
            dist.all_reduce(y, group=group.pg)
            y /= M

        t = _median_time(plain, args.reps)
        row["gloo_all_reduce"] = {"seconds": t, "algbw_MBps": n * 4 / t / 1e6}
        for name in ("fp32", "int8", "e3m0"):
            codec = get_codec(name)
            work_box = {}

            def ours(x=x, codec=codec, work_box=work_box):
                w = group.all_reduce_mean(x, codec)
                w.wait()
                work_box["w"] = w

            t = _median_time(ours, args.reps)
            row[f"lowcomm_{name}"] = {
                "seconds": t,
                "algbw_MBps": n * 4 / t / 1e6,
                "bytes_sent": work_box["w"].stats.bytes_sent,
            }
        rows.append(row)
        if topo.rank == 0:
            print(json.dumps(row), flush=True)
    if topo.rank == 0 and args.json:
        write_result({**stamp("collective"), "replicas": M, "rows": rows}, args.json, echo=False)
    group.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
