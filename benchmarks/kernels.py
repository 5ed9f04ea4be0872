"""FP8 / MXFP8 kernels: numerics everywhere, speed on a GPU (issue: FP8 and MXFP8).

    python benchmarks/kernels.py --json benchmarks/results/kernels.json
    python benchmarks/kernels.py --static --json benchmarks/results/kernels_static.json

Host time (CUDA): what a launch and one small Linear forward + backward in each recipe cost the
host, where the GPU's share is microseconds (``host``). The e3m0 codec's encode and decode on
one fragment-sized buffer, Triton kernels against the torch reference (``codec``).

Numerics (any device): relative error of each recipe's GEMM against fp64 and of the fast MX path
against the exact MX path, on random data and on data whose 32-blocks differ in scale within a
group of four. On CUDA (reported as not measured otherwise), medians of triton.testing.do_bench
(each call as called: where it costs the host more than the GPU, the host's time), and beside
each, ``..._device_tflops`` / ``..._device_TBps``, of the GPU's time alone (lowcomm.kernels.timing):

- GEMMs at 8192^3, 16384x4096x14336, 16384x14336x4096 and 4096^3: cuBLAS bf16, fp8 tensorwise /
  rowwise and mxfp8_fast (B in 1x128 blocks, and in 128x128 tiles) through torch._scaled_mm
  (quantize included; a bf16 result as the bf16 GEMM writes, and fp8 rowwise's converted to fp32
  too, ``_fp32_out``), fp8 tensorwise / rowwise with fast accumulation (``_fast_accum``: the fp8
  MMA's own sums), and their GEMM alone on operands quantized beforehand (``_gemm``, with and
  without fast accumulation), the exact-MX Triton GEMM
  (B row-major, and B = Wᵀ as fprop reads it), exact MX through cuBLAS bf16 with the MX
  dequantize (autotuned, the tile it took, and each candidate pinned), the 1x128 block-scaled
  Triton GEMM, the fused
  dual-axis MX quantize (autotuned, the tiles it took, and each candidate tile pinned), the fp8
  dual quantize (tensorwise, rowwise; autotuned, the tiles its two kernels took, and the 64 x 64
  tile on 8 warps it ran before, pinned; against the same copies made by torch ops), one rowwise
  copy of A's rows and of B's columns (the copies a rowwise GEMM quantizes: as chosen, and in one
  pass and in two), delayed scaling's one-pass quantize, the transposed copy of an fp8 copy
  (``fp8_transpose``, what compiled fp8_delayed and rowwise make it with, against a copy of the same
  bytes: ``fp8_copy``) and mxfp8_fast's (1x128,
  128x128; against the per-GEMM torch ops) in bytes read + written
  per second, and a copy for the bandwidth; the MX, fp8 and mxfp8_fast dual quantize again with
  ``_arith``: rounding to fp8 in fp32 arithmetic first (``LOWCOMM_FP8_HW_CVT=0``), as the
  kernels did before the conversion instruction did it;
- one Linear 16384x4096->14336, forward + backward in eager mode, bf16 against every recipe, with
  the path each recipe took there (each tensor quantized once, or per GEMM, and on which GEMMs),
  and fp8 tensorwise / rowwise with fast accumulation in none of its GEMMs and in all three
  (``_accum_none``, ``_accum_all``; the default, fprop's alone, is the recipe's own row);
- the reference model at d=1024, 12 layers, T=1024 trained ``--train-steps`` steps under bf16
  autocast with its Linear layers in bf16 and in each fast recipe: tokens/s and final loss ratios.

The JSON is written after each part, so a time-out keeps the parts that ran.

``--static`` instead compiles every Triton kernel at its CUDA launch configuration for sm_90a and
sm_100a on this machine (no GPU needed; lowcomm.kernels.triton_static) and records registers,
spills, shared memory, the MMA instruction issued, barriers, shuffles and store widths: what the
compiler made, not how fast it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from functools import partial
from pathlib import Path
from unittest import mock

import torch
from common import empty_launches, stamp, write_result

from lowcomm.kernels import qmatmul
from lowcomm.kernels.gemm import RECIPES
from lowcomm.kernels.timing import gpu_ms

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
    """Median milliseconds of ``fn`` by triton.testing.do_bench (warm-up, L2 flushed between runs;
    asked for the median: its default is the mean, which the figures up to 2026-12-04 were)."""
    import triton.testing

    return triton.testing.do_bench(fn, return_mode="median")


def _time_rate(row: dict, name: str, amount: float, fn, bench=cuda_bench, unit: str = "tflops") -> None:
    """``row[f"{name}_{unit}"]`` = ``amount`` (flops, or bytes for TB/s) per second / 1e12, from the
    median time of ``fn`` as called (``bench``; on the GPU do_bench, which counts the host's time
    where it exceeds the GPU's), and with ``cuda_bench`` also ``row[f"{name}_device_{unit}"]``
    from the GPU's time alone (:func:`~lowcomm.kernels.timing.gpu_ms`); ``row[f"{name}_error"]``
    instead if it fails."""
    try:
        row[f"{name}_{unit}"] = amount / bench(fn) / 1e9  # per ms -> per s, / 1e12
        if bench is cuda_bench:
            row[f"{name}_device_{unit}"] = amount / gpu_ms(fn) / 1e9
    except Exception as e:  # one path failing (an old torch, a missing backend) spoils no other
        row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"


def speed(shapes=SHAPES, device: str = "cuda", bench=cuda_bench) -> dict:
    """GEMM TFLOP/s per path against cuBLAS bf16, and the dual quantize's bytes per second."""
    from lowcomm.kernels import quantize_mx
    from lowcomm.kernels.gemm import regroup_mx_1x128
    from lowcomm.kernels.triton_fp8 import (
        FP8_CUDA_CONFIG,
        FP8_ONE_COPY_CUDA,
        _fp8_one_copy,
        _fp8_quantize_dual,
        _one_pass_fills,
        fp8_quantize_dual,
        fp8_quantize_scaled,
        fp8_transpose,
    )
    from lowcomm.kernels.triton_mx_gemm import blockwise_matmul, mx_dequant_matmul, mx_matmul
    from lowcomm.kernels.triton_quantize import (
        DEQUANT_CUDA_CONFIGS,
        FAST_CUDA_CONFIGS,
        QUANTIZE_CUDA_CONFIGS,
        _run_dequant,
        last_tuned_config,
        mx_dequantize,
        mx_fast_quantize_dual,
        mx_quantize_dual,
        tile_name,
    )

    scaled = "scaled_mm" if device == "cuda" else "emulated"  # CPU: the smoke test of this script
    rows = []
    for M, K, N in shapes:
        a = torch.randn(M, K, device=device, dtype=torch.bfloat16)
        b = torch.randn(K, N, device=device, dtype=torch.bfloat16)
        flops = 2 * M * N * K
        row = {"shape": [M, K, N]}
        _time_rate(row, "bf16", flops, lambda a=a, b=b: a @ b, bench)
        # quantize included; a bf16 result, as the bf16 row's and a layer's (until 2026-12-05 an
        # fp32 one: the rowwise and blockwise GEMMs' bf16 output then converted, as in the row
        # fp8_rowwise_fp32_out)
        bf16_out = {"out_dtype": torch.bfloat16}
        for r in ("fp8_tensorwise", "fp8_rowwise", "mxfp8_fast"):
            _time_rate(row, r, flops, partial(qmatmul, a, b, r, backend=scaled, **bf16_out), bench)
        _time_rate(
            row, "fp8_rowwise_fp32_out", flops, partial(qmatmul, a, b, "fp8_rowwise", backend=scaled), bench
        )
        # b as a Linear's weight hands it over: Wᵀ, the view of a contiguous (N, K) tensor, whose
        # rowwise copy is W's rows, summed in the fp8 MMA's precision: what a layer's fprop runs
        # (against the bf16 GEMM in the same layout)
        w = b.t().contiguous()
        _time_rate(row, "bf16_bT", flops, lambda a=a, w=w: a @ w.t(), bench)
        fprop = partial(qmatmul, a, w.t(), "fp8_rowwise", backend=scaled, fast_accum=True, **bf16_out)
        _time_rate(row, "fp8_rowwise_bT_fast_accum", flops, fprop, bench)
        for r in ("fp8_tensorwise", "fp8_rowwise"):  # the fp8 GEMMs: quantize included, and alone
            fast = partial(qmatmul, a, b, r, backend=scaled, fast_accum=True, **bf16_out)
            _time_rate(row, f"{r}_fast_accum", flops, fast, bench)
            for name, gemm in _fp8_gemms(a, b, r, scaled == "scaled_mm").items():
                _time_rate(row, name, flops, gemm, bench)
        fast_w128 = partial(qmatmul, a, b, "mxfp8_fast", backend=scaled, b_tile="128x128", **bf16_out)
        _time_rate(row, "mxfp8_fast_w128x128", flops, fast_w128, bench)
        da, sa = quantize_mx(a, axis=1)
        db, sb = quantize_mx(b, axis=0)
        _time_rate(row, "mx_exact_triton", flops, partial(mx_matmul, da, sa, db, sb), bench)
        # the layout fprop uses: B = Wᵀ, K-contiguous (a transposed view of a row-blocked W)
        wt, wts = quantize_mx(w, axis=1)
        _time_rate(row, "mx_exact_triton_bT", flops, partial(mx_matmul, da, sa, wt.t(), wts.t()), bench)
        # exact MX through bf16: both operands dequantized (one pass each), cuBLAS's bf16 GEMM
        # writing bf16 as the bf16 row does; and the dequantize alone (1 byte read, 2 written)
        _time_rate(
            row, "mx_exact_dequant", flops, partial(mx_dequant_matmul, da, sa, db, sb, **bf16_out), bench
        )
        dq_bT = partial(mx_dequant_matmul, da, sa, wt.t(), wts.t(), **bf16_out)
        _time_rate(row, "mx_exact_dequant_bT", flops, dq_bT, bench)
        dequant_moved = 3 * a.numel() + a.numel() // 32
        _time_rate(row, "mx_dequantize", dequant_moved, partial(mx_dequantize, da, sa), bench, unit="TBps")
        row["mx_dequantize_tiles"] = last_tuned_config("mx_dequantize")  # None: no tuning
        for cfg in DEQUANT_CUDA_CONFIGS:  # each candidate, pinned
            pinned = partial(_run_dequant, da, sa, True, False, config=cfg)
            _time_rate(row, f"mx_dequantize_{tile_name(cfg)}", dequant_moved, pinned, bench, unit="TBps")
        qa, ga = regroup_mx_1x128(da, sa, axis=1)
        qb, gb = regroup_mx_1x128(db, sb, axis=0)
        _time_rate(row, "mx_fast_triton", flops, partial(blockwise_matmul, qa, ga, qb, gb), bench)
        # the quantizes timed again at the end with the arithmetic rounding: name -> (bytes, call)
        arith = {}
        moved = a.numel() * a.element_size() + 2 * a.numel() + 2 * a.numel() // 32
        arith["dual_quantize"] = (moved, partial(mx_quantize_dual, a))
        _time_rate(row, "dual_quantize", *arith["dual_quantize"], bench, unit="TBps")
        row["dual_quantize_tiles"] = last_tuned_config()  # what the autotuner took (None: no tuning)
        for cfg in QUANTIZE_CUDA_CONFIGS:  # each candidate, pinned
            pinned = partial(mx_quantize_dual, a, config=cfg)
            _time_rate(row, f"dual_quantize_{tile_name(cfg)}", moved, pinned, bench, unit="TBps")
        _time_rate(row, "copy", 2 * a.numel() * a.element_size(), a.clone, bench, unit="TBps")
        # fp8: both copies a Linear's GEMMs read (as it is, and transposed), ideal traffic: one read
        # of a, two fp8 writes; the Triton kernels read a twice (amax, cast). Against the torch ops
        # the per-GEMM path runs (quantize_fp8 along each axis, then the transposed copy).
        moved = a.numel() * a.element_size() + 2 * a.numel()
        for scaling in ("tensorwise", "rowwise"):
            arith[f"fp8_dual_quantize_{scaling}"] = (moved, partial(fp8_quantize_dual, a, scaling=scaling))
            _time_rate(
                row,
                f"fp8_dual_quantize_{scaling}",
                *arith[f"fp8_dual_quantize_{scaling}"],
                bench,
                unit="TBps",
            )
            # what the autotuner took for the amax and the cast kernel (None: no tuning), and the
            # tile measured before it tuned, pinned
            tiles = {k: last_tuned_config(f"fp8_{k}") for k in ("amax", "cast")}
            row[f"fp8_dual_quantize_{scaling}_tiles"] = tiles
            pinned = partial(fp8_quantize_dual, a, scaling=scaling, config=FP8_CUDA_CONFIG)
            _time_rate(row, f"fp8_dual_quantize_{scaling}_64x64w8", moved, pinned, bench, unit="TBps")
            torch_ops = partial(_fp8_both_copies_in_torch, a, scaling)
            _time_rate(row, f"fp8_dual_quantize_{scaling}_torch", moved, torch_ops, bench, unit="TBps")
        # one rowwise copy (evaluation; a backward wanting only dx or dW; each operand of a
        # rowwise GEMM): a's rows and b's columns (what qmatmul quantizes), as fp8_quantize_dual
        # chooses (one pass where its slices fill the GPU), and in one and in two passes
        for side, t, rows_ in (("", a, True), ("_cols", b, False)):
            one_copy = t.numel() * t.element_size() + t.numel()
            name = f"fp8_one_copy_rowwise{side}"
            chosen = partial(fp8_quantize_dual, t, scaling="rowwise", rows=rows_, cols=not rows_)
            _time_rate(row, name, one_copy, chosen, bench, unit="TBps")
            row[f"{name}_passes"] = 1 if _one_pass_fills(t, rows_) else 2
            one = partial(_fp8_one_copy, t, "e4m3", rows_)
            _time_rate(row, f"{name}_one_pass", one_copy, one, bench, unit="TBps")
            if rows_:  # the rows' slices read twice (from L2 the second time), as before whole rows
                slices = partial(_fp8_one_copy, t, "e4m3", True, FP8_ONE_COPY_CUDA[True])
                _time_rate(row, f"{name}_slices", one_copy, slices, bench, unit="TBps")
            two = partial(_fp8_quantize_dual, t, "e4m3", "rowwise", rows_, not rows_, one_pass=False)
            _time_rate(row, f"{name}_two_pass", one_copy, two, bench, unit="TBps")
        # mxfp8_fast: both copies of an activation (1x128) and of a weight (128x128 tiles), MX
        # regrouped in one pass, against the per-GEMM path's torch ops (MX along each axis, then
        # the regrouping)
        moved_fast = moved + 2 * 4 * a.numel() // 128
        for tile in ("1x128", "128x128"):
            fast = partial(mx_fast_quantize_dual, a, tile=tile)
            _time_rate(row, f"mx_fast_dual_quantize_{tile}", moved_fast, fast, bench, unit="TBps")
            if tile == "1x128":
                arith["mx_fast_dual_quantize_1x128"] = (moved_fast, fast)
            row[f"mx_fast_dual_quantize_{tile}_config"] = last_tuned_config("mx_fast_quantize_dual")
        for cfg in FAST_CUDA_CONFIGS:  # each candidate pinned (1x128), the tuner's pick among them
            pinned = partial(mx_fast_quantize_dual, a, config=cfg)
            _time_rate(
                row, f"mx_fast_dual_quantize_1x128_{tile_name(cfg)}", moved_fast, pinned, bench, unit="TBps"
            )
        torch_ops = partial(_fast_both_copies_in_torch, a)
        _time_rate(row, "mx_fast_dual_quantize_1x128_torch", moved_fast, torch_ops, bench, unit="TBps")
        # delayed scaling (fp8_delayed): the scale known in advance, one read, the maximum recorded
        scale, amax = torch.tensor(0.01, device=device), torch.zeros(3, device=device)
        delayed = partial(fp8_quantize_scaled, a, scale, amax=amax, index=0)
        _time_rate(row, "fp8_delayed_quantize", moved, delayed, bench, unit="TBps")
        # compiled fp8_delayed's and rowwise's transposed copy, made from an fp8 copy (one byte
        # read and one written an element), against a copy of the same fp8 bytes
        q8 = torch.empty(a.shape, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn)
        _time_rate(row, "fp8_transpose", 2 * a.numel(), partial(fp8_transpose, q8), bench, unit="TBps")
        _time_rate(row, "fp8_copy", 2 * a.numel(), q8.clone, bench, unit="TBps")
        # the same kernels rounding to fp8 in fp32 arithmetic first, as they did before the
        # conversion did it (LOWCOMM_FP8_HW_CVT=0): what the conversion is worth, in one run (the
        # autotuned ones at the tiles or warps taken for the conversion: not a key of the tuning)
        with mock.patch.dict(os.environ, {"LOWCOMM_FP8_HW_CVT": "0"}):
            for name, (amount, fn) in arith.items():
                _time_rate(row, f"{name}_arith", amount, fn, bench, unit="TBps")
        rows.append(row)
        print(f"speed {json.dumps(row)}", flush=True)  # the log keeps each shape if time runs out
    return {"rows": rows}


def _fp8_gemms(a: torch.Tensor, b: torch.Tensor, recipe: str, scaled: bool) -> dict:
    """``{name: call}``: the fp8 GEMM of ``a @ b`` on operands quantized beforehand (the GEMM alone,
    as the layers run it: torch._scaled_mm where ``scaled``, else emulated), with the sums
    promoted to fp32 as they go (``{recipe}_gemm``) and in the fp8 MMA's own precision
    (``{recipe}_gemm_fast_accum``)."""
    from lowcomm.kernels.gemm import fp8_scaled_mm_operands
    from lowcomm.kernels.linear import _fp8_mm

    scaling = recipe.removeprefix("fp8_")
    operands = fp8_scaled_mm_operands(a, b, "e4m3", "e4m3", scaling)
    gemm = partial(_fp8_mm, *operands, torch.bfloat16, scaled, scaling)
    return {f"{recipe}_gemm": partial(gemm, False), f"{recipe}_gemm_fast_accum": partial(gemm, True)}


def _fp8_both_copies_in_torch(a: torch.Tensor, scaling: str):
    """What fp8_quantize_dual makes, from torch ops (quantize_fp8 along each axis, a transpose)."""
    from lowcomm.kernels import quantize_fp8

    q, s = quantize_fp8(a, "e4m3", scaling, axis=-1)
    d, t = quantize_fp8(a, "e4m3", scaling, axis=0)
    return q, s, d.t().contiguous(), t


def _fast_both_copies_in_torch(a: torch.Tensor):
    """What mx_fast_quantize_dual makes (1x128), as the per-GEMM path made it: the MX quantize
    along each axis, the regrouping in torch ops, a transpose."""
    from lowcomm.kernels.gemm import _mx_operands, regroup_mx_1x128

    da, sa, db, sb = _mx_operands(a, a, "e4m3", "e4m3", "rceil")
    q, s = regroup_mx_1x128(da, sa, axis=1)
    d, t = regroup_mx_1x128(db, sb, axis=0)
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
    for recipe in ("fp8_tensorwise", "fp8_rowwise", "fp8_delayed", "mxfp8", "mxfp8_fast"):
        layers[recipe] = LowPrecisionLinear.from_linear(base, recipe=recipe)  # delayed: from its history
    for recipe in ("fp8_tensorwise", "fp8_rowwise"):  # fast accumulation in no GEMM, in all three
        for mode in ("none", "all"):  # (the default, above: fprop's)
            layers[f"{recipe}_accum_{mode}"] = LowPrecisionLinear.from_linear(
                base, recipe=recipe, fast_accum=mode
            )
    # exact MX on the Triton GEMMs that promote every 32 of K (auto takes dequant on sm_90)
    layers["mxfp8_triton"] = LowPrecisionLinear.from_linear(base, recipe="mxfp8", backend="triton")
    for name, layer in layers.items():
        _time_rate(row, name, 6 * T * K * N, partial(step, layer), bench)
    for name in layers:
        if f"{name}_tflops" in row and "bf16_tflops" in row:
            row[f"{name}_x_bf16"] = row[f"{name}_tflops"] / row["bf16_tflops"]
    row["paths"] = {
        name: _layer_path(layer.recipe, x, base.weight, layer.backend)
        for name, layer in layers.items()
        if name != "bf16"
    }
    return row


#: the host-time part's Linear: tokens, in-features, out-features (microseconds of GPU work)
HOST_SHAPE = (256, 512, 512)


def host_time(shape=HOST_SHAPE, device: str = "cuda", calls: int = 300) -> dict:
    """What each call costs the host where the GPU's share is microseconds: ``host_us``, the
    time to issue ``calls`` calls back to back (no sync between them) over ``calls``, and
    ``wall_us`` with the GPU finished too (the same: the host is the bottleneck). Rows: a launch
    of an empty Triton kernel (Triton's own launch path; and through ``triton.autotune``, its
    choice made: the autotuner's share), one torch operation, each quantize the
    fp8 layers launch (autotuned as in training), and one Linear forward + backward under bf16
    autocast as ``nn.Linear`` and in each recipe. In the eager d=1024 training of 2026-12-04 the
    GPU was busy 41% of the wall in fp8_rowwise, 49-52% in fp8_tensorwise and mxfp8_fast, 72% in
    mxfp8 (bf16: 76%), and the profile gave each low-precision layer's forward 0.67-1.12 ms of the
    host's time a call (0.41-0.70 ms in its own Python and launches): these rows say where."""
    from torch import nn

    from lowcomm.kernels import LowPrecisionLinear
    from lowcomm.kernels.triton_fp8 import fp8_quantize_dual
    from lowcomm.kernels.triton_quantize import mx_fast_quantize_dual, mx_quantize_dual

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def per_call(fn) -> dict:
        for _ in range(min(calls, 10)):  # compiled, autotuned
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        issued = time.perf_counter() - t0
        sync()
        return {"host_us": issued / calls * 1e6, "wall_us": (time.perf_counter() - t0) / calls * 1e6}

    T, K, N = shape
    one = torch.zeros(32, device=device)
    x = torch.randn(T, K, device=device, dtype=torch.bfloat16)
    empty = empty_launches(one)  # a launch, and the autotuner's share of one
    rows = {
        "triton_empty_kernel": empty["direct"],
        "triton_empty_kernel_autotuned": empty["autotuned"],
        "torch_add_": lambda: one.add_(1.0),
        "fp8_quantize_dual_rowwise": lambda: fp8_quantize_dual(x, "e4m3", "rowwise"),
        "fp8_quantize_dual_tensorwise": lambda: fp8_quantize_dual(x, "e4m3", "tensorwise"),
        "mx_quantize_dual": lambda: mx_quantize_dual(x, "e4m3"),
        "mx_fast_quantize_dual_1x128": lambda: mx_fast_quantize_dual(x, "e4m3", "1x128"),
    }
    out = {"shape": [T, K, N], "calls": calls}
    for name, fn in rows.items():
        try:
            out[name] = per_call(fn)
        except Exception as e:  # one failing spoils no other
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    base = nn.Linear(K, N, device=device)
    xg = torch.randn(T, K, device=device, requires_grad=True)
    layers = {"linear_bf16": base}
    for recipe in ("fp8_tensorwise", "fp8_rowwise", "fp8_delayed", "mxfp8", "mxfp8_fast"):
        layers[f"linear_{recipe}"] = LowPrecisionLinear.from_linear(base, recipe=recipe)

    def step(layer):
        with torch.autocast(device, dtype=torch.bfloat16):
            y = layer(xg)
        y.backward(torch.ones_like(y))

    for name, layer in layers.items():
        try:
            out[name] = per_call(partial(step, layer))
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    return out


#: values of the codec part's buffer: about one Streaming fragment of a replica at d=1024 (38M)
CODEC_NUMEL = 1 << 25


def codec_speed(numel: int = CODEC_NUMEL, device: str = "cuda", bench=cuda_bench) -> dict:
    """The e3m0 codec (Streaming DiLoCo's 4-bit payload) on ``numel`` fp32 values: encode and
    decode through the Triton kernels against the torch reference, ms and bytes read + written
    per second (fp32 in or out, half a byte a value and a byte a block of 128 the other way)."""
    from lowcomm.comm import codecs

    codec = codecs.get_codec("e3m0")
    x = torch.randn(numel, device=device) * 1e-3
    payload = codec.encode(x)
    moved = 4 * numel + payload.numel()
    row = {"numel": numel, "payload_bytes": payload.numel()}
    for path, devices in (("kernel", ("cuda", "cpu")), ("torch", ())):
        with mock.patch.object(codecs, "KERNEL_DEVICES", devices):
            for name, fn in (
                ("encode", partial(codec.encode, x)),
                ("decode", partial(codec.decode, payload, numel)),
            ):
                try:
                    ms = bench(fn)
                    row[f"{name}_{path}_ms"] = ms
                    row[f"{name}_{path}_TBps"] = moved / ms / 1e9
                except Exception as e:  # one path failing spoils no other
                    row[f"{name}_{path}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    for name in ("encode", "decode"):
        if f"{name}_kernel_ms" in row and f"{name}_torch_ms" in row:
            row[f"{name}_speedup"] = row[f"{name}_torch_ms"] / row[f"{name}_kernel_ms"]
    return row


def _layer_path(recipe: str, x: torch.Tensor, weight: torch.Tensor, backend: str = "auto") -> str:
    """Which path a layer in ``recipe`` takes here: what its figure measured."""
    from lowcomm.kernels.gemm import choose_backend
    from lowcomm.kernels.linear import _delayed_on_scaled_mm, _fused_backend, _fused_mx

    if recipe == "fp8_delayed":
        gemms = "_scaled_mm" if _delayed_on_scaled_mm(backend, x, weight) else "emulated GEMMs"
        return f"one pass per tensor, {gemms}"
    which = _fused_backend(recipe, backend, x, weight)
    if which:
        return f"each tensor quantized once, {'_scaled_mm' if which == 'scaled_mm' else 'Triton GEMMs'}"
    mx = _fused_mx(recipe, backend, x, weight)
    if mx:
        gemms = "bf16 GEMMs of the copies dequantized" if mx == "dequant" else "Triton MX GEMMs"
        return f"each tensor quantized once, {gemms}"
    return f"quantized per GEMM ({choose_backend(recipe, x.device, backend)})"


#: the training comparison's model (the FP8 issue's: d=1024, 12 layers, T=1024, 16 sequences a
#: step) and a smoke size for CPU
TRAIN_SIZES = {
    "issue": dict(model_dim=1024, layers=12, heads=16, seq_len=1024, batch_size=16),
    "smoke": dict(model_dim=32, layers=2, heads=2, seq_len=32, batch_size=4),
}
#: every recipe; exact MXFP8 runs on Hopper through bf16 GEMMs of its dequantized copies (the
#: dequant backend: on the Triton GEMMs one Linear ran 0.09x bf16, so it was left out before)
TRAIN_PRECISIONS = ("fp8_tensorwise", "fp8_rowwise", "fp8_delayed", "mxfp8", "mxfp8_fast")


def training(
    device="cuda",
    steps: int = 100,
    size: str = "issue",
    precisions=TRAIN_PRECISIONS,
    on_row=lambda out: None,
    compile: bool = False,
    profile_steps: int = 2,
) -> dict:
    """The reference model trained ``steps`` steps (one replica, the bundled corpus, bf16 autocast)
    with its Linear layers in bf16 and in each recipe (the head stays bf16): tokens per second
    after the first quarter of the run, final eval loss, and each recipe's ratios to bf16;
    ``compile``: the model under torch.compile in every run (eager by default); a recipe named
    ``R+inductor`` (fp8_tensorwise, fp8_rowwise, fp8_delayed) trains R with
    ``LOWCOMM_COMPILED_QUANTIZE=inductor`` for its run: its quantize in torch ops the compiler can
    fuse, not the Triton operator; ``R:MODE`` (an fp8 R) trains it with ``--fast-accum MODE``
    (``fp8_rowwise:all+inductor`` both).
    ``profile_steps`` steps of each run, before its timed part, run under the trainer's profiler:
    a step's wall time against its kernels' (a step much longer than its kernels is a GPU waiting
    for the host, which eager fp8 layers, a few Python calls and Triton launches each, can cause)
    and the top of the table of operators; compiled, also the slowest kernels Inductor generated
    with their sources (:func:`common.inductor_kernels`). ``on_row(out)`` gets the results so far
    after each run."""
    import tempfile

    from common import inductor_kernels, profile_top, profile_window, steady_tokens_per_second

    import lowcomm.kernels.linear as linear
    from lowcomm.kernels.triton_quantize import tuned_configs
    from lowcomm.runtime import TrainConfig, read_jsonl, train

    out = {"steps": steps, **TRAIN_SIZES[size], "dtype": "bf16", "replicas": 1, "compile": compile}
    log_every = max(steps // 8, 1)
    window = profile_window(steps, profile_steps)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("fp32", *precisions):
            precision, mode, quantize = _split_recipe(name)
            name = "bf16" if name == "fp32" else name  # fp32 Linear layers under bf16 autocast
            cfg = TrainConfig.from_flat(
                **TRAIN_SIZES[size], steps=steps, replicas=1, device=device, precision=precision,
                **({"fast_accum": mode} if mode else {}),
                dtype="bf16", warmup=min(10, steps // 4), eval_every=0, eval_batches=4,
                log_every=log_every, run_dir=f"{tmp}/{name}", compile=compile,
                profile=f"{window[0]}:{window[1]}" if window else "",
            )  # fmt: skip
            if compile:  # each run compiles afresh: the runs before it count toward no recompile limit
                torch._dynamo.reset()
            t0 = time.perf_counter()
            tuned_before = tuned_configs()
            kept, linear.COMPILED_QUANTIZE = linear.COMPILED_QUANTIZE, quantize or linear.COMPILED_QUANTIZE
            try:
                res = train(cfg, progress=False)
            except Exception as e:  # one recipe failing spoils no other
                out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                on_row(out)
                continue
            finally:
                linear.COMPILED_QUANTIZE = kept
            out[name] = {
                "tokens_per_second": steady_tokens_per_second(cfg.run.run_dir, res, log_every),
                "final_eval_loss": res["final_eval_loss"],
                "wall_s": time.perf_counter() - t0,
                # the tiles the quantize autotuners took at this model's shapes (new in this run)
                "autotuned": _new_choices(tuned_before, tuned_configs()),
            }
            events = [e for e in read_jsonl(f"{tmp}/{name}/events.jsonl") if e["kind"] == "profile"]
            for event in events[:1]:  # none when the run ended before the window
                out[name]["profile"] = {
                    "wall_ms_per_step": event["wall_ms_per_step"],
                    "busy_ms_per_step": event["busy_ms_per_step"],
                    "top": profile_top(Path(event["table"]).with_suffix(""), rows=12),
                }
            print(f"training {name}: {out[name]}", flush=True)
            for event in events[:1] if compile else []:  # the slowest generated kernels, whole
                found = inductor_kernels(Path(event["trace"]))  # (the table cuts their names)
                out[name]["profile"]["inductor_kernels"] = found
                print(f"training {name}: slowest generated kernels {[k['name'] for k in found]}", flush=True)
            on_row(out)
    base = out["bf16"]
    for name in precisions:
        row = out[name]
        if "error" not in row and "error" not in base:
            row["tokens_per_second_x_bf16"] = row["tokens_per_second"] / base["tokens_per_second"]
            row["loss_ratio_vs_bf16"] = row["final_eval_loss"] / base["final_eval_loss"]
    return out


def _new_choices(before: dict, after: dict) -> dict:
    """The autotuners' choices in ``after`` (:func:`~lowcomm.kernels.triton_quantize.tuned_configs`)
    that ``before`` lacks, by kernel; kernels with none left out."""
    new = {k: [c for c in v if c not in before.get(k, [])] for k, v in after.items()}
    return {k: v for k, v in new.items() if v}


def _split_recipe(name: str) -> tuple[str, str | None, str]:
    """A training comparison's recipe name ``R[:MODE][+inductor]``: (R, MODE or None, "inductor"
    or "")."""
    head, _, quantize = name.partition("+")
    precision, _, mode = head.partition(":")
    return precision, mode or None, quantize


def _recipes(names: str, compile: bool = False, flag: str = "--train-precisions") -> tuple[str, ...]:
    """``--train-precisions`` (or ``flag``): each a layer recipe; an fp8 one (tensorwise, rowwise,
    delayed) may add ``:MODE`` (its fast accumulation) and, under ``--train-compile``,
    ``+inductor``; else a one-line error naming it."""
    from lowcomm.kernels.linear import COMPILED_QUANTIZE_RECIPES, FAST_ACCUM_MODES, LAYER_RECIPES

    modes = "|".join(FAST_ACCUM_MODES)
    allowed = f"{list(LAYER_RECIPES)}; {list(COMPILED_QUANTIZE_RECIPES)} also with :{modes} and +inductor"
    out = tuple(n for n in names.split(",") if n)
    for n in out:
        precision, mode, quantize = _split_recipe(n)
        fp8 = precision in COMPILED_QUANTIZE_RECIPES
        if (
            precision not in LAYER_RECIPES
            or (mode is not None and not (fp8 and mode in FAST_ACCUM_MODES))
            or quantize not in ("", "inductor")
            or (quantize and not fp8)
        ):
            raise SystemExit(f"kernels.py: {flag}: unknown recipe {n!r}; allowed: {allowed}")
        if quantize and not compile:
            raise SystemExit(f"kernels.py: {flag}: {n!r} is a compiled route: add --train-compile")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--static", action="store_true", help="compile for sm_90a / sm_100a, run nothing")
    ap.add_argument("--train-steps", type=int, default=300, help="GPU training comparison (0: skip)")
    ap.add_argument("--train-size", choices=sorted(TRAIN_SIZES), default="issue", help="its model")
    ap.add_argument(
        "--train-precisions",
        default=",".join(TRAIN_PRECISIONS),
        help="comma list of the recipes trained against bf16 (default: every fast one; an fp8 one may "
        "add :none, :fprop or :all, its fast accumulation, e.g. fp8_rowwise:all; under --train-compile "
        "also +inductor, e.g. fp8_rowwise+inductor: the quantize in torch ops)",
    )
    ap.add_argument("--train-compile", action="store_true", help="train under torch.compile (default: eager)")
    ap.add_argument(
        "--train-compiled-too",
        default="",
        metavar="RECIPES",
        help="after the training comparison, a second one under torch.compile of these recipes (e.g. "
        "fp8_rowwise+inductor) against compiled bf16, saved as training_compiled (default: none)",
    )
    ap.add_argument(
        "--train-profile-steps",
        type=int,
        default=2,
        help="steps of each training run profiled before its timed part: wall vs kernel time (0: none)",
    )
    args = ap.parse_args()
    precisions = _recipes(args.train_precisions, args.train_compile)
    compiled_too = _recipes(args.train_compiled_too, compile=True, flag="--train-compiled-too")
    cuda = torch.cuda.is_available()
    if args.static:
        import triton

        from lowcomm.kernels.triton_static import report

        out = {
            **stamp("kernels_static"),
            "machine": f"{platform.machine()} CPU (compiled ahead of time; nothing run)",
            "triton": triton.__version__,
            "kernels": report(),
        }
        write_result(out, args.json)
        return
    out = stamp("kernels")
    none = "not measured: no GPU on this machine"
    not_run = "not run: no GPU on this machine (CI trains each recipe emulated on CPU: tests/test_kernels.py)"

    def save(part: str | None = None, value=None) -> None:  # a time-out keeps what was saved
        if part is not None:
            out[part] = value
        write_result(out, args.json, echo=False)

    def train_part(part: str, recipes: tuple[str, ...], compile: bool):  # a training comparison
        if not (cuda and args.train_steps):
            return lambda: not_run
        return lambda: training(
            "cuda",
            args.train_steps,
            args.train_size,
            precisions=recipes,
            on_row=partial(save, part),
            compile=compile,
            profile_steps=args.train_profile_steps,
        )

    parts = {
        "numerics": lambda: numerics("cuda" if cuda else "cpu"),
        "host": host_time if cuda else lambda: none,
        "codec": codec_speed if cuda else lambda: none,
        "speed": speed if cuda else lambda: none,
        "linear": linear_speed if cuda else lambda: none,
        "training": train_part("training", precisions, args.train_compile),
    }
    if compiled_too:  # last: the compilations take the longest, and a time-out keeps the rest
        parts["training_compiled"] = train_part("training_compiled", compiled_too, True)
    for name, part in parts.items():  # saved after each part (training: after each run)
        t0 = time.perf_counter()
        save(name, part())
        print(f"{name} done in {time.perf_counter() - t0:.1f} s", flush=True)
    write_result(out, None)


if __name__ == "__main__":
    main()
