"""FP8 / MXFP8 kernels: numerics everywhere, speed on a GPU (issue: FP8 and MXFP8).

    python benchmarks/kernels.py --json benchmarks/results/kernels.json
    python benchmarks/kernels.py --static --json benchmarks/results/kernels_static.json

Numerics (any device): relative error of each recipe's GEMM against fp64 and of the fast MX path
against the exact MX path, on random data and on data whose 32-blocks differ in scale within a
group of four. On CUDA (reported as not measured otherwise), medians of triton.testing.do_bench:

- GEMMs at 8192^3, 16384x4096x14336, 16384x14336x4096 and 4096^3: cuBLAS bf16, fp8 tensorwise /
  rowwise and mxfp8_fast (B in 1x128 blocks, and in 128x128 tiles) through torch._scaled_mm
  (quantize included), the exact-MX Triton GEMM
  (B row-major, and B = Wᵀ as fprop reads it), the 1x128 block-scaled Triton GEMM, the fused
  dual-axis MX quantize (autotuned, the tiles it took, and each candidate tile pinned) and the fp8
  dual quantize (tensorwise, rowwise; against the same copies made by torch ops) in bytes read +
  written per second, and a copy for the bandwidth it has;
- one Linear 16384x4096->14336, forward + backward in eager mode, bf16 against every recipe;
- the reference model trained ``--train-steps`` steps in fp32 and in each recipe: loss ratios.

``--static`` instead compiles every Triton kernel at its CUDA launch configuration for sm_90a and
sm_100a on this machine (no GPU needed; lowcomm.kernels.triton_static) and records registers,
spills, shared memory, the MMA instruction issued, barriers, shuffles and store widths: what the
compiler made, not how fast it runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from functools import partial

import torch
from common import commit

from lowcomm.kernels import qmatmul
from lowcomm.kernels.gemm import RECIPES

SHAPES = [(8192, 8192, 8192), (16384, 4096, 14336), (16384, 14336, 4096), (4096, 4096, 4096)]


def numerics(device: str) -> dict:
    torch.manual_seed(0)
    out = {}
    cases = {
        "random": (torch.randn(256, 1024), torch.randn(1024, 256)),
        "mixed_block_scales": (
            torch.randn(256, 1024) * (2.0 ** (4 * (torch.arange(1024) // 32 % 4) - 8)),
            torch.randn(1024, 256),
        ),
        "column_scales_of_b": (  # B's columns span 2^-8 .. 2^8: what a 128x128 tile flattens
            torch.randn(256, 1024),
            torch.randn(1024, 256) * (2.0 ** torch.linspace(-8, 8, 256)),
        ),
    }
    for name, (a, b) in cases.items():
        a, b = a.to(device), b.to(device)
        ref = a.double() @ b.double()
        exact = qmatmul(a, b, "mxfp8", backend="emulated")
        row = {}
        variants = {r: {"recipe": r} for r in RECIPES}
        variants["mxfp8_fast_w128x128"] = {"recipe": "mxfp8_fast", "b_tile": "128x128"}
        for variant, kw in variants.items():
            y = qmatmul(a, b, backend="emulated", **kw)
            col_err = (y - exact).norm(dim=0) / exact.norm(dim=0)
            row[variant] = {
                "rel_err_vs_fp64": float((y.double() - ref).norm() / ref.norm()),
                "rel_err_vs_exact_mx": float((y - exact).norm() / exact.norm()),
                # the Frobenius error is the large columns' error; a small column's own is here
                "worst_column_rel_err_vs_exact_mx": float(col_err.amax()),
            }
        out[name] = row
    return out


def cuda_bench(fn) -> float:
    """Median milliseconds of ``fn`` by triton.testing.do_bench (warm-up, L2 flushed between runs)."""
    import triton.testing

    return triton.testing.do_bench(fn)


def _time_rate(row: dict, name: str, amount: float, fn, bench=cuda_bench, unit: str = "tflops") -> None:
    """``row[f"{name}_{unit}"]`` = ``amount`` (flops, or bytes for TB/s) per second / 1e12, from the
    median time of ``fn``; ``row[f"{name}_error"]`` instead if it fails."""
    try:
        row[f"{name}_{unit}"] = amount / bench(fn) / 1e9  # per ms -> per s, / 1e12
    except Exception as e:  # one path failing (an old torch, a missing backend) spoils no other
        row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"


def speed(shapes=SHAPES, device: str = "cuda", bench=cuda_bench) -> dict:
    """GEMM TFLOP/s per path against cuBLAS bf16, and the dual quantize's bytes per second."""
    from lowcomm.kernels import quantize_mx
    from lowcomm.kernels.gemm import regroup_mx_1x128
    from lowcomm.kernels.triton_fp8 import fp8_quantize_dual
    from lowcomm.kernels.triton_mx_gemm import blockwise_matmul, mx_matmul
    from lowcomm.kernels.triton_quantize import QUANTIZE_CUDA_CONFIGS, last_tuned_config, mx_quantize_dual

    scaled = "scaled_mm" if device == "cuda" else "emulated"  # CPU: the smoke test of this script
    rows = []
    for M, K, N in shapes:
        a = torch.randn(M, K, device=device, dtype=torch.bfloat16)
        b = torch.randn(K, N, device=device, dtype=torch.bfloat16)
        flops = 2 * M * N * K
        row = {"shape": [M, K, N]}
        _time_rate(row, "bf16", flops, lambda a=a, b=b: a @ b, bench)
        for r in ("fp8_tensorwise", "fp8_rowwise", "mxfp8_fast"):  # quantize included
            _time_rate(row, r, flops, lambda a=a, b=b, r=r: qmatmul(a, b, r, backend=scaled), bench)
        fast_w128 = partial(qmatmul, a, b, "mxfp8_fast", backend=scaled, b_tile="128x128")
        _time_rate(row, "mxfp8_fast_w128x128", flops, fast_w128, bench)
        da, sa = quantize_mx(a, axis=1)
        db, sb = quantize_mx(b, axis=0)
        _time_rate(row, "mx_exact_triton", flops, partial(mx_matmul, da, sa, db, sb), bench)
        # the layout fprop uses: B = Wᵀ, K-contiguous (a transposed view of a row-blocked W)
        wt, wts = quantize_mx(b.t().contiguous(), axis=1)
        _time_rate(row, "mx_exact_triton_bT", flops, partial(mx_matmul, da, sa, wt.t(), wts.t()), bench)
        qa, ga = regroup_mx_1x128(da, sa, axis=1)
        qb, gb = regroup_mx_1x128(db, sb, axis=0)
        _time_rate(row, "mx_fast_triton", flops, partial(blockwise_matmul, qa, ga, qb, gb), bench)
        moved = a.numel() * a.element_size() + 2 * a.numel() + 2 * a.numel() // 32
        _time_rate(row, "dual_quantize", moved, lambda a=a: mx_quantize_dual(a), bench, unit="TBps")
        row["dual_quantize_tiles"] = last_tuned_config()  # what the autotuner took (None: no tuning)
        for cfg in QUANTIZE_CUDA_CONFIGS:  # each candidate, pinned
            tile = f"{cfg['BLOCK_R']}x{cfg['BLOCK_C']}w{cfg['num_warps']}"
            pinned = partial(mx_quantize_dual, a, config=cfg)
            _time_rate(row, f"dual_quantize_{tile}", moved, pinned, bench, unit="TBps")
        _time_rate(row, "copy", 2 * a.numel() * a.element_size(), a.clone, bench, unit="TBps")
        # fp8: both copies a Linear's GEMMs read (as it is, and transposed), ideal traffic: one read
        # of a, two fp8 writes; the Triton kernels read a twice (amax, cast). Against the torch ops
        # the per-GEMM path runs (quantize_fp8 along each axis, then the transposed copy).
        moved = a.numel() * a.element_size() + 2 * a.numel()
        for scaling in ("tensorwise", "rowwise"):
            dual = partial(fp8_quantize_dual, a, scaling=scaling)
            _time_rate(row, f"fp8_dual_quantize_{scaling}", moved, dual, bench, unit="TBps")
            torch_ops = partial(_fp8_both_copies_in_torch, a, scaling)
            _time_rate(row, f"fp8_dual_quantize_{scaling}_torch", moved, torch_ops, bench, unit="TBps")
        rows.append(row)
    return {"rows": rows}


