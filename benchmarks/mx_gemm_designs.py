"""Designs tried for the exact-MX Hopper GEMM, and what the compiler made of each.

    python benchmarks/mx_gemm_designs.py --json benchmarks/results/mx_gemm_designs.json

Exact MX on sm_90 must promote every 32 of K: multiply the fp8 MMA's partial product by the two
operands' block scales and add it to an fp32 accumulator. docs/references.md (FP8 on Hopper) reports
the plain Triton loop at 0.21-0.29x cuBLAS bf16 and names the cure: keep the tensor cores busy while
the CUDA cores promote. Whether a design can do that shows in its PTX before any GPU runs it: a
``wgmma.wait_group 0`` after every MMA means the warpgroup waits for each MMA before it promotes, so
nothing hides behind it; ``wait_group 1`` would leave one MMA in flight.

Designs (all exact, all equal to the emulated path up to fp32 order; checked here under the
interpreter when there is no GPU):

- ``plain``: the library kernel (lowcomm.kernels.triton_mx_gemm): load, MMA, promote.
- ``promote_behind``: software-pipelined in the source: block k+1's MMA is issued before block
  k's partial product is promoted, so a compiler that keeps wgmma asynchronous could overlap them.
- ``warp_specialized``: the plain loop as ``tl.range(..., warp_specialize=True)``, Triton's
  automatic producer/consumer split.

On CUDA each is also timed against cuBLAS bf16 (triton.testing.do_bench) at the issue's shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from functools import partial

import torch
import triton
import triton.language as tl
import triton.testing
from common import stamp, write_result

from lowcomm.kernels import dequantize_mx, quantize_mx
from lowcomm.kernels.triton_mx_gemm import (
    _block_scales,
    _store_tile,
    _tile_pointers,
    gemm_config,
    mx_matmul,
    static_specs,
)
from lowcomm.kernels.triton_static import compile_report

SHAPES = [(8192, 8192, 8192), (16384, 4096, 14336), (16384, 14336, 4096), (4096, 4096, 4096)]


@triton.jit
def _design_kernel(
    a_ptr,
    sa_ptr,
    b_ptr,
    sb_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_sam,
    stride_sak,
    stride_sbk,
    stride_sbn,
    stride_cm,
    stride_cn,
    SB: tl.constexpr,
    E8M0: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
    BEHIND: tl.constexpr,
    WS: tl.constexpr,
):
    # the library kernel's tile order, addressing, scales and store; E8M0 scales only (exact MX)
    rm, rn, a_ptrs, b_ptrs, sa_ptrs, sb_ptrs = _tile_pointers(
        a_ptr, sa_ptr, b_ptr, sb_ptr, M, N, stride_am, stride_ak, stride_bk, stride_bn,
        stride_sam, stride_sbn, SB, BLOCK_M, BLOCK_N, GROUP_M,
    )  # fmt: skip
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if BEHIND:
        prev = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), out_dtype=tl.float32)
        fa, fb = _block_scales(sa_ptrs, sb_ptrs, 0, stride_sak, stride_sbk, True)
        for kb in range(1, K // SB):
            a_ptrs += SB * stride_ak
            b_ptrs += SB * stride_bk
            part = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), out_dtype=tl.float32)  # next MMA first
            acc += prev * fa[:, None] * fb[None, :]  # then promote the previous block
            fa, fb = _block_scales(sa_ptrs, sb_ptrs, kb, stride_sak, stride_sbk, True)
            prev = part
        acc += prev * fa[:, None] * fb[None, :]
    else:
        for kb in tl.range(0, K // SB, warp_specialize=WS):
            part = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), out_dtype=tl.float32)
            fa, fb = _block_scales(sa_ptrs, sb_ptrs, kb, stride_sak, stride_sbk, True)
            acc += part * fa[:, None] * fb[None, :]
            a_ptrs += SB * stride_ak
            b_ptrs += SB * stride_bk
    _store_tile(c_ptr, acc, rm, rn, M, N, stride_cm, stride_cn)


DESIGNS = {"promote_behind": {"BEHIND": True, "WS": False}, "warp_specialized": {"BEHIND": False, "WS": True}}


def design_matmul(name: str, a_data, a_scales, b_data, b_scales) -> torch.Tensor:
    """Exact-MX ``dequant(A) @ dequant(B)`` by design ``name`` ("plain" is the library kernel)."""
    if name == "plain":
        return mx_matmul(a_data, a_scales, b_data, b_scales)
    M, K = a_data.shape
    N = b_data.shape[1]
    cfg = gemm_config(32, a_data.device)
    c = torch.empty(M, N, dtype=torch.float32, device=a_data.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _design_kernel[grid](
        a_data, a_scales, b_data, b_scales, c, M, N, K,
        *a_data.stride(), *b_data.stride(), *a_scales.stride(), *b_scales.stride(), *c.stride(),
        SB=32, E8M0=True, **DESIGNS[name], **cfg,
    )  # fmt: skip
    return c


def static(arch: int = 90) -> list[dict]:
    """Each design compiled for ``arch`` at the library's configuration and operand layouts."""
    rows = []
    for spec in static_specs():
        if not spec.name.startswith("mx_matmul"):
            continue
        row = compile_report(spec, arch)
        rows.append({"design": "plain", **row})
        for name, flags in DESIGNS.items():
            sig = {**spec.signature, "BEHIND": "constexpr", "WS": "constexpr"}
            variant = dataclasses.replace(
                spec, fn=_design_kernel, signature=sig, constexprs={**spec.constexprs, **flags}
            )
            rows.append({"design": name, **compile_report(variant, arch)})
    return rows


def check(device: str) -> dict:
    """Every design against the emulated path (relative max error), at a small ragged shape."""
    torch.manual_seed(0)
    a = torch.randn(200, 256, device=device) * torch.logspace(-3, 3, 256, device=device)
    b = torch.randn(256, 136, device=device)
    da, sa = quantize_mx(a, axis=1)
    db, sb = quantize_mx(b, axis=0)
    ref = dequantize_mx(da, sa, axis=1) @ dequantize_mx(db, sb, axis=0)
    out = {}
    for name in ("plain", *DESIGNS):
        got = design_matmul(name, da, sa, db, sb)
        out[name] = float((got - ref).abs().max() / ref.abs().max())
    return out


def speed() -> list[dict]:
    rows = []
    for M, K, N in SHAPES:
        a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
        da, sa = quantize_mx(a, axis=1)
        db, sb = quantize_mx(b, axis=0)
        flops = 2 * M * N * K
        bf16 = flops / triton.testing.do_bench(partial(torch.mm, a, b)) / 1e9
        row = {"shape": [M, K, N], "bf16_tflops": bf16}
        for name in ("plain", *DESIGNS):
            try:
                ms = triton.testing.do_bench(partial(design_matmul, name, da, sa, db, sb))
                row[f"{name}_x_bf16"] = flops / ms / 1e9 / row["bf16_tflops"]
            except Exception as e:  # a design that does not compile or run is a result too
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    out = {
        **stamp("mx_gemm_designs"),
        "triton": triton.__version__,
        "static_sm_90": static(90),
        "max_rel_err_vs_emulated": check("cuda") if cuda else "run under TRITON_INTERPRET=1 (tests)",
        "speed": speed() if cuda else "not measured: no GPU on this machine",
    }
    write_result(out, args.json)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compiles kernels: run without TRITON_INTERPRET=1")
    main()
