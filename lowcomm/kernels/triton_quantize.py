"""Fused MXFP8 quantization in Triton: one read of a tensor, both blocked copies written.

A training step needs each operand blocked along two axes (fprop along in-features, dgrad along
out-features, wgrad along tokens). :func:`mx_quantize_dual` reads a (R, C) tensor once, a tile per
program (on CUDA the fastest of QUANTIZE_CUDA_CONFIGS, timed once per shape), and writes

    row-blocked:    data (R, C) E4M3, scales (R, C/32)  - 32 consecutive elements of a row share a scale
    column-blocked: data (R, C) E4M3, scales (R/32, C)  - 32 consecutive elements of a column

bit for bit as :func:`lowcomm.kernels.quantize_mx` with ``axis=-1`` and ``axis=0``;
:func:`mx_quantize` writes one of them (the same kernel, the other copy compiled out). Scales are
computed from the bits of the block's absolute maximum (no division, no transcendental), so the
result does not depend on the GPU's approximate division or exp2; that maximum is one integer
reduction of the bits of |x|, which also flags a non-finite block (its exponent bits are all ones).
On a GPU the fp8 conversion rounds half to even (:func:`hw_cvt`); the interpreter rounds in fp32
arithmetic first, since its conversion does not.

Runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it).
"""

from __future__ import annotations

import contextlib
import os

import torch

from .._compat import major_minor
from .formats import ELEM_FORMATS, TRITON_READS

#: the oldest Triton these kernels are known to run on: 3.2 interprets every kernel test and
#: compiles every kernel for sm_90a; 3.0 (torch 2.4's) cannot interpret them
TRITON_MIN = (3, 2)

try:
    import triton
    import triton.language as tl

    #: the installed triton's (major, minor)
    TRITON_VERSION = major_minor(triton.__version__)
    HAVE_TRITON = TRITON_VERSION >= TRITON_MIN
    if HAVE_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
        from .._compat import mend_triton_interpreter

        mend_triton_interpreter()  # (triton < 3.7 under numpy >= 2.4)
    #: why the Triton kernels are off (None: they are on)
    TRITON_MISSING = (
        None
        if HAVE_TRITON
        else f"triton {triton.__version__} is older than 3.2, the oldest these kernels run on: "
        "pip install 'triton>=3.2'"
    )
except ImportError:  # pragma: no cover - exercised where triton is not installed
    TRITON_VERSION = None
    HAVE_TRITON = False
    TRITON_MISSING = "triton is not installed: pip install triton"

__all__ = [
    "HAVE_TRITON",
    "TRITON_MISSING",
    "mx_quantize_dual",
    "mx_quantize",
    "mx_dequantize",
    "mx_fast_quantize_dual",
]

# max, emax, mantissa limit of max/2^emax (both 1.75 -> 0.75·2^23), mantissa bits, min normal,
# the subnormal rounding constant 1.5·2^23·(subnormal spacing)
_EMAX = {
    "e4m3": (448.0, 8, 0x600000, 3, 2.0**-6, 1.5 * 2.0**14),
    "e5m2": (57344.0, 15, 0x600000, 2, 2.0**-14, 1.5 * 2.0**7),
}

#: the Triton kernels run as torch.library operators (torch.compile keeps them whole; torch >= 2.4)
AS_OPS = HAVE_TRITON and hasattr(torch.library, "custom_op")


def as_op() -> bool:
    """Whether a kernel's wrapper calls its torch.library operator: while torch.compile traces it
    (the operator keeps the launch whole in the graph). An eager call goes straight to the launch,
    the operator's own body: the operator's Python dispatch cost about 40 us a call on the
    project's CPU (130 us a layer's forward and backward in fp8_tensorwise, 350 us in
    fp8_delayed, whose operator updates the maxima in place), host time that an eager step at
    small sizes spends on every layer (benchmarks/host_overhead.py, ``layers``)."""
    return AS_OPS and torch.compiler.is_compiling()


