"""FP8 / MXFP8 kernels: numerics everywhere, speed on a GPU (issue: FP8 and MXFP8).

    python benchmarks/kernels.py --json benchmarks/results/kernels.json
    python benchmarks/kernels.py --static --json benchmarks/results/kernels_static.json

Numerics (any device): relative error of each recipe's GEMM against fp64 and of the fast MX path
against the exact MX path, on random data and on data whose 32-blocks differ in scale within a
group of four. Speed (CUDA only; reported as not measured otherwise): medians of
triton.testing.do_bench for cuBLAS bf16, fp8 tensorwise / rowwise through torch._scaled_mm, the
exact-MX Triton GEMM, the 1x128 block-scaled Triton GEMM (mxfp8_fast), and the fused dual-axis
quantize (bytes read + written per second), at 8192^3, 16384x4096x14336, 16384x14336x4096 and
4096^3.

``--static`` instead compiles every Triton kernel at its CUDA launch configuration for sm_90a and
sm_100a on this machine (no GPU needed; lowcomm.kernels.triton_static) and records registers,
spills, shared memory and the MMA instruction issued: what the compiler made, not how fast it runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from functools import partial

import torch

from lowcomm.kernels import qmatmul
from lowcomm.kernels.gemm import RECIPES

SHAPES = [(8192, 8192, 8192), (16384, 4096, 14336), (16384, 14336, 4096), (4096, 4096, 4096)]


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


def numerics(device: str) -> dict:
    torch.manual_seed(0)
    out = {}
    cases = {
        "random": (torch.randn(256, 1024), torch.randn(1024, 256)),
        "mixed_block_scales": (
            torch.randn(256, 1024) * (2.0 ** (4 * (torch.arange(1024) // 32 % 4) - 8)),
            torch.randn(1024, 256),
        ),
    }
    for name, (a, b) in cases.items():
        a, b = a.to(device), b.to(device)
        ref = a.double() @ b.double()
        exact = qmatmul(a, b, "mxfp8", backend="emulated")
        row = {}
        for r in RECIPES:
            y = qmatmul(a, b, r, backend="emulated")
            row[r] = {
                "rel_err_vs_fp64": float((y.double() - ref).norm() / ref.norm()),
                "rel_err_vs_exact_mx": float((y - exact).norm() / exact.norm()),
            }
        out[name] = row
    return out


def _time_tflops(row: dict, name: str, flops: int, fn) -> None:
    """``row[name + "_tflops"]`` from the median time of ``fn``, or ``row[name + "_error"]``."""
    import triton.testing

    try:
        row[f"{name}_tflops"] = flops / triton.testing.do_bench(fn) / 1e9
    except Exception as e:  # one path failing (an old torch, a missing backend) spoils no other
        row[f"{name}_error"] = str(e)[:200]


def speed() -> dict:
    import triton.testing

    from lowcomm.kernels import quantize_mx
    from lowcomm.kernels.gemm import regroup_mx_1x128
    from lowcomm.kernels.triton_mx_gemm import blockwise_matmul, mx_matmul
    from lowcomm.kernels.triton_quantize import mx_quantize_dual

    rows = []
    for M, K, N in SHAPES:
        a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
        flops = 2 * M * N * K
        row = {"shape": [M, K, N]}
        _time_tflops(row, "bf16", flops, lambda a=a, b=b: a @ b)
        for r in ("fp8_tensorwise", "fp8_rowwise"):  # quantize included
            _time_tflops(row, r, flops, lambda a=a, b=b, r=r: qmatmul(a, b, r, backend="scaled_mm"))
        da, sa = quantize_mx(a, axis=1)
        db, sb = quantize_mx(b, axis=0)
        _time_tflops(row, "mx_exact_triton", flops, partial(mx_matmul, da, sa, db, sb))
        qa, ga = regroup_mx_1x128(da, sa, axis=1)
        qb, gb = regroup_mx_1x128(db, sb, axis=0)
        _time_tflops(row, "mx_fast_triton", flops, partial(blockwise_matmul, qa, ga, qb, gb))
        t = triton.testing.do_bench(lambda a=a: mx_quantize_dual(a))
        moved = a.numel() * a.element_size() + 2 * a.numel() + 2 * a.numel() // 32
        row["dual_quantize_TBps"] = moved / t / 1e9
        rows.append(row)
    return {"rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--static", action="store_true", help="compile for sm_90a / sm_100a, run nothing")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if args.static:
        import triton

        from lowcomm.kernels.triton_static import report

        out = {
            "benchmark": "kernels_static",
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()} CPU (compiled ahead of time; nothing run)",
            "triton": triton.__version__,
            "commit": _commit(),
            "kernels": report(),
        }
        print(json.dumps(out, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2)
        return
    out = {
        "benchmark": "kernels",
        "date": time.strftime("%Y-%m-%d"),
        "machine": torch.cuda.get_device_name() if cuda else f"{platform.machine()} CPU (no GPU)",
        "torch": torch.__version__,
        "commit": _commit(),
        "numerics": numerics("cuda" if cuda else "cpu"),
        "speed": speed() if cuda else "not measured: no GPU on this machine",
    }
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
