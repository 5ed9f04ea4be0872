"""Fused MXFP8 quantization in Triton: one read of a tensor, both blocked copies written.

A training step needs each operand blocked along two axes (fprop along in-features, dgrad along
out-features, wgrad along tokens). :func:`mx_quantize_dual` reads a (R, C) tensor once, a tile of
32 x 128 per program on CUDA, and writes

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
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # one (BLOCK_R, BLOCK_C) tile, both multiples of 32: BLOCK_C/32 row scales per row and
        # BLOCK_R/32 column scales per column; R and C are multiples of 32, so a tile past the edge
        # is masked in whole 32-blocks
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        inside = (rows < R)[:, None] & (cols < C)[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)  # one read
        bad = (x != x) | (tl.abs(x) == float("inf"))
        ax = tl.where(bad, 0.0, tl.abs(x))
        badi = bad.to(tl.int32)
        NB_C: tl.constexpr = BLOCK_C // 32
        NB_R: tl.constexpr = BLOCK_R // 32
        # row-blocked: 32 consecutive elements of a row share a scale
        amax_r = tl.max(tl.reshape(ax, (BLOCK_R, NB_C, 32)), axis=2)  # (BLOCK_R, NB_C)
        bad_r = tl.max(tl.reshape(badi, (BLOCK_R, NB_C, 32)), axis=2) > 0
        k_r = _scale_exponent(amax_r, EMAX, MANT_LIMIT, RCEIL)
        y_r = tl.reshape(tl.reshape(x, (BLOCK_R, NB_C, 32)) * _pow2_neg(k_r)[:, :, None], (BLOCK_R, BLOCK_C))
        nan_r = tl.reshape(tl.broadcast_to(bad_r[:, :, None], (BLOCK_R, NB_C, 32)), (BLOCK_R, BLOCK_C))
        # column-blocked: 32 consecutive elements of a column share a scale
        amax_c = tl.max(tl.reshape(ax, (NB_R, 32, BLOCK_C)), axis=1)  # (NB_R, BLOCK_C)
        bad_c = tl.max(tl.reshape(badi, (NB_R, 32, BLOCK_C)), axis=1) > 0
        k_c = _scale_exponent(amax_c, EMAX, MANT_LIMIT, RCEIL)
        y_c = tl.reshape(tl.reshape(x, (NB_R, 32, BLOCK_C)) * _pow2_neg(k_c)[:, None, :], (BLOCK_R, BLOCK_C))
        nan_c = tl.reshape(tl.broadcast_to(bad_c[:, None, :], (NB_R, 32, BLOCK_C)), (BLOCK_R, BLOCK_C))
        if not RCEIL:  # OCP floor rule: saturate
            y_r = tl.minimum(tl.maximum(y_r, -MAXV), MAXV)
            y_c = tl.minimum(tl.maximum(y_c, -MAXV), MAXV)
        y_r = _round_to_fp8_grid(y_r, MBITS, MIN_NORMAL, SUB_C)
        y_c = _round_to_fp8_grid(y_c, MBITS, MIN_NORMAL, SUB_C)
        if E5M2:
            q_r = y_r.to(tl.float8e5, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
            q_c = y_c.to(tl.float8e5, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
        else:
            q_r = y_r.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
            q_c = y_c.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
        # NaN blocks: write the NaN byte torch writes (fp8 NaN conversion differs across backends)
        q_r = tl.where(nan_r, NAN_BYTE, q_r).to(tl.uint8)
        q_c = tl.where(nan_c, NAN_BYTE, q_c).to(tl.uint8)
        tl.store(row_q_ptr + offs, q_r, mask=inside)
        tl.store(col_q_ptr + offs, q_c, mask=inside)
        s_r = tl.where(bad_r, 255, k_r + 127).to(tl.uint8)
        s_c = tl.where(bad_c, 255, k_c + 127).to(tl.uint8)
        sr_cols = pid_c * NB_C + tl.arange(0, NB_C)
        sc_rows = pid_r * NB_R + tl.arange(0, NB_R)
        tl.store(
            row_s_ptr + rows.to(tl.int64)[:, None] * (C // 32) + sr_cols[None, :],
            s_r,
            mask=(rows < R)[:, None] & (sr_cols < C // 32)[None, :],
        )
        tl.store(
            col_s_ptr + sc_rows.to(tl.int64)[:, None] * C + cols[None, :],
            s_c,
            mask=(sc_rows < R // 32)[:, None] & (cols < C)[None, :],
        )


# Tiles per program. CUDA: 32 x 128 with 8 warps, chosen by compiling for sm_90a on CPU: 16
# elements and 96 registers per thread, no spills (64 x 128 with 4 warps took 255 registers, which
# would leave 8 warps per SM for a bandwidth-bound kernel); rows of 128 keep loads and the row-scale
# stores contiguous. Its bandwidth is not measured yet. The interpreter runs 32 x 32 tiles (tests
# also run the CUDA tiles there).
QUANTIZE_CUDA_CONFIG = {"BLOCK_R": 32, "BLOCK_C": 128, "num_warps": 8}
QUANTIZE_INTERPRET_CONFIG = {"BLOCK_R": 32, "BLOCK_C": 32, "num_warps": 4}


def static_specs() -> list:
    """The dual quantize kernel as launched on CUDA, for :mod:`lowcomm.kernels.triton_static`."""
    from .triton_static import KernelSpec

    specs = []
    for src in ("bf16", "fp32"):
        for elem, rule in (("e4m3", "rceil"), ("e5m2", "floor")):
            maxv, emax, mant, mbits, min_normal, sub_c = _EMAX[elem]
            consts = dict(
                MAXV=maxv,
                EMAX=emax,
                MANT_LIMIT=mant,
                RCEIL=rule == "rceil",
                E5M2=elem == "e5m2",
                MBITS=mbits,
                MIN_NORMAL=min_normal,
                SUB_C=sub_c,
                NAN_BYTE=0x7F,
                BLOCK_R=QUANTIZE_CUDA_CONFIG["BLOCK_R"],
                BLOCK_C=QUANTIZE_CUDA_CONFIG["BLOCK_C"],
            )
            sig = {"x_ptr": f"*{src}", "row_q_ptr": "*u8", "row_s_ptr": "*u8", "col_q_ptr": "*u8"}
            sig.update({"col_s_ptr": "*u8", "R": "i32", "C": "i32"})
            sig.update({k: "constexpr" for k in consts})
            specs.append(
                KernelSpec(
                    name=f"mx_quantize_dual ({src} -> {elem}, {rule})",
                    fn=_mx_dual_kernel,
                    signature=sig,
                    constexprs=consts,
                    num_warps=QUANTIZE_CUDA_CONFIG["num_warps"],
                    num_stages=1,
                    aligned=("R", "C"),
                )
            )
    return specs


def mx_quantize_dual(
    x: torch.Tensor, elem: str = "e4m3", scale_rule: str = "rceil", *, config: dict | None = None
):
    """Both MX copies of a 2-D tensor in one pass.

    Args:
        x: (R, C) fp32 / bf16 / fp16, contiguous, R and C multiples of 32; CUDA, or CPU under
            ``TRITON_INTERPRET=1``.
        elem: "e4m3" or "e5m2".
        scale_rule: "rceil" or "floor".
        config: tile overrides (``BLOCK_R``, ``BLOCK_C``: multiples of 32; ``num_warps``).

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
    cfg = dict(QUANTIZE_CUDA_CONFIG if x.device.type == "cuda" else QUANTIZE_INTERPRET_CONFIG)
    unknown = set(config or {}) - set(cfg)
    if unknown:
        raise ValueError(f"mx_quantize_dual: unknown config keys {sorted(unknown)}; allowed: {sorted(cfg)}")
    cfg.update(config or {})
    if cfg["BLOCK_R"] % 32 or cfg["BLOCK_C"] % 32:
        raise ValueError(f"mx_quantize_dual: tiles must be multiples of 32, got {cfg}")
    if R == 0 or C == 0:
        return row_q.view(dtype), row_s, col_q.view(dtype), col_s
    grid = (-(-R // cfg["BLOCK_R"]), -(-C // cfg["BLOCK_C"]))
    _mx_dual_kernel[grid](
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
        **cfg,
    )
    return row_q.view(dtype), row_s, col_q.view(dtype), col_s