def on_device(t: torch.Tensor):
    """Makes ``t``'s GPU the current one around a Triton launch: Triton launches on the current
    device and stream whatever its arguments' device, so a tensor on cuda:1 launched from a thread
    whose current GPU is 0 would be read through pointers of another GPU. Nothing on CPU (the
    interpreter). Every launch in these modules runs inside one (a test checks)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


#: the byte torch writes for NaN (fp8 NaN conversion differs across backends)
NAN_BYTE = {e: int(torch.tensor(float("nan")).to(ELEM_FORMATS[e].dtype).view(torch.uint8)) for e in _EMAX}


def mx_format(elem: str, scale_rule: str, hw_cvt: bool = False) -> dict:
    """The element format's and scale rule's constants the MX kernels take, in their parameter
    order (MAXV .. NAN_BYTE, HW_CVT). ``hw_cvt``: the launch runs compiled for a GPU
    (:func:`hw_cvt`), whose fp8 conversion does the rounding."""
    maxv, emax, mant, mbits, min_normal, sub_c = _EMAX[elem]
    return dict(
        MAXV=maxv,
        EMAX=emax,
        MANT_LIMIT=mant,
        RCEIL=scale_rule == "rceil",
        E5M2=elem == "e5m2",
        MBITS=mbits,
        MIN_NORMAL=min_normal,
        SUB_C=sub_c,
        NAN_BYTE=NAN_BYTE[elem],
        HW_CVT=hw_cvt,
    )


def hw_cvt(t: torch.Tensor) -> bool:
    """Whether a kernel launched on ``t`` runs compiled for its GPU, where the fp8 conversion rounds
    half to even in one instruction for two values (``cvt.rn.satfinite`` on sm_89 and newer), as
    torch's does: the kernels then leave the rounding to it. In Triton's interpreter (CPU tensors,
    ``TRITON_INTERPRET=1``) they round in fp32 arithmetic first (:func:`_round_to_fp8_grid`), and
    so they do on a GPU with ``LOWCOMM_FP8_HW_CVT=0`` (to compare the two there)."""
    if os.environ.get("LOWCOMM_FP8_HW_CVT", "1") == "0":
        return False
    return t.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"


if HAVE_TRITON:

    @triton.jit
    def _load_tile(x_ptr, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # this program's (BLOCK_R, BLOCK_C) tile of the row-major (R, C) x, as fp32 (0 outside),
        # with its rows, columns, mask and offsets (the copies of the same layout store at them)
        r0 = tl.program_id(0) * BLOCK_R
        c0 = tl.program_id(1) * BLOCK_C
        return _load_block(x_ptr, R, C, r0, c0, BLOCK_R, BLOCK_C)

    @triton.jit
    def _abs_bits(x):
        # |x| as int32 bits (sign cleared): they order like the floats, NaN above inf, so an
        # integer maximum is the absolute maximum and keeps NaN
        return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF

    @triton.jit
    def _load_block(x_ptr, R, C, r0, c0, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # the (BLOCK_R, BLOCK_C) block of x at (r0, c0), as _load_tile returns it
        rows, cols, inside, offs, x = _load_block_raw(x_ptr, R, C, r0, c0, BLOCK_R, BLOCK_C)
        return rows, cols, inside, offs, x.to(tl.float32)

    @triton.jit
    def _load_block_raw(x_ptr, R, C, r0, c0, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # _load_block with x in its own dtype: a load whose value is not used yet, so a thread
        # goes on (to the previous block's arithmetic) while it is in flight
        rows = r0 + tl.arange(0, BLOCK_R)
        cols = c0 + tl.arange(0, BLOCK_C)
        inside = (rows < R)[:, None] & (cols < C)[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        return rows, cols, inside, offs, tl.load(x_ptr + offs, mask=inside, other=0.0)

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
    def _block_exponent(amax_bits, EMAX: tl.constexpr, MANT_LIMIT: tl.constexpr, RCEIL: tl.constexpr):
        # MX blocks' absolute maxima as bits (_abs_bits) -> their scale exponents k and whether a
        # block holds a non-finite value (its k then that of a block of zeros)
        bad = amax_bits >= 0x7F800000
        amax = tl.where(bad, 0, amax_bits).to(tl.float32, bitcast=True)
        return _scale_exponent(amax, EMAX, MANT_LIMIT, RCEIL), bad

    @triton.jit
    def _mx_grid(
        x3,
        mag3,
        AXIS: tl.constexpr,
        MAXV: tl.constexpr,
        EMAX: tl.constexpr,
        MANT_LIMIT: tl.constexpr,
        RCEIL: tl.constexpr,
    ):
        # one MX block per slice along AXIS of the 3-D views (32 elements): the elements scaled into
        # the format's range (fp32, not yet rounded to its grid), the blocks' scale exponents k and
        # whether a block is non-finite. mag3 holds the bits of |x| as int32, which order as the
        # floats do and put inf and NaN (exponent all ones) above every finite value: one
        # reduction gives the block's absolute maximum and whether it holds a non-finite value (a
        # block of NaN)
        k, bad = _block_exponent(tl.max(mag3, axis=AXIS), EMAX, MANT_LIMIT, RCEIL)
        y = x3 * tl.expand_dims(_pow2_neg(k), AXIS)
        if not RCEIL:  # OCP floor rule: saturate
            y = tl.minimum(tl.maximum(y, -MAXV), MAXV)
        return y, k, bad

    @triton.jit
    def _grid_bytes(y, nan, E5M2: tl.constexpr, NAN_BYTE: tl.constexpr):
        # fp8 bytes of values already on the grid (an exact cast); where ``nan``, the NaN byte torch
        # writes (fp8 NaN conversion differs across backends)
        if E5M2:
            q = y.to(tl.float8e5, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
        else:
            q = y.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
        return tl.where(nan, NAN_BYTE, q).to(tl.uint8)

    @triton.jit
    def _fp8_bytes(y, nan, HW_CVT: tl.constexpr, MBITS: tl.constexpr, MIN_NORMAL: tl.constexpr,
                   SUB_C: tl.constexpr, E5M2: tl.constexpr, NAN_BYTE: tl.constexpr):  # fmt: skip
        # fp8 bytes of fp32 values within the format's range, rounded half to even; where ``nan``,
        # the NaN byte. HW_CVT (compiled for a GPU): the conversion rounds (one instruction for two
        # values, where the rounding in fp32 arithmetic took about a dozen per value); else (the
        # interpreter) the rounding first, then an exact conversion
        if not HW_CVT:
            y = _round_to_fp8_grid(y, MBITS, MIN_NORMAL, SUB_C)
        return _grid_bytes(y, nan, E5M2, NAN_BYTE)

    @triton.jit
    def _on_grid(y, HW_CVT: tl.constexpr, MBITS: tl.constexpr, MIN_NORMAL: tl.constexpr,
                 SUB_C: tl.constexpr, E5M2: tl.constexpr):  # fmt: skip
        # fp32 values within the format's range rounded to its grid, half to even, as fp32: on a
        # GPU (HW_CVT) there and back through the conversion, else in fp32 arithmetic
        if HW_CVT:
            if E5M2:
                return y.to(tl.float8e5, fp_downcast_rounding="rtne").to(tl.float32)
            return y.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.float32)
        return _round_to_fp8_grid(y, MBITS, MIN_NORMAL, SUB_C)

    @triton.jit
    def _mx_blocks(
        x3,
        mag3,
        AXIS: tl.constexpr,
        MAXV: tl.constexpr,
        EMAX: tl.constexpr,
        MANT_LIMIT: tl.constexpr,
        RCEIL: tl.constexpr,
        E5M2: tl.constexpr,
        MBITS: tl.constexpr,
        MIN_NORMAL: tl.constexpr,
        SUB_C: tl.constexpr,
        NAN_BYTE: tl.constexpr,
        HW_CVT: tl.constexpr,
    ):
        # one MX block per slice along AXIS of the 3-D views (32 elements): fp8 bytes and E8M0
        # bytes; a non-finite block is NaN bytes and the NaN scale
        y, k, bad = _mx_grid(x3, mag3, AXIS, MAXV, EMAX, MANT_LIMIT, RCEIL)
        q = _fp8_bytes(y, tl.expand_dims(bad, AXIS), HW_CVT, MBITS, MIN_NORMAL, SUB_C, E5M2, NAN_BYTE)
        return q, tl.where(bad, 255, k + 127).to(tl.uint8)

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
        ROWS: tl.constexpr = True,
        COLS: tl.constexpr = True,
        HW_CVT: tl.constexpr = False,
        TILES: tl.constexpr = 1,
    ):
        # TILES (BLOCK_R, BLOCK_C) tiles side by side along C, both multiples of 32: BLOCK_C/32 row
        # scales per row and BLOCK_R/32 column scales per column of each. ROWS / COLS: which
        # copies to write. Row blocks need C a multiple of 32, column blocks R; the other side may
        # end inside a tile (masked). The next tile's load is issued before this tile's arithmetic
        # (the loop is unrolled), so each warp keeps a read in flight while it computes.
        r0 = tl.program_id(0) * BLOCK_R
        first = tl.program_id(1) * TILES
        rows_n, cols_n, inside_n, offs_n, x_n = _load_block_raw(
            x_ptr, R, C, r0, first * BLOCK_C, BLOCK_R, BLOCK_C
        )
        for t in tl.static_range(TILES):
            rows, cols, inside, offs, x = rows_n, cols_n, inside_n, offs_n, x_n
            if t + 1 < TILES:
                c_next = (first + t + 1) * BLOCK_C
                rows_n, cols_n, inside_n, offs_n, x_n = _load_block_raw(
                    x_ptr, R, C, r0, c_next, BLOCK_R, BLOCK_C
                )
            _mx_dual_tile(
                x.to(tl.float32), rows, cols, inside, offs, first + t, row_q_ptr, row_s_ptr, col_q_ptr,
                col_s_ptr, R, C, MAXV, EMAX, MANT_LIMIT, RCEIL, E5M2, MBITS, MIN_NORMAL, SUB_C,
                NAN_BYTE, BLOCK_R, BLOCK_C, ROWS, COLS, HW_CVT,
            )  # fmt: skip

    @triton.jit
    def _mx_dual_tile(
        x, rows, cols, inside, offs, tile_c, row_q_ptr, row_s_ptr, col_q_ptr, col_s_ptr, R, C,
        MAXV: tl.constexpr, EMAX: tl.constexpr, MANT_LIMIT: tl.constexpr, RCEIL: tl.constexpr,
        E5M2: tl.constexpr, MBITS: tl.constexpr, MIN_NORMAL: tl.constexpr, SUB_C: tl.constexpr,
        NAN_BYTE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
        COLS: tl.constexpr, HW_CVT: tl.constexpr,
    ):  # fmt: skip
        # _mx_dual_kernel's work on one tile x (fp32), the tile_c-th along C of its row of tiles
        mag = _abs_bits(x)
        NB_C: tl.constexpr = BLOCK_C // 32
        NB_R: tl.constexpr = BLOCK_R // 32
        if ROWS:  # row-blocked: 32 consecutive elements of a row share a scale
            shape_r: tl.constexpr = (BLOCK_R, NB_C, 32)
            q, s = _mx_blocks(
                tl.reshape(x, shape_r), tl.reshape(mag, shape_r), 2,
                MAXV, EMAX, MANT_LIMIT, RCEIL, E5M2, MBITS, MIN_NORMAL, SUB_C, NAN_BYTE, HW_CVT,
            )  # fmt: skip
            tl.store(row_q_ptr + offs, tl.reshape(q, (BLOCK_R, BLOCK_C)), mask=inside)
            s_cols = tile_c * NB_C + tl.arange(0, NB_C)
            tl.store(
                row_s_ptr + rows.to(tl.int64)[:, None] * (C // 32) + s_cols[None, :],
                s,
                mask=(rows < R)[:, None] & (s_cols < C // 32)[None, :],
            )
        if COLS:  # column-blocked: 32 consecutive elements of a column share a scale
            shape_c: tl.constexpr = (NB_R, 32, BLOCK_C)
            q, s = _mx_blocks(
                tl.reshape(x, shape_c), tl.reshape(mag, shape_c), 1,
                MAXV, EMAX, MANT_LIMIT, RCEIL, E5M2, MBITS, MIN_NORMAL, SUB_C, NAN_BYTE, HW_CVT,
            )  # fmt: skip
            tl.store(col_q_ptr + offs, tl.reshape(q, (BLOCK_R, BLOCK_C)), mask=inside)
            s_rows = tl.program_id(0) * NB_R + tl.arange(0, NB_R)
            tl.store(
                col_s_ptr + s_rows.to(tl.int64)[:, None] * C + cols[None, :],
                s,
                mask=(s_rows < R // 32)[:, None] & (cols < C)[None, :],
            )

    @triton.jit
    def _second_rounding(y, e, g, bad, MBITS: tl.constexpr, MIN_NORMAL: tl.constexpr, SUB_C: tl.constexpr,
                         E5M2: tl.constexpr, NAN_BYTE: tl.constexpr, HW_CVT: tl.constexpr):  # fmt: skip
        # mxfp8_fast's regrouping of MX blocks (y: the grid values; e: each block's E8M0 byte; g:
        # its group's largest; bad: a non-finite block): y · 2^(e − g), exact, re-rounded to the
        # grid (the second rounding). Past 2^-30 every value rounds to a signed zero, so the shift
        # stops there. A group holding a NaN block (g = 255, a scale of inf) makes its finite
        # blocks 0 (x / inf) and its NaN blocks NaN, as the torch regrouping does.
        z = y * _pow2_neg(tl.minimum(g - e, 30))
        z = tl.where(g == 255, y * 0.0, z)
        return _fp8_bytes(z, bad, HW_CVT, MBITS, MIN_NORMAL, SUB_C, E5M2, NAN_BYTE)

    @triton.jit
    def _group_scale(g):
        # 2^(g − 127) as fp32 from an E8M0 byte (int32): inf for 255, the subnormal 2^-127 for 0
        return tl.where(g == 0, 0x400000, g << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _fast_groups(
        x3,
        mag3,
        AXIS: tl.constexpr,
        GROUP_AXIS: tl.constexpr,
        TILED: tl.constexpr,
        MAXV: tl.constexpr,
        EMAX: tl.constexpr,
        MANT_LIMIT: tl.constexpr,
        RCEIL: tl.constexpr,
        E5M2: tl.constexpr,
        MBITS: tl.constexpr,
        MIN_NORMAL: tl.constexpr,
        SUB_C: tl.constexpr,
        NAN_BYTE: tl.constexpr,
        HW_CVT: tl.constexpr,
    ):
        # one copy of a 128 x 128 tile as 3-D views of MX blocks along AXIS (32 elements), four
        # blocks a group along GROUP_AXIS: the fp8 bytes regrouped, and each group's E8M0 byte
        # (one per row or column of the tile; TILED: one for the tile)
        k, bad = _block_exponent(tl.max(mag3, axis=AXIS), EMAX, MANT_LIMIT, RCEIL)
        e = tl.where(bad, 255, k + 127)
        if TILED:
            g = tl.max(tl.max(e, axis=1), axis=0)
            g3 = g
        else:
            g = tl.max(e, axis=GROUP_AXIS)
            g3 = tl.expand_dims(tl.expand_dims(g, GROUP_AXIS), AXIS)
        q = _fast_block_bytes(
            x3, tl.expand_dims(k, AXIS), tl.expand_dims(e, AXIS), g3, tl.expand_dims(bad, AXIS), MAXV,
            RCEIL, E5M2, MBITS, MIN_NORMAL, SUB_C, NAN_BYTE, HW_CVT,
        )  # fmt: skip
        return q, g

    @triton.jit
    def _mx_fast_kernel(
        x_ptr,
        q_ptr,
        s_ptr,
        qt_ptr,
        st_ptr,
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
        HW_CVT: tl.constexpr,
        TILED: tl.constexpr,
        ROWS: tl.constexpr,
        COLS: tl.constexpr,
        TILES: tl.constexpr = 1,
        SWEEP: tl.constexpr = False,
    ):
        # TILES 128 x 128 tiles of x side by side along C (R and C multiples of 128), each read
        # once. ROWS: q (R, C) blocked along rows, a scale per 128 of a row (TILED: per tile),
        # stored for cuBLAS's A (a scale tensor (R, C/128) with strides (1, R)) or as B's tiles
        # ((R/128, C/128) row-major). COLS: qt (C, R), x transposed, blocked along x's columns: a
        # scale per 128 of a column, (R/128, C) row-major (TILED: per tile, (C/128, R/128)
        # row-major). TILES > 1: a loop the compiler pipelines in two stages (the next tile
        # copied into shared memory, cp.async, while this one is computed): a block takes every
        # register of its SM, so without it an SM's reads and arithmetic take turns
        if SWEEP:
            _mx_fast_sweep(
                x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, R, C, MAXV, EMAX, MANT_LIMIT, RCEIL, E5M2, MBITS,
                MIN_NORMAL, SUB_C, NAN_BYTE, HW_CVT, TILED, ROWS, COLS,
            )  # fmt: skip
        elif TILES == 1:
            rows, cols, inside, offs, x = _load_tile(x_ptr, R, C, 128, 128)
            _mx_fast_tile(
                x, rows, cols, offs, tl.program_id(1), q_ptr, s_ptr, qt_ptr, st_ptr, R, C, MAXV, EMAX,
                MANT_LIMIT, RCEIL, E5M2, MBITS, MIN_NORMAL, SUB_C, NAN_BYTE, HW_CVT, TILED, ROWS, COLS,
            )  # fmt: skip
        else:
            r0 = tl.program_id(0) * 128
            first = tl.program_id(1) * TILES
            for t in tl.range(0, tl.minimum(TILES, C // 128 - first), num_stages=2):
                rows, cols, inside, offs, x = _load_block(x_ptr, R, C, r0, (first + t) * 128, 128, 128)
                _mx_fast_tile(
                    x, rows, cols, offs, first + t, q_ptr, s_ptr, qt_ptr, st_ptr, R, C, MAXV, EMAX,
                    MANT_LIMIT, RCEIL, E5M2, MBITS, MIN_NORMAL, SUB_C, NAN_BYTE, HW_CVT, TILED, ROWS,
                    COLS,
                )  # fmt: skip

    @triton.jit
    def _mx_fast_sweep(
        x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, R, C, MAXV: tl.constexpr, EMAX: tl.constexpr,
        MANT_LIMIT: tl.constexpr, RCEIL: tl.constexpr, E5M2: tl.constexpr, MBITS: tl.constexpr,
        MIN_NORMAL: tl.constexpr, SUB_C: tl.constexpr, NAN_BYTE: tl.constexpr, HW_CVT: tl.constexpr,
        TILED: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
    ):  # fmt: skip
        # _mx_fast_kernel's 128 x 128 tile as eight 32 x 64 parts (4 down, 2 across), read twice:
        # the first sweep takes every MX block's maximum, the second (from L2) makes both copies.
        # In a part a thread holds several rows of each column block it touches, so the blocks'
        # exponent arithmetic runs once per block and thread, not once per element as in the
        # whole tile's layout (a thread per row of a column block).
        pr = tl.program_id(0)
        pc = tl.program_id(1)
        r0 = pr * 128
        c0 = pc * 128
        i4 = tl.arange(0, 4)
        i2 = tl.arange(0, 2)
        # column blocks' maxima by (part row rb, part column cb, column); row blocks' by (rb, row,
        # cb, block of the part's row)
        cmax = tl.zeros((4, 2, 64), dtype=tl.int32)
        rmax = tl.zeros((4, 32, 2, 2), dtype=tl.int32)
        for rb in tl.static_range(4):
            for cb in tl.static_range(2):
                rows, cols, inside, offs, x = _load_block_raw(x_ptr, R, C, r0 + rb * 32, c0 + cb * 64, 32, 64)
                mag = _abs_bits(x.to(tl.float32))
                if COLS:
                    here = (i4[:, None, None] == rb) & (i2[None, :, None] == cb)
                    cmax = tl.where(here, tl.max(mag, axis=0)[None, None, :], cmax)
                if ROWS:
                    here = (i4[:, None, None, None] == rb) & (i2[None, None, :, None] == cb)
                    in_rows = tl.max(tl.reshape(mag, (32, 2, 32)), axis=2)
                    rmax = tl.where(here, in_rows[None, :, None, :], rmax)
        kc, bad = _block_exponent(cmax, EMAX, MANT_LIMIT, RCEIL)
        ec = tl.where(bad, 255, kc + 127)
        gc = tl.max(ec, axis=0)  # (2, 64): each column's group, by part column
        kr, bad = _block_exponent(rmax, EMAX, MANT_LIMIT, RCEIL)
        er = tl.where(bad, 255, kr + 127)
        gr = tl.max(tl.max(er, axis=3), axis=2)  # (4, 32): each row's group, by part row
        if TILED:  # one group a copy: the tile
            gc_tile = tl.max(tl.max(gc, axis=1), axis=0)
            gr_tile = tl.max(tl.max(gr, axis=1), axis=0)
            gc = tl.zeros((2, 64), dtype=tl.int32) + gc_tile
            gr = tl.zeros((4, 32), dtype=tl.int32) + gr_tile
            if COLS:
                tl.store(st_ptr + pc * (R // 128) + pr, _group_scale(gc_tile))
            if ROWS:
                tl.store(s_ptr + pr * (C // 128) + pc, _group_scale(gr_tile))
        else:
            if COLS:
                st_offs = pr * C + c0 + i2[:, None] * 64 + tl.arange(0, 64)[None, :]
                tl.store(st_ptr + st_offs, _group_scale(gc))
            if ROWS:
                tl.store(s_ptr + pc * R + r0 + i4[:, None] * 32 + tl.arange(0, 32)[None, :], _group_scale(gr))
        # the second sweep: a loop (unrolled, it took 15 s to compile), each part's read issued
        # before the previous part's arithmetic (the last iteration reads its own part again)
        prows, pcols, pinside, poffs, x_next = _load_block_raw(x_ptr, R, C, r0, c0, 32, 64)
        for part in tl.range(0, 8, loop_unroll_factor=1):
            prb = part // 2
            pcb = part % 2
            rows, cols, offs, xp = prows, pcols, poffs, x_next.to(tl.float32)
            nxt = tl.minimum(part + 1, 7)
            prows, pcols, pinside, poffs, x_next = _load_block_raw(
                x_ptr, R, C, r0 + (nxt // 2) * 32, c0 + (nxt % 2) * 64, 32, 64
            )
            if COLS:  # the part's column blocks: a k, e and g per column (k from the maxima again: fewer
                # values held through the loop than the first sweep's exponents)
                here = (i4[:, None, None] == prb) & (i2[None, :, None] == pcb)
                k, nonfinite = _block_exponent(
                    tl.max(tl.max(tl.where(here, cmax, 0), axis=0), axis=0), EMAX, MANT_LIMIT, RCEIL
                )
                e = tl.where(nonfinite, 255, k + 127)
                # the part column's group bytes (>= 0, so the max of the rest made 0 picks it; a
                # sum would too, but triton 3.2's interpreter sums int32 into int64, which the
                # bitcast in _pow2_neg then reads as twice as many fp32 values)
                g = tl.max(tl.where(i2[:, None] == pcb, gc, 0), axis=0)
                q = _fast_block_bytes(
                    xp, k[None, :], e[None, :], g[None, :], nonfinite[None, :], MAXV, RCEIL, E5M2,
                    MBITS, MIN_NORMAL, SUB_C, NAN_BYTE, HW_CVT,
                )  # fmt: skip
                tl.store(qt_ptr + cols.to(tl.int64)[:, None] * R + rows[None, :], tl.trans(q))
            if ROWS:  # the part's row blocks: a k and e per row and block, a g per row
                here = (i4[:, None, None, None] == prb) & (i2[None, None, :, None] == pcb)
                k, nonfinite = _block_exponent(
                    tl.max(tl.max(tl.where(here, rmax, 0), axis=2), axis=0), EMAX, MANT_LIMIT, RCEIL
                )
                e = tl.where(nonfinite, 255, k + 127)
                g = tl.max(tl.where(i4[:, None] == prb, gr, 0), axis=0)  # the part row's (as above)
                q = _fast_block_bytes(
                    tl.reshape(xp, (32, 2, 32)), k[:, :, None], e[:, :, None], g[:, None, None],
                    nonfinite[:, :, None], MAXV, RCEIL, E5M2, MBITS, MIN_NORMAL, SUB_C, NAN_BYTE, HW_CVT,
                )  # fmt: skip
                tl.store(q_ptr + offs, tl.reshape(q, (32, 64)))

    @triton.jit
    def _fast_block_bytes(x, k, e, g, bad, MAXV: tl.constexpr, RCEIL: tl.constexpr, E5M2: tl.constexpr,
                          MBITS: tl.constexpr, MIN_NORMAL: tl.constexpr, SUB_C: tl.constexpr,
                          NAN_BYTE: tl.constexpr, HW_CVT: tl.constexpr):  # fmt: skip
        # mxfp8_fast's bytes of elements x from their MX block's scale exponent k, E8M0 byte e and
        # non-finite flag, and their group's largest byte g (each broadcast to x): the MX scaling
        # (as _mx_grid's), the MX values' rounding, then the regrouping's second rounding
        y = x * _pow2_neg(k)
        if not RCEIL:  # OCP floor rule: saturate
            y = tl.minimum(tl.maximum(y, -MAXV), MAXV)
        y = _on_grid(y, HW_CVT, MBITS, MIN_NORMAL, SUB_C, E5M2)  # the MX values: the first rounding
        return _second_rounding(y, e, g, bad, MBITS, MIN_NORMAL, SUB_C, E5M2, NAN_BYTE, HW_CVT)

    @triton.jit
    def _mx_fast_tile(
        x, rows, cols, offs, pc, q_ptr, s_ptr, qt_ptr, st_ptr, R, C, MAXV: tl.constexpr,
        EMAX: tl.constexpr, MANT_LIMIT: tl.constexpr, RCEIL: tl.constexpr, E5M2: tl.constexpr,
        MBITS: tl.constexpr, MIN_NORMAL: tl.constexpr, SUB_C: tl.constexpr, NAN_BYTE: tl.constexpr,
        HW_CVT: tl.constexpr, TILED: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
    ):  # fmt: skip
        # _mx_fast_kernel's work on one 128 x 128 tile x (fp32), the pc-th along C
        mag = _abs_bits(x)
        pr = tl.program_id(0)
        if ROWS:  # 4 MX blocks of 32 along each row of the tile
            q, g = _fast_groups(
                tl.reshape(x, (128, 4, 32)), tl.reshape(mag, (128, 4, 32)), 2, 1, TILED,
                MAXV, EMAX, MANT_LIMIT, RCEIL, E5M2, MBITS, MIN_NORMAL, SUB_C, NAN_BYTE, HW_CVT,
            )  # fmt: skip
            if TILED:
                tl.store(s_ptr + pr * (C // 128) + pc, _group_scale(g))
            else:
                tl.store(s_ptr + pc * R + rows, _group_scale(g))
            tl.store(q_ptr + offs, tl.reshape(q, (128, 128)))
        if COLS:  # 4 MX blocks of 32 along each column of the tile
            q, g = _fast_groups(
                tl.reshape(x, (4, 32, 128)), tl.reshape(mag, (4, 32, 128)), 1, 0, TILED,
                MAXV, EMAX, MANT_LIMIT, RCEIL, E5M2, MBITS, MIN_NORMAL, SUB_C, NAN_BYTE, HW_CVT,
            )  # fmt: skip
            if TILED:
                tl.store(st_ptr + pc * (R // 128) + pr, _group_scale(g))
            else:
                tl.store(st_ptr + pr * C + cols, _group_scale(g))
            offs_t = cols.to(tl.int64)[:, None] * R + rows[None, :]
            tl.store(qt_ptr + offs_t, tl.trans(tl.reshape(q, (128, 128))))

    @triton.jit
    def _mx_dequant_kernel(
        q_ptr, s_ptr, out_ptr, R, C, AXIS: tl.constexpr, E5M2: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        # one (BLOCK_R, BLOCK_C) tile of MX data (R, C), blocked along AXIS (1: 32 elements of a
        # row share a scale, scales (R, C/32); 0: of a column, scales (R/32, C)), to bf16: the fp8
        # value times 2^(s − 127). The product is exact in fp32, and so is its bf16 (a value of at
        # most 4 significant bits) from 2^-126 up; below that bf16's subnormals step by 2^-133 and
        # the value is rounded to them half to even in fp32 arithmetic. Every value is then a bf16
        # one, whose bits are the fp32's upper half: stored as such, with no conversion (the
        # interpreter's flushes subnormals). A NaN scale (255) or byte gives NaN.
        # The tile is read as blocks along a third axis, (BLOCK_R, BLOCK_C/32, 32) or (BLOCK_R/32,
        # 32, BLOCK_C), so each scale is loaded once for its block and broadcast in registers (as
        # a (R, C) tile, each thread loaded a scale byte for each of its values: 32 one-byte loads
        # a thread beside its two 16-byte ones, compiled for sm_90a).
        if AXIS == 1:
            rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
            blocks = tl.program_id(1) * (BLOCK_C // 32) + tl.arange(0, BLOCK_C // 32)
            live = (rows < R)[:, None] & (blocks < C // 32)[None, :]
            row_at = rows.to(tl.int64)[:, None]
            s = tl.load(s_ptr + row_at * (C // 32) + blocks[None, :], mask=live, other=127)
            s = s.to(tl.int32)[:, :, None]
            offs = (row_at * C + blocks[None, :] * 32)[:, :, None] + tl.arange(0, 32)[None, None, :]
            inside = live[:, :, None] & (tl.arange(0, 32) < 32)[None, None, :]
        else:
            blocks = tl.program_id(0) * (BLOCK_R // 32) + tl.arange(0, BLOCK_R // 32)
            cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
            live = (blocks < R // 32)[:, None] & (cols < C)[None, :]
            s = tl.load(s_ptr + blocks.to(tl.int64)[:, None] * C + cols[None, :], mask=live, other=127)
            s = s.to(tl.int32)[:, None, :]
            rows = blocks.to(tl.int64)[:, None] * 32 + tl.arange(0, 32)[None, :]
            offs = (rows * C)[:, :, None] + cols[None, None, :]
            inside = live[:, None, :] & (tl.arange(0, 32) < 32)[None, :, None]
        b = tl.load(q_ptr + offs, mask=inside, other=0)
        mag = b & 0x7F
        if E5M2:  # 0x7C is inf, above it NaN
            v = b.to(tl.float8e5, bitcast=True).to(tl.float32)
            v = tl.where(mag == 0x7C, tl.where(b > 0x7F, -float("inf"), float("inf")), v)
            nan = (mag > 0x7C) | (s == 255)
        else:  # e4m3fn: no inf, 0x7F is NaN
            v = b.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            nan = (mag == 0x7F) | (s == 255)
        y = v * _group_scale(s)
        a = tl.abs(y)
        TIE: tl.constexpr = 1.5 * 2.0**-110  # an fp32 whose ulp is bf16's subnormal step, 2^-133
        a = tl.where(a < 2.0**-126, (a + TIE) - TIE, a)
        # the sign from y's bits (a negation of a zero can come out +0), NaN as bf16's 0x7FC0
        y_bits = y.to(tl.int32, bitcast=True)
        bits = (a.to(tl.int32, bitcast=True) >> 16) | ((y_bits >> 16) & 0x8000)
        bits = tl.where(nan, 0x7FC0, bits).to(tl.int16)  # out_ptr: the bf16 output as int16
        tl.store(out_ptr + offs, bits, mask=inside)


# Tiles per program on CUDA. The candidates were chosen by compiling each tile shape and warp
# count for sm_90a on CPU (``python -m lowcomm.kernels.triton_static``) and keeping those with no
# spills and whole 16-byte stores of the fp8 data; counted in the PTX of the bf16 -> e4m3 dual
# kernel (barriers, warp shuffles, registers):
#   32 x 32, 1 warp    0 barriers,  4 shuffles, 102 registers (the default without tuning)
#   64 x 32, 1 warp    0,  6, 144
#   32 x 64, 1 warp    0, 54, 148
#   32 x 128, 4 warps 11, 66,  95
#   32 x 128, 8 warps 19, 33,  64 (the tile measured on the H200 at 0.71 TB/s, when it took
#                                  35 barriers and 114 shuffles: before one integer reduction
#                                  replaced a float one and a flag one)
# A column's block spans threads (and warps, beyond one warp), so fewer warps per tile mean fewer
# barriers. Which is fastest is the GPU's to say: on CUDA the kernel is autotuned over them once
# per shape (LOWCOMM_AUTOTUNE=0 pins the first); every candidate writes the same bytes (tested).
# The interpreter runs 32 x 32 tiles (tests also run every CUDA candidate there).
#
# TILES > 1: a program quantizes that many tiles side by side, the next one's load issued before
# this one's arithmetic. On the H200 the best one-tile candidate (32 x 64, one warp) reached 43%
# of copy bandwidth: with one tile a warp, a warp's read and its arithmetic take turns, and at
# 148-154 registers a thread an SM holds 12 such warps (triton_static.blocks_per_sm). In the SASS
# of the two-tile 32 x 32 kernel (sm_90a) the second tile's loads come 180 instructions after the
# first's, before any of the first tile's stores; with four tiles each tile's loads come during
# the previous tile's arithmetic (115-160 registers). What that is worth is the GPU's to say (the autotuner).
QUANTIZE_CUDA_CONFIGS = (
    {"BLOCK_R": 32, "BLOCK_C": 32, "num_warps": 1, "TILES": 1},
    {"BLOCK_R": 64, "BLOCK_C": 32, "num_warps": 1, "TILES": 1},
    {"BLOCK_R": 32, "BLOCK_C": 64, "num_warps": 1, "TILES": 1},
    {"BLOCK_R": 32, "BLOCK_C": 128, "num_warps": 4, "TILES": 1},
    {"BLOCK_R": 32, "BLOCK_C": 128, "num_warps": 8, "TILES": 1},
    {"BLOCK_R": 32, "BLOCK_C": 32, "num_warps": 1, "TILES": 2},
    {"BLOCK_R": 32, "BLOCK_C": 32, "num_warps": 1, "TILES": 4},
    {"BLOCK_R": 32, "BLOCK_C": 64, "num_warps": 1, "TILES": 2},
)
QUANTIZE_CUDA_CONFIG = QUANTIZE_CUDA_CONFIGS[0]
QUANTIZE_INTERPRET_CONFIG = {"BLOCK_R": 32, "BLOCK_C": 32, "num_warps": 4, "TILES": 1}


def tile_name(cfg: dict) -> str:
    """A tile candidate's short name: ``32x64w1`` (rows x columns, warps; ``w16`` for mxfp8_fast's
    fixed 128 x 128 tile), ``t2`` added for two tiles a program, ``sweep`` for mxfp8_fast's tile
    read twice in parts."""
    tiles = cfg.get("TILES", 1)
    shape = f"{cfg['BLOCK_R']}x{cfg['BLOCK_C']}" if "BLOCK_R" in cfg else ""
    return (
        f"{shape}w{cfg['num_warps']}"
        + (f"t{tiles}" if tiles > 1 else "")
        + ("sweep" * cfg.get("SWEEP", False))
    )


_STATIC_ELEMS = (("e4m3", "rceil"), ("e5m2", "floor"))


def static_specs() -> list:
    """The quantize kernel as launched on CUDA (both copies, and each alone as mx_quantize writes
    it), for :mod:`lowcomm.kernels.triton_static`."""
    from .triton_static import KernelSpec

    specs = []
    first = QUANTIZE_CUDA_CONFIG
    cases = [(s, e, r, (True, True), first) for s in ("bf16", "fp32") for e, r in _STATIC_ELEMS]
    one = ("bf16", "e4m3", "rceil")
    cases += [(*one, (True, False), first), (*one, (False, True), first)]
    cases += [(*one, (True, True), cfg) for cfg in QUANTIZE_CUDA_CONFIGS[1:]]
    for src, elem, rule, (rows, cols), cfg in cases:
        consts = dict(
            **mx_format(elem, rule, hw_cvt=True),
            BLOCK_R=cfg["BLOCK_R"],
            BLOCK_C=cfg["BLOCK_C"],
            ROWS=rows,
            COLS=cols,
            TILES=cfg["TILES"],
        )
        sig = {"x_ptr": f"*{src}", "row_q_ptr": "*u8", "row_s_ptr": "*u8", "col_q_ptr": "*u8"}
        sig.update({"col_s_ptr": "*u8", "R": "i32", "C": "i32"})
        sig.update({k: "constexpr" for k in consts})
        name = "mx_quantize_dual" if rows and cols else f"mx_quantize axis={-1 if rows else 0}"
        w, t = cfg["num_warps"], cfg["TILES"]
        tile = ""  # the default's name has no tile
        if cfg is not first:
            tile = f", {cfg['BLOCK_R']}x{cfg['BLOCK_C']} {w} warp{'s' * (w > 1)}" + (
                f", {t} tiles" if t > 1 else ""
            )
        specs.append(
            KernelSpec(
                name=f"{name} ({src} -> {elem}, {rule}{tile})",
                fn=_mx_dual_kernel,
                signature=sig,
                constexprs=consts,
                num_warps=cfg["num_warps"],
                num_stages=1,
                aligned=("R", "C"),
            )
        )
    # mxfp8_fast's operands as the Linear layers make them: activations (e4m3) and gradients
    # (e5m2) in 1x128 blocks, weights in 128x128 tiles; both copies
    for elem, tile in (("e4m3", "1x128"), ("e5m2", "1x128"), ("e4m3", "128x128")):
        consts = dict(
            mx_format(elem, "rceil", hw_cvt=True),
            TILED=tile != "1x128",
            ROWS=True,
            COLS=True,
            TILES=1,
            SWEEP=False,
        )
        sig = {"x_ptr": "*bf16", "q_ptr": "*u8", "s_ptr": "*fp32", "qt_ptr": "*u8", "st_ptr": "*fp32"}
        sig.update({"R": "i32", "C": "i32", **{k: "constexpr" for k in consts}})
        name = f"mx_fast_quantize_dual ({tile}, both copies, bf16 to {elem})"
        specs.append(KernelSpec(name, _mx_fast_kernel, sig, consts, FAST_CUDA_WARPS, 1, aligned=("R", "C")))
        if (elem, tile) == ("e4m3", "1x128"):  # the autotuner's other candidates
            for c in FAST_CUDA_CONFIGS[1:]:
                w, t = c["num_warps"], c["TILES"]
                how = "two sweeps of 32x64 parts" if c["SWEEP"] else f"{t} tile{'s' * (t > 1)}"
                more = f"{name[:-1]}; {w} warp{'s' * (w > 1)}, {how})"
                specs.append(
                    KernelSpec(
                        more,
                        _mx_fast_kernel,
                        sig,
                        {**consts, "TILES": t, "SWEEP": c["SWEEP"]},
                        c["num_warps"],
                        1,
                        ("R", "C"),
                    )
                )
    # the dequantize to bf16 of the dequant backend's GEMMs: both blocked axes, both formats, at
    # the first tile; e4m3 along rows at each other autotuner candidate
    first = DEQUANT_CUDA_CONFIG
    cases = [("e4m3", 1, first), ("e4m3", 0, first), ("e5m2", 1, first)]
    cases += [("e4m3", 1, cfg) for cfg in DEQUANT_CUDA_CONFIGS[1:]]
    for elem, axis, cfg in cases:
        consts = dict(AXIS=axis, E5M2=elem == "e5m2", BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"])
        sig = {"q_ptr": "*u8", "s_ptr": "*u8", "out_ptr": "*i16", "R": "i32", "C": "i32"}
        sig.update({k: "constexpr" for k in consts})
        name = f"mx_dequantize ({elem} to bf16, axis={axis})"
        if cfg is not DEQUANT_CUDA_CONFIG:
            name += f" {tile_name(cfg)}"
        specs.append(
            KernelSpec(name, _mx_dequant_kernel, sig, consts, cfg["num_warps"], 1, aligned=("R", "C"))
        )
    return specs


def mx_quantize_dual(
    x: torch.Tensor, elem: str = "e4m3", scale_rule: str = "rceil", *, config: dict | None = None
):
    """Both MX copies of a 2-D tensor in one pass.

    Args:
        x: (R, C) fp32 / bf16 / fp16, R and C multiples of 32; CUDA, or CPU under
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
    return _quantize(x, elem, scale_rule, True, True, config, "mx_quantize_dual")