def _fp8_both_copies_in_torch(a: torch.Tensor, scaling: str):
    """What fp8_quantize_dual makes, from torch ops (quantize_fp8 along each axis, a transpose)."""
    from lowcomm.kernels import quantize_fp8

    q, s = quantize_fp8(a, "e4m3", scaling, axis=-1)
    d, t = quantize_fp8(a, "e4m3", scaling, axis=0)
    return q, s, d.t().contiguous(), t


LINEAR_SHAPE = (16384, 4096, 14336)  # tokens, in-features, out-features


def linear_speed(shape=LINEAR_SHAPE, device: str = "cuda", bench=cuda_bench) -> dict:
    """Forward + backward of one Linear (no bias, bf16 activations and weights), eager mode: nn.Linear
    against each low-precision recipe with the backend ``auto`` picks on this device. TFLOP/s count
    the three GEMMs (6·T·K·N); quantization is inside the timing."""
    from torch import nn

    from lowcomm.kernels import LowPrecisionLinear

    T, K, N = shape
    base = nn.Linear(K, N, bias=False, device=device, dtype=torch.bfloat16)
    x = torch.randn(T, K, device=device, dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(T, N, device=device, dtype=torch.bfloat16)
    row = {"shape": [T, K, N]}

    def step(layer):
        x.grad = None
        layer.weight.grad = None
        layer(x).backward(gy)

    layers = {"bf16": base}
    for recipe in ("fp8_tensorwise", "fp8_rowwise", "mxfp8", "mxfp8_fast"):
        layers[recipe] = LowPrecisionLinear.from_linear(base, recipe=recipe)
    for name, layer in layers.items():
        _time_rate(row, name, 6 * T * K * N, partial(step, layer), bench)
    for name in layers:
        if f"{name}_tflops" in row and "bf16_tflops" in row:
            row[f"{name}_x_bf16"] = row[f"{name}_tflops"] / row["bf16_tflops"]
    return row


def training(device: str = "cuda", steps: int = 300) -> dict:
    """The reference model trained in fp32 and in each low-precision recipe at equal steps (one
    replica, the bundled corpus): final eval losses and each one's ratio to fp32."""
    import tempfile

    from lowcomm.runtime import TrainConfig, train

    out = {"steps": steps}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "mxfp8", "fp8_rowwise", "fp8_tensorwise"):
            run_dir = f"{tmp}/{precision}"
            cfg = TrainConfig.from_flat(
                steps=steps, replicas=1, device=device, precision=precision, run_dir=run_dir
            )
            t0 = time.perf_counter()
            res = train(cfg, progress=False)
            out[precision] = {"final_eval_loss": res["final_eval_loss"], "wall_s": time.perf_counter() - t0}
    fp32 = out["fp32"]["final_eval_loss"]
    for precision in ("mxfp8", "fp8_rowwise", "fp8_tensorwise"):
        out[precision]["loss_ratio_vs_fp32"] = out[precision]["final_eval_loss"] / fp32
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--static", action="store_true", help="compile for sm_90a / sm_100a, run nothing")
    ap.add_argument("--train-steps", type=int, default=300, help="GPU training comparison (0: skip)")
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
            "commit": commit(),
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
        "commit": commit(),
        "numerics": numerics("cuda" if cuda else "cpu"),
        "speed": speed() if cuda else "not measured: no GPU on this machine",
        "linear": linear_speed() if cuda else "not measured: no GPU on this machine",
        "training": training("cuda", args.train_steps)
        if cuda and args.train_steps
        else "not run: no GPU on this machine (CI trains emulated mxfp8 on CPU: tests/test_kernels.py)",
    }
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
