"""Fused MXFP8 quantization in Triton: one read of a tensor, both blocked copies written.

A training step needs each operand blocked along two axes (fprop along in-features, dgrad along
out-features, wgrad along tokens). :func:`mx_quantize_dual` reads a (R, C) tensor once per 32 x 32
tile and writes

    row-blocked:    data (R, C) E4M3, scales (R, C/32)  - 32 consecutive elements of a row share a scale
    column-blocked: data (R, C) E4M3, scales (R/32, C)  - 32 consecutive elements of a column

bit for bit as :func:`lowcomm.kernels.quantize_mx` with ``axis=-1`` and ``axis=0``. Scales are
computed from the bits of the block's absolute maximum (no division, no transcendental), so the
result does not depend on the GPU's approximate division or exp2.

Runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised where triton is not installed
    HAVE_TRITON = False

__all__ = ["HAVE_TRITON", "mx_quantize_dual"]

# max, emax, mantissa limit of max/2^emax (both 1.75 -> 0.75·2^23), mantissa bits, min normal,
# the subnormal rounding constant 1.5·2^23·(subnormal spacing)
_EMAX = {
    "e4m3": (448.0, 8, 0x600000, 3, 2.0**-6, 1.5 * 2.0**14),
    "e5m2": (57344.0, 15, 0x600000, 2, 2.0**-14, 1.5 * 2.0**7),
}

if HAVE_TRITON:

    @triton.jit
    def _scale_exponent(amax, EMAX: tl.constexpr, MANT_LIMIT: tl.constexpr, RCEIL: tl.constexpr):
        # amax = f·2^E with f in [1, 2): rceil k = E − emax + (f > max/2^emax); floor k = E − emax.
        bits = amax.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) - 127
        k = e - EMAX
        if RCEIL:
            k = k + ((bits & 0x7FFFFF) > MANT_LIMIT).to(tl.int32)
        k = tl.where(amax > 0, k, -127)
        return tl.minimum(tl.maximum(k, -127), 127)

    @triton.jit
    def _pow2_neg(k):
        # 2^−k as fp32 from its bits; k is in [−127, 120] for any finite fp32 amax, so 127 − k is a
        # normal exponent field.
        return ((127 - k) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _round_to_fp8_grid(y, MBITS: tl.constexpr, MIN_NORMAL: tl.constexpr, SUB_C: tl.constexpr):
        # Round fp32 to the fp8 grid (round half to even) in fp32 arithmetic, so that the final
        # cast is exact whatever rounding the backend's fp8 conversion does (Triton's interpreter
        # mis-rounds when the carry reaches the exponent). Normals: drop 23 − MBITS mantissa bits
        # with round-half-even on the bits. Subnormals (fixed spacing q): (y + 1.5·2^23·q) − ...,
        # an exact IEEE add that rounds to a multiple of q, ties to even.
        DROP: tl.constexpr = 23 - MBITS
        bits = y.to(tl.int32, bitcast=True)
        lsb = (bits >> DROP) & 1
        normal = ((bits + ((1 << (DROP - 1)) - 1) + lsb) & ~((1 << DROP) - 1)).to(tl.float32, bitcast=True)
        sub = (y + SUB_C) - SUB_C
        sub = tl.where(sub == 0, y * 0.0, sub)  # keep the sign of values that round to zero
        return tl.where(tl.abs(y) < MIN_NORMAL, sub, normal)

    @triton.jit
    def _mx_dual_kernel(
        x_ptr,
        row_q_ptr,
        row_s_ptr,
        col_q_ptr,
        col_s_ptr,
        R,
        C,
        MAXV: tl.constexpr,
        EMAX: tl.constexpr,
        MANT_LIMIT: tl.constexpr,
        RCEIL: tl.constexpr,
        E5M2: tl.constexpr,
        MBITS: tl.constexpr,
        MIN_NORMAL: tl.constexpr,
        SUB_C: tl.constexpr,
        NAN_BYTE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        rows = pid_r * BLOCK + tl.arange(0, BLOCK)
        cols = pid_c * BLOCK + tl.arange(0, BLOCK)
        offs = rows[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs).to(tl.float32)  # (BLOCK, BLOCK), one read
        bad = (x != x) | (tl.abs(x) == float("inf"))
        ax = tl.where(bad, 0.0, tl.abs(x))
        # row-blocked: one scale per row of the tile
        amax_r = tl.max(ax, axis=1)
        bad_r = tl.max(bad.to(tl.int32), axis=1) > 0
        k_r = _scale_exponent(amax_r, EMAX, MANT_LIMIT, RCEIL)
        y_r = x * _pow2_neg(k_r)[:, None]
        # column-blocked: one scale per column of the tile
        amax_c = tl.max(ax, axis=0)
        bad_c = tl.max(bad.to(tl.int32), axis=0) > 0
        k_c = _scale_exponent(amax_c, EMAX, MANT_LIMIT, RCEIL)
        y_c = x * _pow2_neg(k_c)[None, :]
        if not RCEIL:  # OCP floor rule: saturate
            y_r = tl.minimum(tl.maximum(y_r, -MAXV), MAXV)
            y_c = tl.minimum(tl.maximum(y_c, -MAXV), MAXV)
        y_r = _round_to_fp8_grid(y_r, MBITS, MIN_NORMAL, SUB_C)
        y_c = _round_to_fp8_grid(y_c, MBITS, MIN_NORMAL, SUB_C)
        nan = float("nan")
        y_r = tl.where(bad_r[:, None], nan, y_r)
        y_c = tl.where(bad_c[None, :], nan, y_c)
        if E5M2:
            q_r = y_r.to(tl.float8e5, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
            q_c = y_c.to(tl.float8e5, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
        else:
            q_r = y_r.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
            q_c = y_c.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
        # NaN blocks: write the NaN byte torch writes (fp8 NaN conversion differs across backends)
        q_r = tl.where(bad_r[:, None], NAN_BYTE, q_r).to(tl.uint8)
        q_c = tl.where(bad_c[None, :], NAN_BYTE, q_c).to(tl.uint8)
        tl.store(row_q_ptr + offs, q_r)
        tl.store(col_q_ptr + offs, q_c)
        s_r = tl.where(bad_r, 255, k_r + 127).to(tl.uint8)
        s_c = tl.where(bad_c, 255, k_c + 127).to(tl.uint8)
        tl.store(row_s_ptr + rows * (C // BLOCK) + pid_c, s_r)
        tl.store(col_s_ptr + pid_r * C + cols, s_c)


def mx_quantize_dual(x: torch.Tensor, elem: str = "e4m3", scale_rule: str = "rceil"):
    """Both MX copies of a 2-D tensor in one pass.

    Args:
        x: (R, C) fp32 / bf16 / fp16, contiguous, R and C multiples of 32; CUDA, or CPU under
            ``TRITON_INTERPRET=1``.
        elem: "e4m3" or "e5m2".
        scale_rule: "rceil" or "floor".

    Returns:
        ``(row_data, row_scales, col_data, col_scales)`` as ``quantize_mx(x, axis=-1)`` and
        ``quantize_mx(x, axis=0)`` return them.

    Raises:
        RuntimeError: triton is not installed. ValueError: shape, dtype, elem or rule not supported.
    """
    if not HAVE_TRITON:
        raise RuntimeError(
            "mx_quantize_dual needs triton (pip install triton); use lowcomm.kernels.quantize_mx"
        )
    if elem not in _EMAX:
        raise ValueError(f"elem must be 'e4m3' or 'e5m2', got {elem!r}")
    if scale_rule not in ("rceil", "floor"):
        raise ValueError(f"scale_rule must be 'rceil' or 'floor', got {scale_rule!r}")
    if x.dim() != 2 or x.shape[0] % 32 or x.shape[1] % 32:
        raise ValueError(
            f"mx_quantize_dual needs a 2-D tensor with both sides multiples of 32, got {tuple(x.shape)}"
        )
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"mx_quantize_dual takes fp32, bf16 or fp16, got {x.dtype}")
    x = x.contiguous()
    R, C = x.shape
    dtype = torch.float8_e4m3fn if elem == "e4m3" else torch.float8_e5m2
    maxv, emax, mant, mbits, min_normal, sub_c = _EMAX[elem]
    row_q = torch.empty(R, C, dtype=torch.uint8, device=x.device)
    col_q = torch.empty_like(row_q)
    row_s = torch.empty(R, C // 32, dtype=torch.uint8, device=x.device)
    col_s = torch.empty(R // 32, C, dtype=torch.uint8, device=x.device)
    _mx_dual_kernel[(R // 32, C // 32)](
        x,
        row_q,
        row_s,
        col_q,
        col_s,
        R,
        C,
        MAXV=maxv,
        EMAX=emax,
        MANT_LIMIT=mant,
        MBITS=mbits,
        MIN_NORMAL=min_normal,
        SUB_C=sub_c,
        NAN_BYTE=int(torch.tensor(float("nan")).to(dtype).view(torch.uint8)),
        RCEIL=scale_rule == "rceil",
        E5M2=elem == "e5m2",
        BLOCK=32,
    )
    return row_q.view(dtype), row_s, col_q.view(dtype), col_s