def mx_quantize(
    x: torch.Tensor,
    elem: str = "e4m3",
    scale_rule: str = "rceil",
    axis: int = -1,
    *,
    config: dict | None = None,
):
    """One MX copy of a 2-D tensor in one pass: ``quantize_mx(x, elem, 32, scale_rule, axis)``.

    Args:
        x: (R, C) fp32 / bf16 / fp16; the blocked side (C for ``axis=-1``, R for ``axis=0``) a
            multiple of 32, the other any length.
        axis: -1 or 1 (blocks along rows), 0 (blocks along columns).

    Returns:
        ``(data, scales)``: (R, C) fp8 and E8M0 bytes (R, C/32) or (R/32, C).

    Raises:
        RuntimeError: triton is not installed. ValueError: shape, dtype, elem, rule or axis.
    """
    if axis not in (-1, 0, 1):
        raise ValueError(f"mx_quantize takes axis -1, 0 or 1 of a 2-D tensor, got {axis}")
    rows = axis != 0
    out = _quantize(x, elem, scale_rule, rows, not rows, config, "mx_quantize")
    return out[:2] if rows else out[2:]


# The MX dequantize's tiles on CUDA. The first, 32 x 128 on 4 warps, ran 0.63-1.13 TB/s on the
# H200 (15-27% of copy; 2026-12-04), when each thread also loaded a scale byte per value. Compiled
# for sm_90a (triton 3.9) with a scale load per block, every candidate has no spills and stores
# whole 16-byte packets; with more than one warp the tile crosses warps between the load's layout
# and the store's (2-8 KiB of shared memory, 7-11 barriers), with one warp it does not (0, 0,
# 78-86 registers). Which is fastest is the GPU's to say: on CUDA the kernel is autotuned over
# them once per shape (LOWCOMM_AUTOTUNE=0 pins the first); every candidate writes the same bytes
# (tested). The interpreter runs 32 x 32.
DEQUANT_CUDA_CONFIGS = (
    {"BLOCK_R": 32, "BLOCK_C": 128, "num_warps": 4},
    {"BLOCK_R": 32, "BLOCK_C": 64, "num_warps": 1},
    {"BLOCK_R": 64, "BLOCK_C": 64, "num_warps": 2},
    {"BLOCK_R": 32, "BLOCK_C": 256, "num_warps": 4},
    {"BLOCK_R": 128, "BLOCK_C": 128, "num_warps": 8},
)
DEQUANT_CUDA_CONFIG = DEQUANT_CUDA_CONFIGS[0]
DEQUANT_INTERPRET_CONFIG = {"BLOCK_R": 32, "BLOCK_C": 32, "num_warps": 4}


