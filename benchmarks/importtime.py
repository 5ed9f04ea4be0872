"""What ``import lowcomm`` costs: lowcomm's own modules' import time and what else it loads.

    python benchmarks/importtime.py --json benchmarks/results/importtime.json

Runs ``python -X importtime -c "import lowcomm"`` in fresh interpreters (``--reps``) and reports,
as medians: the self time of lowcomm's own modules (the goal: under 40 ms), the total with torch
and numpy, and the optional packages loaded (the goal: none of pyzmq, msgpack, scipy,
matplotlib, lightning, transformers, nor Triton, which loads with the first low-precision
layer). The same for ``lowcomm.integrations`` and for what a ``lowcomm train`` process imports
(``lowcomm.runtime.trainer.loop``).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

from common import stamp, write_result

#: packages ``import lowcomm`` must not load (Triton comes with a CUDA build of torch, not as an extra)
OPTIONAL = ("zmq", "msgpack", "scipy", "matplotlib", "lightning", "transformers", "accelerate", "triton")


def one_import(module: str) -> tuple[float, float, list[str]]:
    """(lowcomm's own self time ms, total ms, optional top-level packages loaded)."""
    err = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    own = total = 0.0
    loaded = set()
    for line in err.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _cumulative, name = (part.strip() for part in line[len("import time:") :].split("|"))
        total += int(self_us) / 1000
        top = name.split(".")[0]
        if top == "lowcomm":
            own += int(self_us) / 1000
        elif top in OPTIONAL:
            loaded.add(top)
    return own, total, sorted(loaded)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7, help="fresh interpreters to time (default 7)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    rows = {}
    for module in ("lowcomm", "lowcomm.integrations", "lowcomm.runtime.trainer.loop"):
        runs = [one_import(module) for _ in range(args.reps)]
        rows[module] = {
            "own_ms_median": round(statistics.median(r[0] for r in runs), 2),
            "total_ms_median": round(statistics.median(r[1] for r in runs), 1),
            "optional_loaded": sorted({m for r in runs for m in r[2]}),
        }
        print(f"import {module}: {rows[module]}")
    out = {**stamp("importtime"), "reps": args.reps, "goal_own_ms": 40, "results": rows}
    write_result(out, args.json, echo=False)  # (each module's line was printed)


if __name__ == "__main__":
    main()
