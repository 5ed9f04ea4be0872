"""What making the replicas start alike costs in memory: the peak resident memory DiLoCo's start-up
(``init="broadcast"`` / ``"check"``) adds over the model's own.

    python benchmarks/startup_memory.py --json benchmarks/results/startup_memory.json

In a fresh process each (the peak is the process's own high-water mark, ``VmHWM``): a model of
``--layers`` Linear layers of ``--width`` squared (fp32, on the CPU), then the start-up's copy and
digest of every parameter alone (``DiLoCo._start_from_the_same_weights``, a group of one:
``check``, the digest every replica compares). It copied the whole model into one buffer and
that buffer into bytes for the digest (twice the model); it now goes in buckets of
``START_BUCKET_BYTES``. On a GPU the buffer is on the GPU, beside the weights (not measured here).
"""

from __future__ import annotations

from common import peak_memory_probe, probe_args, write_probe

PROBE = """
import json, sys, time
import torch
import lowcomm
from lowcomm.optim.diloco import DiLoCo

width, layers = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
params = list(model.parameters())
before = hwm_mb()
t = time.perf_counter()
DiLoCo._start_from_the_same_weights(lowcomm.LocalGroup.create(1)[0], params, "check")
print(json.dumps({
    "params": sum(p.numel() for p in params),
    "model_mb": sum(p.numel() * p.element_size() for p in params) / 2**20,
    "peak_added_mb": hwm_mb() - before,
    "seconds": time.perf_counter() - t,
}))
"""


def main() -> None:
    args = probe_args(__doc__)
    row = peak_memory_probe(PROBE, args.width, args.layers)
    row["peak_added_over_model"] = round(row["peak_added_mb"] / row["model_mb"], 3)
    print(
        f"start-up of {row['params'] / 1e6:.1f}M fp32 parameters ({row['model_mb']:.0f} MB): peak "
        f"+{row['peak_added_mb']:.0f} MB ({row['peak_added_over_model']:.2f}x the model), "
        f"{row['seconds']:.2f} s"
    )
    write_probe("startup_memory", args, row)


if __name__ == "__main__":
    main()