def mx_dequantize(data: torch.Tensor, scales: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """MX data back to bf16 in one pass: ``dequantize_mx(data, scales, 32, axis, torch.bfloat16)``
    bit for bit.

    bf16 holds every MX value exactly (an e4m3 or e5m2 value has at most 4 significant bits, and
    bf16 has fp32's exponent range) but in blocks scaled below 2^-124 (e4m3; 2^-117 for e5m2),
    whose smallest values fall between bf16's subnormal steps (2^-133) and are rounded half to
    even. So a bf16 GEMM of two dequantized operands, whose products are exact and summed in
    fp32, computes the exact MX product (:func:`lowcomm.kernels.triton_mx_gemm.mx_dequant_matmul`).

    Args:
        data: (R, C) float8_e4m3fn or float8_e5m2, as :func:`mx_quantize` writes it.
        scales: E8M0 bytes, (R, C/32) for ``axis`` -1 or 1, (R/32, C) for ``axis`` 0.

    Raises:
        RuntimeError: triton is not installed. ValueError: shapes, dtypes or axis.
    """
    if not HAVE_TRITON:
        raise RuntimeError(
            f"mx_dequantize needs Triton ({TRITON_MISSING}); or use lowcomm.kernels.dequantize_mx"
        )
    if axis not in (-1, 0, 1):
        raise ValueError(f"mx_dequantize takes axis -1, 0 or 1 of a 2-D tensor, got {axis}")
    if data.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"mx_dequantize takes float8_e4m3fn or float8_e5m2 data, got {data.dtype}")
    rows = axis != 0
    R, C = data.shape if data.dim() == 2 else (-1, -1)
    want = (R, C // 32) if rows else (R // 32, C)
    if (
        data.dim() != 2
        or (C if rows else R) % 32
        or tuple(scales.shape) != want
        or scales.dtype != torch.uint8
    ):
        raise ValueError(
            f"mx_dequantize needs (R, C) data blocked by 32 along axis {axis} and uint8 scales "
            f"{'(R, C/32)' if rows else '(R/32, C)'}, got {tuple(data.shape)} and {tuple(scales.shape)} "
            f"{scales.dtype}"
        )
    if data.device != scales.device:
        raise ValueError(
            f"mx_dequantize: data and scales must be on one device, got {data.device} and {scales.device}"
        )
    e5m2 = data.dtype == torch.float8_e5m2
    if as_op():
        return torch.ops.lowcomm.mx_dequantize(data, scales, rows, e5m2)
    return _run_dequant(data, scales, rows, e5m2)


def _run_dequant(
    data: torch.Tensor, scales: torch.Tensor, rows: bool, e5m2: bool, config: dict | None = None
) -> torch.Tensor:
    """:func:`mx_dequantize` after its checks; ``config``: a tile (one of DEQUANT_CUDA_CONFIGS'
    keys) instead of the autotuner's (CUDA) or the interpreter's."""
    tune = config is None and autotuning(data.device)
    # None: the autotuner's tile (the candidates write the same bytes: its runs change nothing)
    cfg = None if tune else config or (DEQUANT_CUDA_CONFIG if data.is_cuda else DEQUANT_INTERPRET_CONFIG)
    q, s = data.contiguous().view(torch.uint8), scales.contiguous()
    out = torch.empty(data.shape, dtype=torch.bfloat16, device=data.device)
    R, C = data.shape
    if R and C:
        kernel = _tuned("mx_dequantize") if tune else _mx_dequant_kernel
        with on_device(data):
            kernel[_grid(R, C, cfg)](
                q, s, out.view(torch.int16), R, C, AXIS=1 if rows else 0, E5M2=e5m2, **(cfg or {})
            )
    return out


#: mxfp8_fast's block shapes: a scale per 128 elements along the blocked axis, or per 128x128 tile
FAST_TILES = ("1x128", "128x128")
# 128 x 128 tiles (a group of 128 along either axis in one program). Warps from the code compiled
# for sm_90a (bf16 -> e4m3, both copies; triton 3.9): 4 warps take 255 registers, 8 take 222-255
# (the cap: one 8-warp program per SM), 16 take 108-125 with no spills and 16 KiB of shared memory
# (the transpose), the fp8 data leaving in 16-byte stores. With the conversion rounding (triton
# 3.6, 1x128): 8 warps 59 instructions a value at 248 registers, 16 warps 70 at 123, 32 warps 76
# at 64 (fewer threads to a tile: fewer values cross threads, more registers). Which is fastest is
# the GPU's to say: on CUDA the kernel is autotuned over FAST_CUDA_CONFIGS once per shape
# (LOWCOMM_AUTOTUNE=0 pins the first). On the H200 it ran at 0.59-0.64 TB/s (15% of copy): every
# warp count fills the SM's 65,536 registers with one block (triton_static.blocks_per_sm), so an
# SM's reads and arithmetic take turns. TILES = 4: a block sweeps up to four tiles along C in a
# loop the compiler pipelines (the next tile copied into shared memory with cp.async while this
# one is computed; 16 warps at 128 registers and 34 KiB of shared memory, 32 warps at 64 and 36
# KiB, sm_90a, triton 3.9). What that is worth is the GPU's to say.
#
# SWEEP: a one-warp program reads its tile twice as eight 32 x 64 parts (_mx_fast_sweep). Of the
# 65 instructions a value of the 16-warp tile, the transposed copy takes 54 (each thread holds one
# row of a column block, so every block's exponent arithmetic runs once per element); in a part a
# thread holds eight rows of its column blocks, as in the MX quantize's 32 x 64 tile. Compiled
# (sm_90a, bf16 -> e4m3, triton 3.9 and 3.6): 37 instructions a value as executed (the first sweep
# unrolled, the second a loop of eight: unrolled, 33, but 15 s to compile against 4), 254-255
# registers (12 spill instructions under 3.9, none under 3.6), 8 warps an SM, the fp8 data in
# 16-byte stores; the second read comes from L2. What that is worth is the GPU's to say. (The
# four-tile candidates spill 4-52 instructions' worth, triton_static.spill_instructions.)
FAST_CUDA_CONFIGS = (
    {"num_warps": 16, "TILES": 1, "SWEEP": False},
    {"num_warps": 8, "TILES": 1, "SWEEP": False},
    {"num_warps": 32, "TILES": 1, "SWEEP": False},
    {"num_warps": 1, "TILES": 1, "SWEEP": True},
    {"num_warps": 16, "TILES": 4, "SWEEP": False},
    {"num_warps": 32, "TILES": 4, "SWEEP": False},
)
FAST_CUDA_WARPS = FAST_CUDA_CONFIGS[0]["num_warps"]
FAST_INTERPRET_WARPS = 4


def mx_fast_quantize_dual(
    x: torch.Tensor,
    elem: str = "e4m3",
    tile: str = "1x128",
    scale_rule: str = "rceil",
    *,
    rows: bool = True,
    cols: bool = True,
    config: dict | None = None,
):
    """``mxfp8_fast``'s operands from a 2-D tensor in one pass: as it is and transposed, each
    blocked along its own contraction axis, the scales laid out as cuBLAS's blockwise GEMM reads
    them.

    The numerics are the recipe's (:func:`lowcomm.kernels.gemm.regroup_mx_1x128`): MX blocks of
    32, then each group of 128 (``tile="128x128"``: each 128x128 tile) takes its largest scale and
    the other blocks' elements are rounded again at it; every byte and scale equals the torch
    regrouping of :func:`lowcomm.kernels.quantize_mx` (tested), with no fp32 copy of the tensor in
    between.

    Args:
        x: (R, C) fp32 / bf16 / fp16, R and C multiples of 128; CUDA, or CPU under
            ``TRITON_INTERPRET=1``.
        elem: "e4m3" or "e5m2". tile: "1x128" (activations, gradients) or "128x128" (weights).
        scale_rule: the MX scale rule, "rceil" or "floor".
        rows, cols: which copies to make (at least one).
        config: ``num_warps``, ``TILES`` (128x128 tiles a program sweeps along C) and ``SWEEP``
            (one tile read twice in 32 x 64 parts; with TILES 1) to launch with, instead of the
            autotuner's pick (CUDA) or the default.

    Returns:
        ``(q, q_scale, qt, qt_scale)``, ``None`` for a copy not made: ``q`` (R, C) blocked along
        rows with ``q_scale`` (R, C/128) of strides (1, R) (cuBLAS's A), or (R/128, C/128)
        row-major for tiles; ``qt`` (C, R) = x transposed, blocked along x's columns, with
        ``qt_scale`` (R/128, C) row-major, or (R/128, C/128) of strides (1, R/128) for tiles. The
        scales are fp32 powers of two (inf for a group holding a NaN).

    Raises:
        RuntimeError: triton is not installed. ValueError: shape, dtype, elem, tile or rule.
    """
    if tile not in FAST_TILES:
        raise ValueError(f"tile must be one of {list(FAST_TILES)}, got {tile!r}")
    tiled = tile == "128x128"
    if config is None and as_op():  # the operator checks the rest (called directly too), as _run_fast
        out = torch.ops.lowcomm.mx_fast_quantize(x, elem, scale_rule, tiled, rows, cols)
    else:
        out = _run_fast(x, elem, scale_rule, tiled, rows, cols, config)
    return copies_made(out, rows, cols)


def _fast_outputs(x: torch.Tensor, tiled: bool, rows: bool, cols: bool):
    """The four empty outputs of :func:`mx_fast_quantize_dual` with their strides, the data as
    bytes (a copy not made: empty)."""
    R, C = x.shape
    dev, f32, u8 = x.device, torch.float32, torch.uint8
    if tiled:
        s = torch.empty_strided((R // 128, C // 128), (C // 128, 1), dtype=f32, device=dev)
        st = torch.empty_strided((R // 128, C // 128), (1, R // 128), dtype=f32, device=dev)
    else:
        s = torch.empty_strided((R, C // 128), (1, R), dtype=f32, device=dev)
        st = torch.empty((R // 128, C), dtype=f32, device=dev)
    return (
        torch.empty((R, C) if rows else (0, 0), dtype=u8, device=dev),
        s if rows else torch.empty((0, 0), dtype=f32, device=dev),
        torch.empty((C, R) if cols else (0, 0), dtype=u8, device=dev),
        st if cols else torch.empty((0, 0), dtype=f32, device=dev),
    )


def _run_fast(x: torch.Tensor, elem: str, scale_rule: str, tiled: bool, rows: bool, cols: bool, config=None):
    name = "mx_fast_quantize_dual"
    _check_format(x, elem, scale_rule, name)
    cfg = {
        "num_warps": FAST_CUDA_WARPS if x.is_cuda else FAST_INTERPRET_WARPS,
        "TILES": 1,
        "SWEEP": False,
        **(config or {}),
    }
    if set(cfg) != {"num_warps", "TILES", "SWEEP"} or cfg["TILES"] < 1 or (cfg["SWEEP"] and cfg["TILES"] > 1):
        raise ValueError(
            f"{name}: config takes num_warps, TILES (>= 1) and SWEEP (with TILES 1), got {config}"
        )
    if not (rows or cols):
        raise ValueError(f"{name} makes at least one copy: rows=True or cols=True")
    if x.dim() != 2 or x.shape[0] % 128 or x.shape[1] % 128:  # the kernel reads whole tiles
        raise ValueError(f"{name} needs a 2-D tensor with both sides multiples of 128, got {tuple(x.shape)}")
    x = x.contiguous()
    R, C = x.shape
    q, s, qt, st = _fast_outputs(x, tiled, rows, cols)
    if R and C:
        written = (q, s) if rows else (qt, st)  # stands in for the copy not written
        if config is None and autotuning(x.device):
            grid = lambda meta: (R // 128, -(-C // (128 * meta["TILES"])))  # noqa: E731
            kernel, launch = _tuned("mx_fast_quantize_dual")[grid], {}
        else:
            kernel = _mx_fast_kernel[(R // 128, -(-C // (128 * cfg["TILES"])))]
            launch = dict(cfg, num_stages=1)
        with on_device(x):
            kernel(
                x,
                *(q, s) if rows else written,
                *(qt, st) if cols else written,
                R,
                C,
                **mx_format(elem, scale_rule, hw_cvt(x)),
                TILED=tiled,
                ROWS=rows,
                COLS=cols,
                **launch,
            )
    fp8 = ELEM_FORMATS[elem].dtype
    return q.view(fp8), s, qt.view(fp8), st


def _quantize(x, elem, scale_rule, rows: bool, cols: bool, config, name):
    _check_format(x, elem, scale_rule, name)
    if x.dim() != 2 or (rows and x.shape[1] % 32) or (cols and x.shape[0] % 32):
        sides = "both sides" if rows and cols else ("columns" if rows else "rows")
        raise ValueError(f"{name} needs a 2-D tensor with {sides} multiples of 32, got {tuple(x.shape)}")
    if config is None and as_op():
        out = torch.ops.lowcomm.mx_quantize(x, elem, scale_rule, rows, cols)
    else:
        out = _run(x, elem, scale_rule, rows, cols, config, name)
    return copies_made(out, rows, cols)


def _check_format(x: torch.Tensor, elem: str, scale_rule: str, name: str) -> None:
    """What every MX quantize refuses before its shape: no Triton, the format, the rule, the dtype."""
    if not HAVE_TRITON:
        raise RuntimeError(f"{name} needs Triton ({TRITON_MISSING}); or use lowcomm.kernels.quantize_mx")
    if elem not in _EMAX:
        raise ValueError(f"elem must be 'e4m3' or 'e5m2', got {elem!r}")
    if scale_rule not in ("rceil", "floor"):
        raise ValueError(f"scale_rule must be 'rceil' or 'floor', got {scale_rule!r}")
    if x.dtype not in TRITON_READS:
        raise ValueError(f"{name} takes fp32, bf16 or fp16, got {x.dtype}")


def copies_made(out: tuple, rows: bool, cols: bool) -> tuple:
    """``(data, scales, t_data, t_scales)`` of a two-copy quantize with ``None`` for a copy not
    made (an operator returns empty tensors for it)."""
    return (*out[:2], None, None) if not cols else ((None, None, *out[2:]) if not rows else tuple(out))


def _shapes(x: torch.Tensor, rows: bool, cols: bool):
    """The four outputs' shapes; a copy not made is empty (an operator returns tensors, not None)."""
    R, C = x.shape
    return ((R, C), (R, C // 32)) if rows else ((0, 0), (0, 0)), ((R, C), (R // 32, C)) if cols else (
        (0, 0),
        (0, 0),
    )


def autotuning(device: torch.device) -> bool:
    """Whether a kernel launched on ``device`` without a config picks its tiles by timing the
    candidates (CUDA, unless LOWCOMM_AUTOTUNE=0)."""
    return device.type == "cuda" and os.environ.get("LOWCOMM_AUTOTUNE", "1") != "0"


def _grid(R: int, C: int, cfg: dict | None):
    """The (row, column) tiles' grid of a tile config, or of whichever the autotuner runs (None)."""
    if cfg is None:
        return lambda meta: (-(-R // meta["BLOCK_R"]), -(-C // meta["BLOCK_C"]))
    return (-(-R // cfg["BLOCK_R"]), -(-C // cfg["BLOCK_C"]))


def tile_configs(candidates) -> list:
    """Triton configs of tile candidates (``BLOCK_R``, ``BLOCK_C``, ``num_warps`` each; ``TILES``
    where the kernel takes it)."""
    tiles = [{k: c[k] for k in ("BLOCK_R", "BLOCK_C", "TILES") if k in c} for c in candidates]
    return [triton.Config(t, num_warps=c["num_warps"], num_stages=1) for t, c in zip(tiles, candidates)]


def _tuned(name: str):
    """A kernel autotuned over its candidates once per shape, copies and format (built on first
    use): :data:`TUNABLE` ``[name]()`` gives the kernel, the arguments its choice depends on (the
    tensors' dtypes count too) and the candidates."""
    if name not in _TUNED:
        kernel, key, configs = TUNABLE[name]()
        _TUNED[name] = autotuned(kernel, configs, key, _AUTOTUNE_BENCH)
    return _TUNED[name]


def autotuned(kernel, configs: list, key: list, do_bench):
    """``triton.autotune(configs, key=key, do_bench=do_bench)(kernel)``, built through Triton's
    ``Autotuner`` itself: triton 3.2's decorator takes ``do_bench`` but does not hand it on, so
    its autotuner timed with the driver's own benchmarker (and, without a GPU's driver, could
    not be made at all)."""
    from triton.runtime.autotuner import Autotuner

    return Autotuner(kernel, kernel.arg_names, configs, key, None, None, do_bench=do_bench)


#: the kernels autotuned on CUDA, by name: a function returning (kernel, key, configs).
#: ``mx_quantize_dual`` (the MX quantize) over QUANTIZE_CUDA_CONFIGS' tiles and warps,
#: ``mx_fast_quantize_dual`` over FAST_CUDA_CONFIGS, ``mx_dequantize`` over
#: DEQUANT_CUDA_CONFIGS; lowcomm.kernels.triton_fp8 adds
#: the fp8 quantize's two kernels.
TUNABLE: dict = {
    "mx_quantize_dual": lambda: (
        _mx_dual_kernel,
        ["R", "C", "ROWS", "COLS", "E5M2", "RCEIL"],
        tile_configs(QUANTIZE_CUDA_CONFIGS),
    ),
    "mx_dequantize": lambda: (
        _mx_dequant_kernel,
        ["R", "C", "AXIS", "E5M2"],
        tile_configs(DEQUANT_CUDA_CONFIGS),
    ),
    "mx_fast_quantize_dual": lambda: (
        _mx_fast_kernel,
        ["R", "C", "ROWS", "COLS", "E5M2", "TILED"],
        [
            triton.Config({"TILES": c["TILES"], "SWEEP": c["SWEEP"]}, num_warps=c["num_warps"], num_stages=1)
            for c in FAST_CUDA_CONFIGS
        ],
    ),
}
#: the autotuned kernels by name (:func:`_tuned`)
_TUNED: dict = {}


def _quick_bench(kernel_call, quantiles=None):
    """How the autotuner times a candidate on the GPU: the GPU's time alone, 20 calls back to back
    (:func:`~lowcomm.kernels.timing.gpu_ms`), not Triton's benchmarker, whose time is the host's
    where a launch costs the host more than the kernel takes the GPU: at a model's activations
    (16384 x 1024 bf16 at 2 TB/s: 25 us) the candidates would be told apart by noise. A model
    with a dozen tensor shapes and two fp8 kernels each (five candidates) tunes in about a
    second."""
    from .timing import gpu_ms

    return gpu_ms(kernel_call, calls=20, quantiles=quantiles)


#: how the autotuner times a candidate (tests on CPU set their own, with _TUNED emptied)
_AUTOTUNE_BENCH = _quick_bench


def tuned_configs() -> dict[str, list]:
    """Every choice the autotuners have made in this process, for benchmarks: by kernel name, one
    ``[key, config]`` a tuned shape (the key: the arguments the choice depends on, then the
    tensors' dtypes; the config: tiles and warps), in the order they were tuned. What a training
    run's layers took at the model's shapes."""
    out = {}
    for name, tuner in sorted(_TUNED.items()):
        cache = getattr(tuner, "cache", None) or {}
        out[name] = [[list(key), {**c.kwargs, "num_warps": c.num_warps}] for key, c in cache.items()]
    return out


def last_tuned_config(name: str = "mx_quantize_dual") -> dict | None:
    """What the autotuner picked for ``name``'s last launch (tiles and warps; None before any), for
    benchmarks."""
    best = getattr(_TUNED.get(name), "best_config", None)
    return None if best is None else {**best.kwargs, "num_warps": best.num_warps}


def _run(x, elem: str, scale_rule: str, rows: bool, cols: bool, config: dict | None, name: str):
    cfg = dict(QUANTIZE_CUDA_CONFIG if x.device.type == "cuda" else QUANTIZE_INTERPRET_CONFIG)
    unknown = set(config or {}) - set(cfg)
    if unknown:
        raise ValueError(f"{name}: unknown config keys {sorted(unknown)}; allowed: {sorted(cfg)}")
    cfg.update(config or {})
    if cfg["BLOCK_R"] % 32 or cfg["BLOCK_C"] % 32 or cfg["TILES"] < 1:
        raise ValueError(f"{name}: tiles must be multiples of 32 (TILES >= 1), got {cfg}")
    tune = config is None and autotuning(x.device)
    x = x.contiguous()
    R, C = x.shape
    (rq, rs), (cq, cs) = _shapes(x, rows, cols)
    row_q = torch.empty(rq, dtype=torch.uint8, device=x.device)
    row_s = torch.empty(rs, dtype=torch.uint8, device=x.device)
    col_q = torch.empty(cq, dtype=torch.uint8, device=x.device)
    col_s = torch.empty(cs, dtype=torch.uint8, device=x.device)
    if R and C:
        written = (row_q, row_s) if rows else (col_q, col_s)  # stands in for the copy not written
        if tune:
            grid = lambda meta: (-(-R // meta["BLOCK_R"]), -(-C // (meta["BLOCK_C"] * meta["TILES"])))  # noqa: E731
            kernel = _tuned("mx_quantize_dual")[grid]
            cfg = {}
        else:
            kernel = _mx_dual_kernel[(-(-R // cfg["BLOCK_R"]), -(-C // (cfg["BLOCK_C"] * cfg["TILES"])))]
        with on_device(x):
            kernel(
                x,
                *(row_q, row_s) if rows else written,
                *(col_q, col_s) if cols else written,
                R,
                C,
                **mx_format(elem, scale_rule, hw_cvt(x)),
                ROWS=rows,
                COLS=cols,
                **cfg,
            )
    return row_q.view(ELEM_FORMATS[elem].dtype), row_s, col_q.view(ELEM_FORMATS[elem].dtype), col_s


if AS_OPS:
    # an operator torch.compile keeps whole: its launch (pointers, strides) is not traced
    # the schema is spelled out: torch 2.4 cannot read it from this module's string annotations
    @torch.library.custom_op(
        "lowcomm::mx_quantize",
        mutates_args=(),
        schema="(Tensor x, str elem, str scale_rule, bool rows, bool cols) "
        "-> (Tensor, Tensor, Tensor, Tensor)",
    )
    def _mx_quantize_op(
        x: torch.Tensor, elem: str, scale_rule: str, rows: bool, cols: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _run(x, elem, scale_rule, rows, cols, None, "mx_quantize")

    @_mx_quantize_op.register_fake
    def _(x, elem, scale_rule, rows, cols):
        (rq, rs), (cq, cs) = _shapes(x, rows, cols)
        dtype = ELEM_FORMATS[elem].dtype
        u8 = torch.uint8
        return (
            x.new_empty(rq, dtype=dtype),
            x.new_empty(rs, dtype=u8),
            x.new_empty(cq, dtype=dtype),
            x.new_empty(cs, dtype=u8),
        )

    @torch.library.custom_op(
        "lowcomm::mx_dequantize",
        mutates_args=(),
        schema="(Tensor data, Tensor scales, bool rows, bool e5m2) -> Tensor",
    )
    def _mx_dequantize_op(data: torch.Tensor, scales: torch.Tensor, rows: bool, e5m2: bool) -> torch.Tensor:
        return _run_dequant(data, scales, rows, e5m2)

    @_mx_dequantize_op.register_fake
    def _(data, scales, rows, e5m2):
        return data.new_empty(data.shape, dtype=torch.bfloat16)

    @torch.library.custom_op(
        "lowcomm::mx_fast_quantize",
        mutates_args=(),
        schema="(Tensor x, str elem, str scale_rule, bool tiled, bool rows, bool cols) "
        "-> (Tensor, Tensor, Tensor, Tensor)",
    )
    def _mx_fast_quantize_op(
        x: torch.Tensor, elem: str, scale_rule: str, tiled: bool, rows: bool, cols: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _run_fast(x, elem, scale_rule, tiled, rows, cols)

    @_mx_fast_quantize_op.register_fake
    def _(x, elem, scale_rule, tiled, rows, cols):
        q, s, qt, st = _fast_outputs(x, tiled, rows, cols)
        fp8 = ELEM_FORMATS[elem].dtype
        return q.view(fp8), s, qt.view(fp8), st
