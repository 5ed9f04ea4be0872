"""fp8 quantization in Triton (dynamic tensorwise and rowwise, delayed tensorwise), both copies.

A Linear's three GEMMs want every operand with its contraction axis contiguous (cuBLASLt: A
row-major, B column-major), so each of x, W and dy is needed twice: as it is, scaled along its
last axis, and transposed, scaled along its first axis (docs/references.md, "FP8 on Hopper,
measured"). :func:`fp8_quantize_dual` makes both from a (R, C) tensor in two passes over it:

    1. amax:  one read; absolute maxima per row and per column (rowwise) or of the whole tensor
              (tensorwise), kept as the integer bits of non-negative floats so that ``atomic_max``
              orders them (a NaN's bits are above infinity's, as torch's amax propagates NaN);
    2. cast:  one read; the scales from the maxima (each written out by one program), ``x``
              times each scale's reciprocal, clamped, rounded to the fp8 grid and written twice,
              as (R, C) and transposed as (C, R), each row of the copy contiguous.

Two launches and one fill of the maxima's buffer, nothing between them: the scales are
:func:`lowcomm.kernels.gemm.fp8_scale` of the maxima in the same arithmetic, and every byte equals
:func:`lowcomm.kernels.quantize_fp8`'s (tested): one IEEE division (``div_rn``) per scale for its
reciprocal, a multiplication per element, the clamp and the rounding half to even the GPU's fp8
conversion (in the interpreter, fp32 arithmetic first: the kernel
shares :func:`~lowcomm.kernels.triton_quantize.hw_cvt` with the MX quantizer). Tensorwise
scaling makes the transposed copy from the same scale, so each tensor is quantized once.

Both copies need two reads whatever the kernel: the transposed copy's scales are maxima over
every row, known only after the whole tensor was read. One rowwise copy (evaluation, or a
backward that needs only dx or only dW) is made in one: a program per slice of whole rows (or
columns) takes the slice's maxima, then casts it, the second loop reading the slice from L2.

:func:`fp8_quantize_scaled` is the one-pass form for delayed scaling: the tensorwise scale is
known before the tensor is read (from earlier steps' maxima), so the cast pass alone makes both
copies (the same kernel, ``GIVEN``) and, in a training step, records this tensor's maximum on
the way (``RECORD``).

Runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it).
"""

from __future__ import annotations

import functools
import os

import torch

from . import triton_quantize
from .formats import ELEM_FORMATS, FP8_MIN_SCALE, TRITON_READS
from .triton_quantize import (
    _EMAX,
    AS_OPS,
    HAVE_TRITON,
    TRITON_MISSING,
    TUNABLE,
    _grid,
    _tuned,
    as_op,
    copies_made,
    hw_cvt,
    mx_format,
    on_device,
    tile_configs,
)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .triton_quantize import _abs_bits, _fp8_bytes, _load_block, _load_block_raw, _load_tile

    _MIN_SCALE: tl.constexpr = tl.constexpr(FP8_MIN_SCALE)  # what a kernel reads of a global

__all__ = [
    "fp8_quantize_dual",
    "fp8_quantize_dual_torch",
    "fp8_quantize_scaled",
    "fp8_transpose",
    "fp8_delayed_step",
    "SCALINGS",
]

SCALINGS = ("tensorwise", "rowwise")

if HAVE_TRITON:

    @triton.jit
    def _fp8_amax_kernel(
        x_ptr,
        row_ptr,
        col_ptr,
        R,
        C,
        TENSOR: tl.constexpr,
        ROWS: tl.constexpr,
        COLS: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # one (BLOCK_R, BLOCK_C) tile: its maxima go into int32 buffers (zeros at the start) by
        # atomic max on the bits of |x| (sign bit cleared), which order like the floats
        rows, cols, _, _, x = _load_tile(x_ptr, R, C, BLOCK_R, BLOCK_C)
        bits = _abs_bits(x)
        if TENSOR:
            tl.atomic_max(row_ptr, tl.max(tl.max(bits, axis=1), axis=0))
        else:
            if ROWS:
                tl.atomic_max(row_ptr + rows, tl.max(bits, axis=1), mask=rows < R)
            if COLS:
                tl.atomic_max(col_ptr + cols, tl.max(bits, axis=0), mask=cols < C)

    @triton.jit
    def _to_fp8_bytes(
        x,
        inverse,
        MAXV: tl.constexpr,
        MBITS: tl.constexpr,
        MIN_NORMAL: tl.constexpr,
        SUB_C: tl.constexpr,
        E5M2: tl.constexpr,
        NAN_BYTE: tl.constexpr,
        HW_CVT: tl.constexpr,
    ):
        # fp8_cast's (x * inverse).clamp(-max, max).to(fp8), ``inverse`` from _fp8_inverse: a
        # clamp that keeps NaN, the rounding half to even. HW_CVT: both are the GPU's conversion
        # (cvt.rn.satfinite: finite values past the format's largest, and infinities, become it)
        y = x * inverse
        if not HW_CVT:
            y = tl.where(y > MAXV, MAXV, tl.where(y < -MAXV, -MAXV, y))
        return _fp8_bytes(y, y != y, HW_CVT, MBITS, MIN_NORMAL, SUB_C, E5M2, NAN_BYTE)

    @triton.jit
    def _fp8_scale_of(bits, MAXV: tl.constexpr):
        # fp8_scale's arithmetic from a maximum kept as the bits of |x|: amax / max (IEEE
        # division) but at least FP8_MIN_SCALE, 1 for a zero or NaN maximum
        amax = bits.to(tl.float32, bitcast=True)
        return tl.where(amax > 0, tl.maximum(tl.math.div_rn(amax, MAXV), _MIN_SCALE), 1.0)

    @triton.jit
    def _fp8_inverse(scale):
        # fp8_cast's multiplier: 1 / max(scale, FP8_MIN_SCALE), an IEEE division per scale (a row's,
        # a column's or the tensor's), not per element
        return tl.math.div_rn(1.0, tl.maximum(scale, _MIN_SCALE))

    @triton.jit
    def _fp8_cast_kernel(
        x_ptr,
        row_scale_ptr,
        col_scale_ptr,
        q_ptr,
        qt_ptr,
        amax_ptr,
        R,
        C,
        MAXV: tl.constexpr,
        MBITS: tl.constexpr,
        MIN_NORMAL: tl.constexpr,
        SUB_C: tl.constexpr,
        E5M2: tl.constexpr,
        NAN_BYTE: tl.constexpr,
        HW_CVT: tl.constexpr,
        TENSOR: tl.constexpr,
        ROWS: tl.constexpr,
        COLS: tl.constexpr,
        GIVEN: tl.constexpr,
        RECORD: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # one tile read once; ROWS writes q (R, C) scaled per row (or by the tensor's scale), COLS
        # writes qt (C, R) = the tile transposed, scaled per column of x (or by the tensor's scale).
        # GIVEN (tensorwise, a scale given in advance in row_scale_ptr, written nowhere): with
        # RECORD also |x|'s maximum into amax_ptr, as the amax kernel keeps it (atomic max on the
        # bits), the same read; without, amax_ptr is not touched (evaluation). Otherwise
        # (dynamic scaling) amax_ptr holds the amax kernel's maxima (R + C of them rowwise: rows
        # first; one tensorwise) and the kernel takes the scales from them, the programs of the
        # first block column writing the rows' scales into row_scale_ptr, those of the first block
        # row the columns' into col_scale_ptr (program (0, 0) both, tensorwise)
        rows, cols, inside, offs, x = _load_tile(x_ptr, R, C, BLOCK_R, BLOCK_C)
        if GIVEN:
            s = tl.load(row_scale_ptr)
            inv_row = _fp8_inverse(s)
            inv_col = inv_row
            if RECORD:
                tl.atomic_max(amax_ptr, tl.max(tl.max(_abs_bits(x), axis=1), axis=0))
        elif TENSOR:
            s = _fp8_scale_of(tl.load(amax_ptr), MAXV)
            inv_row = _fp8_inverse(s)
            inv_col = inv_row
            if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
                if ROWS:  # a copy not made has no scale to write (its buffer is empty)
                    tl.store(row_scale_ptr, s)
                if COLS:
                    tl.store(col_scale_ptr, s)
        else:
            s_row = _fp8_scale_of(tl.load(amax_ptr + rows, mask=rows < R, other=0), MAXV)
            s_col = _fp8_scale_of(tl.load(amax_ptr + R + cols, mask=cols < C, other=0), MAXV)
            if ROWS:
                if tl.program_id(1) == 0:
                    tl.store(row_scale_ptr + rows, s_row, mask=rows < R)
            if COLS:
                if tl.program_id(0) == 0:
                    tl.store(col_scale_ptr + cols, s_col, mask=cols < C)
            inv_row = _fp8_inverse(s_row)[:, None]  # a division per row and column, not per element
            inv_col = _fp8_inverse(s_col)[None, :]
        if ROWS:
            q = _to_fp8_bytes(x, inv_row, MAXV, MBITS, MIN_NORMAL, SUB_C, E5M2, NAN_BYTE, HW_CVT)
            tl.store(q_ptr + offs, q, mask=inside)
        if COLS:
            qt = tl.trans(_to_fp8_bytes(x, inv_col, MAXV, MBITS, MIN_NORMAL, SUB_C, E5M2, NAN_BYTE, HW_CVT))
            offs_t = cols.to(tl.int64)[:, None] * R + rows[None, :]
            tl.store(qt_ptr + offs_t, qt, mask=tl.trans(inside))

    @triton.jit
    def _fp8_one_copy_kernel(
        x_ptr,
        scale_ptr,
        q_ptr,
        R,
        C,
        MAXV: tl.constexpr,
        MBITS: tl.constexpr,
        MIN_NORMAL: tl.constexpr,
        SUB_C: tl.constexpr,
        E5M2: tl.constexpr,
        NAN_BYTE: tl.constexpr,
        HW_CVT: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
        WHOLE: tl.constexpr,
    ):
        # rowwise scaling, one copy, one program per slice of whole rows (ROWS: q (R, C), a scale
        # per row) or of whole columns (qt (C, R), a scale per column): the slice's maxima, then
        # its cast. The second loop reads the slice again, from L2 (a few hundred KB per program),
        # so x leaves memory once.
        # WHOLE (rows, BLOCK_C >= C): a slice is one block, read once into registers, its maxima
        # and its cast taken from them (a softmax's pattern: no re-read, from L2 or memory).
        if WHOLE:
            r0 = tl.program_id(0) * BLOCK_R
            rows, _, inside, offs, x = _load_block(x_ptr, R, C, r0, 0, BLOCK_R, BLOCK_C)
            scale = _fp8_scale_of(tl.max(_abs_bits(x), axis=1), MAXV)
            tl.store(scale_ptr + rows, scale, mask=rows < R)
            inverse = _fp8_inverse(scale)
            q = _to_fp8_bytes(x, inverse[:, None], MAXV, MBITS, MIN_NORMAL, SUB_C, E5M2, NAN_BYTE, HW_CVT)
            tl.store(q_ptr + offs, q, mask=inside)
        else:
            # the maxima as bits of |x| (ordered like the floats, NaN above inf), kept per element
            # across the loop and reduced once after it (one cross-thread reduction, not one a block)
            acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int32)
            if ROWS:
                r0 = tl.program_id(0) * BLOCK_R
                for c0 in range(0, C, BLOCK_C):
                    _, _, _, _, x = _load_block(x_ptr, R, C, r0, c0, BLOCK_R, BLOCK_C)
                    acc = tl.maximum(acc, _abs_bits(x))
                top = tl.max(acc, axis=1)
            else:
                c0 = tl.program_id(0) * BLOCK_C
                for r0 in range(0, R, BLOCK_R):
                    _, _, _, _, x = _load_block(x_ptr, R, C, r0, c0, BLOCK_R, BLOCK_C)
                    acc = tl.maximum(acc, _abs_bits(x))
                top = tl.max(acc, axis=0)
            scale = _fp8_scale_of(top, MAXV)
            inverse = _fp8_inverse(scale)
            if ROWS:
                rows = r0 + tl.arange(0, BLOCK_R)
                tl.store(scale_ptr + rows, scale, mask=rows < R)
                for c0 in range(0, C, BLOCK_C):
                    _, _, inside, offs, x = _load_block(x_ptr, R, C, r0, c0, BLOCK_R, BLOCK_C)
                    q = _to_fp8_bytes(
                        x, inverse[:, None], MAXV, MBITS, MIN_NORMAL, SUB_C, E5M2, NAN_BYTE, HW_CVT
                    )
                    tl.store(q_ptr + offs, q, mask=inside)
            else:
                cols = c0 + tl.arange(0, BLOCK_C)
                tl.store(scale_ptr + cols, scale, mask=cols < C)
                for r0 in range(0, R, BLOCK_R):
                    rows, cols, inside, _, x = _load_block(x_ptr, R, C, r0, c0, BLOCK_R, BLOCK_C)
                    q = _to_fp8_bytes(
                        x, inverse[None, :], MAXV, MBITS, MIN_NORMAL, SUB_C, E5M2, NAN_BYTE, HW_CVT
                    )
                    offs_t = cols.to(tl.int64)[:, None] * R + rows[None, :]
                    tl.store(q_ptr + offs_t, tl.trans(q), mask=tl.trans(inside))

    @triton.jit
    def _fp8_delayed_step_kernel(
        amax_ptr, hist_ptr, fmax_ptr, scale_ptr, L, SHIFT: tl.constexpr, BLOCK_L: tl.constexpr
    ):
        # delayed scaling's bookkeeping for one layer's three tensors (x, W, dy) in one launch.
        # SHIFT (a training step): each history row (L maxima, newest first) moves one step and
        # takes the maximum recorded since the last training step, which restarts at 0. Then each
        # tensor's scale: fp8_scale of its history's largest finite maximum over its format's max
        rows = tl.arange(0, 4)  # 3 rows, padded to a power of two
        cols = tl.arange(0, BLOCK_L)
        live = (rows[:, None] < 3) & (cols[None, :] < L)
        offs = rows[:, None] * L + cols[None, :]
        if SHIFT:
            older = tl.load(hist_ptr + offs - 1, mask=live & (cols[None, :] > 0), other=0.0)
            amax = tl.load(amax_ptr + rows, mask=rows < 3, other=0.0)
            hist = tl.where(cols[None, :] == 0, amax[:, None], older)
            tl.debug_barrier()  # every element read before any is written over
            tl.store(hist_ptr + offs, hist, mask=live)
            tl.store(amax_ptr + rows, tl.zeros_like(amax), mask=rows < 3)
        else:
            hist = tl.load(hist_ptr + offs, mask=live, other=0.0)
        finite = live & (hist == hist) & (tl.abs(hist) <= 3.4028234663852886e38)  # not NaN, not inf
        top = tl.max(tl.where(finite, hist, 0.0), axis=1)
        fmax = tl.load(fmax_ptr + rows, mask=rows < 3, other=1.0)
        scale = tl.where(top > 0, tl.maximum(tl.math.div_rn(top, fmax), _MIN_SCALE), 1.0)
        tl.store(scale_ptr + rows * 4, scale, mask=rows < 3)  # 16 bytes apart: see _fp8_delayed_step

    @triton.jit
    def _transpose_bytes_kernel(x_ptr, y_ptr, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # y (C, R) = x (R, C) transposed, both of one-byte elements: a tile read along x's rows,
        # written along y's (the transpose through shared memory), no arithmetic
        r0 = tl.program_id(0) * BLOCK_R
        c0 = tl.program_id(1) * BLOCK_C
        rows, cols, inside, _, x = _load_block_raw(x_ptr, R, C, r0, c0, BLOCK_R, BLOCK_C)
        tl.store(y_ptr + cols.to(tl.int64)[:, None] * R + rows[None, :], tl.trans(x), mask=tl.trans(inside))


# Tiles per program. CUDA: 64 x 64 with 8 warps, 16 elements a thread, chosen by compiling for
# sm_90a on CPU: the rowwise cast writing both copies takes 69 registers (122 with 4 warps, which
# would leave 16 warps per SM for a bandwidth-bound kernel), no spills, 4 KiB of shared memory for
# the transpose. On the H200 it ran the dual quantize at 0.94 TB/s (rowwise) and 1.09
# (tensorwise), a quarter of copy bandwidth, where the MX quantize's autotuner found small tiles on
# one warp fastest (32 x 64, 1 warp: 1.73 TB/s, from 0.71 at 32 x 128 on 8 warps). So on CUDA
# the amax and cast kernels are each autotuned over these candidates once per shape and flags
# (LOWCOMM_AUTOTUNE=0 pins the first, the tile measured); every candidate writes the same bytes
# (tested). The interpreter runs 32 x 32 tiles.
FP8_CUDA_CONFIGS = (
    {"BLOCK_R": 64, "BLOCK_C": 64, "num_warps": 8},
    {"BLOCK_R": 64, "BLOCK_C": 64, "num_warps": 4},
    {"BLOCK_R": 32, "BLOCK_C": 64, "num_warps": 1},
    {"BLOCK_R": 32, "BLOCK_C": 32, "num_warps": 1},
    {"BLOCK_R": 32, "BLOCK_C": 128, "num_warps": 4},
)
FP8_CUDA_CONFIG = FP8_CUDA_CONFIGS[0]
FP8_INTERPRET_CONFIG = {"BLOCK_R": 32, "BLOCK_C": 32, "num_warps": 4}
# One rowwise copy in one pass (a program per slice of whole rows or columns), keyed by ROWS: the
# rows' slices 16 x 256 on 4 warps (loads of 512 contiguous bytes, 32 elements a thread), the
# columns' 64 x 64 on 8 warps (the transposed store writes 64-byte runs of qt). Not measured yet.
FP8_ONE_COPY_CUDA = {
    True: {"BLOCK_R": 16, "BLOCK_C": 256, "num_warps": 4},
    False: {"BLOCK_R": 64, "BLOCK_C": 64, "num_warps": 8},
}
# Rows up to WHOLE_ROW_MAX long instead go a block per slice of whole rows (the kernel's WHOLE):
# read once into registers, no re-read. The slices' loop read each slice twice, the second time
# from L2, which on the H200 (2026-12-04) made 1.9-2.4 TB/s of a's rows with 512-1024 programs of
# 256 KB each in flight, more than its L2 holds. A block holds at least WHOLE_ROW_ELEMS elements,
# 64 a thread (4 warps for rows up to 8192 long, 8 at 16384; compiled for sm_90a: 80-126
# registers, no spills, the fp8 copy in 16-byte stores). Not measured on a GPU yet.
WHOLE_ROW_MAX = 16384
WHOLE_ROW_ELEMS = 8192
# The one pass has a program per slice, so a tensor with few slices gives the GPU few programs:
# a weight's columns (4096 to 14336 rows, 64 columns a slice: 64-224 programs on 132 SMs) were
# copied at about 0.8-1.0 TB/s on the H200 (2026-12-04, read off the rowwise GEMM rows with and
# without their quantize, less the rows' copy and the output's conversion), where 512-1024 slices
# of rows ran 1.9-2.4 TB/s and tensorwise's two passes over (row, column) tiles 1.7-2.5 TB/s
# (BENCHMARKS.md). So on CUDA one pass is taken only where its grid gives every SM at least this
# many programs, two passes over tiles elsewhere (the same bytes).
ONE_PASS_PROGRAMS_PER_SM = 2


if HAVE_TRITON:
    TUNABLE["fp8_amax"] = lambda: (
        _fp8_amax_kernel,
        ["R", "C", "TENSOR", "ROWS", "COLS"],
        tile_configs(FP8_CUDA_CONFIGS),
    )
    TUNABLE["fp8_cast"] = lambda: (
        _fp8_cast_kernel,
        ["R", "C", "E5M2", "TENSOR", "ROWS", "COLS", "GIVEN", "RECORD"],
        tile_configs(FP8_CUDA_CONFIGS),
    )


def fp8_quantize_dual(
    x: torch.Tensor,
    elem: str = "e4m3",
    scaling: str = "rowwise",
    *,
    rows: bool = True,
    cols: bool = True,
    config: dict | None = None,
):
    """The fp8 copies of a 2-D tensor that fprop, dgrad and wgrad read, in two passes over it.

    Args:
        x: (R, C) fp32 / bf16 / fp16; CUDA, or CPU under ``TRITON_INTERPRET=1``.
        elem: "e4m3" or "e5m2".
        scaling: "tensorwise" (one scale for both copies) or "rowwise".
        rows, cols: which copies to make (at least one).
        config: tile overrides (``BLOCK_R``, ``BLOCK_C``: powers of two; ``num_warps``).

    Returns:
        ``(q, q_scale, qt, qt_scale)``: ``q, q_scale = quantize_fp8(x, elem, scaling, axis=-1)``
        and ``qt = d.t().contiguous()`` with ``d, qt_scale = quantize_fp8(x, elem, scaling,
        axis=0)`` (so ``qt`` is (C, R), each row contiguous); ``None`` for a copy not made.

    Raises:
        RuntimeError: triton is not installed. ValueError: shape, dtype, elem, scaling or config.

    Without ``config``, under torch.compile, it runs as the operator
    ``torch.ops.lowcomm.fp8_quantize_dual``, which the compiler keeps whole (so ``fullgraph=True``
    compiles around it); eager, it launches directly (:func:`~.triton_quantize.as_op`).
    """
    _check(x, elem, scaling, rows, cols)
    if config is None and as_op():
        out = torch.ops.lowcomm.fp8_quantize_dual(x, elem, scaling, rows, cols)
    else:
        out = _fp8_quantize_dual(x, elem, scaling, rows, cols, config)
    return copies_made(out, rows, cols)


def fp8_quantize_dual_torch(
    x: torch.Tensor, elem: str = "e4m3", scaling: str = "rowwise", *, rows=True, cols=True
):
    """:func:`fp8_quantize_dual` in torch ops: the same bytes and scales (tested), ``None`` for a
    copy not made. What the fp8 layers quantize with under torch.compile when
    ``LOWCOMM_COMPILED_QUANTIZE=inductor``: the compiler then generates the maxima and the casts
    itself and can fuse them into the kernel that produced ``x`` (a layer norm, a GELU), where the
    Triton operator is a pass of its own over ``x`` that it keeps whole. Rowwise, compiled on a
    GPU, the copy scaled per column is cast in ``x``'s layout and transposed by
    :func:`fp8_transpose`, as :func:`fp8_quantize_scaled_torch` does; tensorwise, Inductor writes
    both copies from one kernel tiled for the transpose, reading ``x`` again after its maximum."""
    from .gemm import quantize_fp8

    _check_copies("fp8_quantize_dual_torch", x, elem, rows, cols)
    if scaling == "tensorwise":  # one maximum and one cast for both copies
        data, scale = quantize_fp8(x, elem, "tensorwise")
        out = (data, scale, data.t().contiguous(), scale.clone())
    elif scaling == "rowwise":
        q, s = quantize_fp8(x, elem, "rowwise", axis=-1) if rows else (None, None)
        d, st = quantize_fp8(x, elem, "rowwise", axis=0) if cols else (None, None)
        # the copy scaled per column, cast in x's layout, then transposed
        out = (q, s, None if d is None else _transposed_copy(d), st)
    else:
        raise ValueError(f"scaling must be one of {list(SCALINGS)}, got {scaling!r}")
    return copies_made(out, rows, cols)


def _check(x: torch.Tensor, elem: str, scaling: str, rows: bool, cols: bool) -> None:
    if not HAVE_TRITON:
        raise RuntimeError(f"fp8_quantize_dual needs Triton ({TRITON_MISSING}); or use quantize_fp8")
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {list(SCALINGS)}, got {scaling!r}")
    _check_copies("fp8_quantize_dual", x, elem, rows, cols)
    if x.dtype not in TRITON_READS:
        raise ValueError(f"fp8_quantize_dual takes fp32, bf16 or fp16, got {x.dtype}")


def _check_copies(name: str, x: torch.Tensor, elem: str, rows: bool, cols: bool) -> None:
    """What every fp8 quantize of this module refuses: the format, no copy asked for, not 2-D."""
    if elem not in _EMAX:
        raise ValueError(f"elem must be 'e4m3' or 'e5m2', got {elem!r}")
    if not (rows or cols):
        raise ValueError(f"{name} makes at least one copy: rows=True or cols=True")
    if x.dim() != 2:
        raise ValueError(f"{name} takes a 2-D tensor, got shape {tuple(x.shape)}")


def _shapes(x: torch.Tensor, scaling: str, rows: bool, cols: bool):
    """The four outputs' shapes; a copy not made is empty (an operator returns tensors, not None)."""
    R, C = x.shape
    tensor = scaling == "tensorwise"
    return (
        (R, C) if rows else (0, 0),
        (() if tensor else (R, 1)) if rows else (0,),
        (C, R) if cols else (0, 0),
        (() if tensor else (1, C)) if cols else (0,),
    )


def _fp8_quantize_dual(
    x: torch.Tensor, elem: str, scaling: str, rows: bool, cols: bool, config=None, one_pass: bool = True
):
    """:func:`fp8_quantize_dual` after its checks: four tensors, empty for a copy not made. One
    rowwise copy (without ``config``) is made in one pass over x where that fills the GPU
    (:func:`_one_pass_fills`) unless ``one_pass=False``."""
    if one_pass and scaling == "rowwise" and rows != cols and config is None and _one_pass_fills(x, rows):
        return _fp8_one_copy(x, elem, rows)
    cfg = dict(FP8_CUDA_CONFIG if x.device.type == "cuda" else FP8_INTERPRET_CONFIG)
    unknown = set(config or {}) - set(cfg)
    if unknown:
        raise ValueError(f"fp8_quantize_dual: unknown config keys {sorted(unknown)}; allowed: {sorted(cfg)}")
    cfg.update(config or {})
    if any(cfg[k] < 16 or cfg[k] & (cfg[k] - 1) for k in ("BLOCK_R", "BLOCK_C")):
        raise ValueError(f"fp8_quantize_dual: tiles must be powers of two of at least 16, got {cfg}")
    tune = config is None and triton_quantize.autotuning(x.device)
    x = x.contiguous()
    R, C = x.shape
    tensor = scaling == "tensorwise"
    dev = x.device
    shapes = _shapes(x, scaling, rows, cols)
    # the maxima as int32 bits, rows' then columns' (rowwise), in one buffer: one fill, and the
    # cast kernel finds both at one pointer
    amax = torch.zeros(1 if tensor else R + C, dtype=torch.int32, device=dev)
    q = torch.empty(shapes[0], dtype=torch.uint8, device=dev)
    qt = torch.empty(shapes[2], dtype=torch.uint8, device=dev)
    s_rows = torch.empty(shapes[1], dtype=torch.float32, device=dev)
    s_cols = torch.empty(shapes[3], dtype=torch.float32, device=dev)
    if R and C:
        cfg = None if tune else cfg  # None: the autotuned kernels pick their tiles
        kernel = _tuned("fp8_amax") if tune else _fp8_amax_kernel
        with on_device(x):
            kernel[_grid(R, C, cfg)](
                x, amax, amax[0 if tensor else R:], R, C, TENSOR=tensor, ROWS=rows, COLS=cols, **(cfg or {})
            )  # fmt: skip
        # the scales are taken from the maxima by the cast kernel, which writes them out
        _launch_cast(x, s_rows, s_cols, q, qt, amax, elem, tensor, rows, cols, False, False, cfg)
    else:  # nothing to read: every maximum is 0, so every scale is 1
        s_rows.fill_(1.0)
        s_cols.fill_(1.0)
    return q.view(ELEM_FORMATS[elem].dtype), s_rows, qt.view(ELEM_FORMATS[elem].dtype), s_cols


def _format(elem: str, hw: bool) -> dict:
    """The element format's constants every fp8 kernel takes (the MX kernels' less the scale
    rule's), in their parameter order; ``hw``: compiled for a GPU (:func:`hw_cvt`)."""
    fmt = mx_format(elem, "rceil", hw)
    return {k: fmt[k] for k in ("MAXV", "MBITS", "MIN_NORMAL", "SUB_C", "E5M2", "NAN_BYTE", "HW_CVT")}


def _launch_cast(x, s_rows, s_cols, q, qt, amax, elem, tensor, rows, cols, given, record, cfg) -> None:
    """The cast kernel over (R, C) x: q and/or qt written; ``given``: by the scale in ``s_rows``
    (tensorwise), maxima into ``amax`` if ``record``; else by the scales from the maxima in ``amax``.
    ``cfg`` None: the autotuned kernel (its maxima's atomic max and its stores give the same
    result however often the autotuner runs it)."""
    R, C = x.shape
    kernel = _tuned("fp8_cast") if cfg is None else _fp8_cast_kernel
    with on_device(x):
        kernel[_grid(R, C, cfg)](
            x,
            s_rows if rows else s_cols,  # stand in for the copy not written (never written)
            s_cols if cols else s_rows,
            q if rows else qt,
            qt if cols else q,
            amax,
            R,
            C,
            **_format(elem, hw_cvt(x)),
            TENSOR=tensor,
            ROWS=rows,
            COLS=cols,
            GIVEN=given,
            RECORD=record,
            **(cfg or {}),
        )


def _one_pass_fills(x: torch.Tensor, rows: bool) -> bool:
    """Whether one rowwise copy of ``x`` is made in one pass (:func:`_fp8_one_copy`): always in the
    interpreter; on CUDA where its grid gives each SM :data:`ONE_PASS_PROGRAMS_PER_SM` programs."""
    sms = _sm_count(x.device)
    if sms is None:
        return True
    return _slices(*x.shape, rows, one_copy_config(x.shape, rows)) >= ONE_PASS_PROGRAMS_PER_SM * sms


def one_copy_config(shape, rows: bool) -> dict:
    """The one pass's tiles on CUDA for an (R, C) tensor: whole rows in one block where C is at
    most :data:`WHOLE_ROW_MAX` (``BLOCK_C`` C to the next power of two, ``BLOCK_R`` rows enough for
    :data:`WHOLE_ROW_ELEMS` elements, 64 a thread); else :data:`FP8_ONE_COPY_CUDA`'s slices."""
    C = shape[1]
    if not rows or C > WHOLE_ROW_MAX:
        return FP8_ONE_COPY_CUDA[rows]
    block_c = max(16, 1 << (C - 1).bit_length())
    block_r = max(1, WHOLE_ROW_ELEMS // block_c)
    return {"BLOCK_R": block_r, "BLOCK_C": block_c, "num_warps": block_r * block_c // (64 * 32)}


def _slices(R: int, C: int, rows: bool, cfg: dict) -> int:
    """The one-pass copy's programs: one per slice of ``BLOCK_R`` whole rows, or of ``BLOCK_C``
    whole columns."""
    return -(-R // cfg["BLOCK_R"]) if rows else -(-C // cfg["BLOCK_C"])


def _sm_count(device: torch.device) -> int | None:
    """The streaming multiprocessors of a CUDA device; None elsewhere."""
    if device.type != "cuda":
        return None
    return _cuda_sm_count(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _fp8_one_copy(x: torch.Tensor, elem: str, rows: bool, config: dict | None = None):
    """One rowwise copy in one pass: q (R, C) with a scale per row (``rows``), or qt (C, R) with a
    scale per column of x; the four tensors of :func:`_fp8_quantize_dual`. ``config``: the tiles
    (default: :func:`one_copy_config` on CUDA, 32 x 32 in the interpreter); rows that fit one
    block (``BLOCK_C`` >= C) are read once into it."""
    cfg = config or (one_copy_config(x.shape, rows) if x.device.type == "cuda" else FP8_INTERPRET_CONFIG)
    x = x.contiguous()
    R, C = x.shape
    shapes = _shapes(x, "rowwise", rows, not rows)
    q = torch.empty(shapes[0] if rows else shapes[2], dtype=torch.uint8, device=x.device)
    scale = torch.empty(R if rows else C, dtype=torch.float32, device=x.device)
    if R and C:
        with on_device(x):
            grid = (_slices(R, C, rows, cfg),)
            whole = rows and cfg["BLOCK_C"] >= C
            _fp8_one_copy_kernel[grid](
                x, scale, q, R, C, **_format(elem, hw_cvt(x)), ROWS=rows, WHOLE=whole, **cfg
            )
    q = q.view(ELEM_FORMATS[elem].dtype)
    none_q, none_s = torch.empty((0, 0), dtype=q.dtype, device=x.device), scale.new_empty(0)
    if rows:
        return q, scale.reshape(shapes[1]), none_q, none_s
    return none_q, none_s, q, scale.reshape(shapes[3])


def fp8_quantize_scaled(
    x: torch.Tensor,
    scale: torch.Tensor,
    elem: str = "e4m3",
    *,
    rows: bool = True,
    cols: bool = True,
    amax: torch.Tensor | None = None,
    index: int = 0,
):
    """Tensorwise fp8 copies of a 2-D tensor from a scale known in advance, in one pass over it.

    Delayed scaling (TransformerEngine's default recipe): the scale comes from the absolute maxima
    of earlier steps, so the cast needs no maximum of this tensor first; the maximum it reads on
    the way is recorded for the steps that follow. One read of ``x`` instead of the two of
    :func:`fp8_quantize_dual`; a value beyond the earlier steps' range saturates at the format's
    largest value.

    Args:
        x: (R, C) fp32 / bf16 / fp16.
        scale: fp32 tensor of one element (shape ()), ``x ≈ data * scale``.
        elem: "e4m3" or "e5m2".
        rows, cols: which copies to make (at least one).
        amax: optional fp32 1-D tensor on ``x``'s device: ``amax[index]`` becomes
            ``max(amax[index], max|x|)`` (NaN if ``x`` holds one), in place.

    Returns:
        ``(q, scale, qt, scale)`` as :func:`fp8_quantize_dual` returns them for tensorwise
        scaling, ``None`` for a copy not made. Every byte equals
        :func:`lowcomm.kernels.gemm.fp8_cast` of ``x`` (tested).

    Runs the Triton kernel on CUDA (or on CPU under ``TRITON_INTERPRET=1``), under torch.compile
    as the operator ``torch.ops.lowcomm.fp8_quantize_scaled`` (the compiler keeps it whole);
    elsewhere torch ops write the same bytes.
    """
    from .gemm import _triton_reads

    _check_copies("fp8_quantize_scaled", x, elem, rows, cols)
    if scale.numel() != 1 or scale.dtype != torch.float32:
        raise ValueError(f"scale must be one fp32 value, got {scale.dtype} of shape {tuple(scale.shape)}")
    for name, t in (("scale", scale), ("amax", amax)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    if amax is not None and (amax.dim() != 1 or amax.dtype != torch.float32 or not 0 <= index < len(amax)):
        raise ValueError(
            f"amax must be a 1-D fp32 tensor with an entry at index {index}, got {amax.dtype} of "
            f"shape {tuple(amax.shape)}"
        )
    scale = scale.reshape(())
    if not _triton_reads(x):
        return fp8_quantize_scaled_torch(x, scale, elem, rows=rows, cols=cols, amax=amax, index=index)
    record = amax is not None
    if amax is None:
        amax = scale.new_zeros(1)
    if as_op():
        out = torch.ops.lowcomm.fp8_quantize_scaled(x, scale, amax, index, elem, rows, cols, record)
    else:
        # the copies' scale is ``scale`` itself where it starts 16-byte aligned, as cuBLASLt reads
        # scales; a view into the delayed recipe's (3,) scales at 4 or 8 bytes gets its own
        aligned = scale.data_ptr() % 16 == 0
        out = _fp8_quantize_scaled(x, scale, amax, index, elem, rows, cols, record, own_scales=not aligned)
    return copies_made(out, rows, cols)


def fp8_quantize_scaled_torch(x, scale, elem="e4m3", *, rows=True, cols=True, amax=None, index=0):
    """:func:`fp8_quantize_scaled` in torch ops (the same bytes and maxima), where Triton does not
    run or the GEMMs are emulated, and under torch.compile (``LOWCOMM_COMPILED_QUANTIZE=inductor``);
    arguments as checked there.

    Under torch.compile on CUDA (where torch has ``torch.library.triton_op``) the transposed copy
    is made from the fp8 copy by :func:`fp8_transpose`, a kernel the compiler calls as it is, and
    the maximum is taken along rows first. Inductor then casts ``x`` and records its maximum in
    the kernel that makes ``x`` (a layer norm, a GELU, a gradient's sum), one read, and no kernel
    of its own writes a transposed copy: given the cast and the transpose together, it either
    wrote the transposed copy across a row reduction's loop (the pattern of the looped reductions
    that took about 13 ms of a 47 ms compiled fp8_rowwise step on an H200: docs/references.md,
    "Inductor's transposed stores") or read ``x`` a second time for the maximum
    (benchmarks/inductor_codegen.py counts both)."""
    from .gemm import fp8_cast

    data = fp8_cast(x, scale, elem)
    opaque = cols and _transposes_as_op(data)
    if amax is not None:
        top = x.abs().amax(dim=-1).amax() if opaque else x.abs().amax()  # the same value
        amax[index] = torch.maximum(amax[index], top.float())
    scale = scale.reshape(())
    return (
        data if rows else None,
        scale.clone() if rows else None,
        _transposed_copy(data) if cols else None,
        scale.clone() if cols else None,
    )


#: :func:`fp8_transpose`'s tiles on CUDA: 128 x 128 bytes on 8 warps (the interpreter: 32 x 32)
TRANSPOSE_CUDA_CONFIG = {"BLOCK_R": 128, "BLOCK_C": 128, "num_warps": 8}
#: whether torch.compile can launch :func:`fp8_transpose`'s kernel from its graph as it is
#: (``torch.library.triton_op``: torch 2.6; not the interpreter's kernels, which it cannot launch)
TRITON_OP = AS_OPS and hasattr(torch.library, "triton_op") and os.environ.get("TRITON_INTERPRET") != "1"


def _transposes_as_op(q: torch.Tensor) -> bool:
    """Whether the torch-ops quantize (:func:`fp8_quantize_scaled_torch`, rowwise
    :func:`fp8_quantize_dual_torch`) makes its transposed copy by the ``lowcomm::fp8_transpose``
    operator: while torch.compile traces the cast of a tensor that Triton runs on, not on the CPU
    (a GPU's, or a meta tensor standing for one)."""
    from .gemm import _triton_runs_on

    return (
        TRITON_OP and q.device.type != "cpu" and _triton_runs_on(q.device) and torch.compiler.is_compiling()
    )


def _transposed_copy(q: torch.Tensor) -> torch.Tensor:
    """The torch-ops routes' transposed copy of an fp8 copy: ``q.t().contiguous()``, which the
    compiler may fuse anywhere, or, where :func:`_transposes_as_op`, fp8_transpose's operator."""
    return torch.ops.lowcomm.fp8_transpose(q) if _transposes_as_op(q) else q.t().contiguous()


def fp8_transpose(q: torch.Tensor) -> torch.Tensor:
    """The (C, R) contiguous copy of a 2-D tensor ``q`` (R, C) of one-byte elements (an fp8 copy):
    one tiled Triton kernel on CUDA (and on CPU under ``TRITON_INTERPRET=1``), the operator
    ``torch.ops.lowcomm.fp8_transpose`` under torch.compile, ``q.t().contiguous()`` elsewhere.
    The same bytes whichever runs (tested)."""
    from .gemm import _triton_runs_on

    if q.dim() != 2 or q.element_size() != 1:
        raise ValueError(
            f"fp8_transpose takes a 2-D tensor of one-byte elements, got {q.dtype} {tuple(q.shape)}"
        )
    if not _triton_runs_on(q.device):
        return q.t().contiguous()
    if _transposes_as_op(q):
        return torch.ops.lowcomm.fp8_transpose(q)
    return _fp8_transpose(q)


def _fp8_transpose(q: torch.Tensor, wrap=None) -> torch.Tensor:
    """:func:`fp8_transpose`'s launch. ``wrap``: torch.library.wrap_triton, in the operator's body,
    which torch.compile traces: the fp8 tensors handed over as they are (Inductor cannot pass a
    dtype view to a kernel; the kernel only moves bytes, as fp8 on sm_89 and later). Else their
    bytes, as the interpreter reads them."""
    q = q.contiguous()
    R, C = q.shape
    out = torch.empty((C, R), dtype=q.dtype, device=q.device)
    if R and C:
        cfg = FP8_INTERPRET_CONFIG if q.device.type == "cpu" else TRANSPOSE_CUDA_CONFIG
        grid = (triton.cdiv(R, cfg["BLOCK_R"]), triton.cdiv(C, cfg["BLOCK_C"]))
        kernel = _transpose_bytes_kernel if wrap is None else wrap(_transpose_bytes_kernel)
        pair = (q, out) if wrap is not None else (q.view(torch.uint8), out.view(torch.uint8))
        with on_device(q):
            kernel[grid](*pair, R, C, **cfg)
    return out


def _fp8_quantize_scaled(
    x, scale, amax, index: int, elem: str, rows: bool, cols: bool, record: bool, own_scales: bool = True
):
    """:func:`fp8_quantize_scaled` in Triton after its checks: four tensors, empty for a copy not
    made. ``own_scales``: each copy's scale is a tensor of its own, as an operator's outputs must
    be (they may not alias its inputs); else both are ``scale`` itself (a copy launch less each)."""
    tune = triton_quantize.autotuning(x.device)  # (looked up in its module: tests stand in for it)
    cfg = None if tune else dict(FP8_CUDA_CONFIG if x.is_cuda else FP8_INTERPRET_CONFIG)
    x = x.contiguous()
    R, C = x.shape
    shapes = _shapes(x, "tensorwise", rows, cols)
    q = torch.empty(shapes[0], dtype=torch.uint8, device=x.device)
    qt = torch.empty(shapes[2], dtype=torch.uint8, device=x.device)
    if R and C:  # the maxima as int32 bits: non-negative floats' bits order like the floats
        bits = amax.view(torch.int32)[index:] if record else amax.view(torch.int32)  # not read
        _launch_cast(x, scale, scale, q, qt, bits, elem, True, rows, cols, True, record, cfg)
    empty = scale.new_empty(0)
    own = scale.clone if own_scales else lambda: scale
    return (
        q.view(ELEM_FORMATS[elem].dtype),
        own() if rows else empty,
        qt.view(ELEM_FORMATS[elem].dtype),
        own() if cols else empty.clone(),
    )


def fp8_delayed_step(
    amax: torch.Tensor, history: torch.Tensor, fmax: torch.Tensor, shift: bool
) -> torch.Tensor:
    """Delayed scaling's bookkeeping for a layer's three tensors (x, W, dy), in one launch.

    Args:
        amax: (3,) fp32, the maxima recorded since the last training step.
        history: (3, L) fp32, contiguous, each row's maxima newest first.
        fmax: (3,) fp32, each tensor's format's largest value.
        shift: a training step: ``history`` moves one column and takes ``amax`` as its first, and
            ``amax`` restarts at zero (both in place).

    Returns:
        (3,) fp32 scales: :func:`~lowcomm.kernels.gemm.fp8_scale` of each row's largest finite
        maximum over ``fmax``, bit for bit what the layer's torch ops compute (tested), each 16
        bytes from the next (stride 4): cuBLASLt reads a scale only where it starts 16-byte
        aligned, so each can go to a GEMM as it is, without a copy of its own. On CUDA (or under
        ``TRITON_INTERPRET=1``); under torch.compile the operator
        ``torch.ops.lowcomm.fp8_delayed_step`` (contiguous scales: the quantize operators there
        give each copy a scale of its own anyway).
    """
    if as_op():
        return torch.ops.lowcomm.fp8_delayed_step(amax, history, fmax, shift)
    return _fp8_delayed_step(amax, history, fmax, shift)


def _fp8_delayed_step(amax, history, fmax, shift: bool) -> torch.Tensor:
    if not HAVE_TRITON:
        raise RuntimeError(f"fp8_delayed_step needs Triton ({TRITON_MISSING})")
    if amax.shape != (3,) or history.dim() != 2 or history.shape[0] != 3 or not history.is_contiguous():
        raise ValueError(
            f"fp8_delayed_step takes amax (3,) and a contiguous history (3, L), got "
            f"{tuple(amax.shape)} and {tuple(history.shape)}"
        )
    scales = torch.empty(3, 4, dtype=torch.float32, device=amax.device)  # the first column's used
    L = history.shape[1]
    with on_device(amax):
        _fp8_delayed_step_kernel[(1,)](
            amax, history, fmax, scales, L, SHIFT=shift, BLOCK_L=triton.next_power_of_2(L), num_warps=1
        )
    return scales[:, 0]


if AS_OPS:
    # the schema is spelled out: torch 2.4 cannot read it from this module's string annotations
    @torch.library.custom_op(
        "lowcomm::fp8_quantize_dual",
        mutates_args=(),
        schema="(Tensor x, str elem, str scaling, bool rows, bool cols) -> (Tensor, Tensor, Tensor, Tensor)",
    )
    def _fp8_quantize_dual_op(
        x: torch.Tensor, elem: str, scaling: str, rows: bool, cols: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _fp8_quantize_dual(x, elem, scaling, rows, cols)

    @_fp8_quantize_dual_op.register_fake
    def _(x, elem, scaling, rows, cols):
        shapes = _shapes(x, scaling, rows, cols)
        f32 = dict(dtype=torch.float32, device=x.device)
        return (
            x.new_empty(shapes[0], dtype=ELEM_FORMATS[elem].dtype),
            x.new_empty(shapes[1], **f32),
            x.new_empty(shapes[2], dtype=ELEM_FORMATS[elem].dtype),
            x.new_empty(shapes[3], **f32),
        )


if AS_OPS:

    @torch.library.custom_op(
        "lowcomm::fp8_quantize_scaled",
        mutates_args=("amax",),
        schema="(Tensor x, Tensor scale, Tensor(a!) amax, int index, str elem, bool rows, bool cols, "
        "bool record) -> (Tensor, Tensor, Tensor, Tensor)",
    )
    def _fp8_quantize_scaled_op(
        x: torch.Tensor,
        scale: torch.Tensor,
        amax: torch.Tensor,
        index: int,
        elem: str,
        rows: bool,
        cols: bool,
        record: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _fp8_quantize_scaled(x, scale, amax, index, elem, rows, cols, record)

    @_fp8_quantize_scaled_op.register_fake
    def _(x, scale, amax, index, elem, rows, cols, record):
        shapes = _shapes(x, "tensorwise", rows, cols)
        fp8 = ELEM_FORMATS[elem].dtype
        return (
            x.new_empty(shapes[0], dtype=fp8),
            scale.new_empty(shapes[1]),
            x.new_empty(shapes[2], dtype=fp8),
            scale.new_empty(shapes[3]),
        )


if TRITON_OP:

    @torch.library.triton_op("lowcomm::fp8_transpose", mutates_args=(), schema="(Tensor q) -> Tensor")
    def _fp8_transpose_op(q: torch.Tensor) -> torch.Tensor:
        return _fp8_transpose(q, wrap=torch.library.wrap_triton)


if AS_OPS:

    @torch.library.custom_op(
        "lowcomm::fp8_delayed_step",
        mutates_args=("amax", "history"),
        schema="(Tensor(a!) amax, Tensor(b!) history, Tensor fmax, bool shift) -> Tensor",
    )
    def _fp8_delayed_step_op(
        amax: torch.Tensor, history: torch.Tensor, fmax: torch.Tensor, shift: bool
    ) -> torch.Tensor:
        return _fp8_delayed_step(amax, history, fmax, shift).contiguous()

    @_fp8_delayed_step_op.register_fake
    def _(amax, history, fmax, shift):
        return amax.new_empty(3)


def static_specs() -> list:
    """The kernels as launched on CUDA, for :mod:`lowcomm.kernels.triton_static`."""
    from .triton_static import KernelSpec

    def spec(name: str, fn, pointers: dict, consts: dict, warps=FP8_CUDA_CONFIG["num_warps"]) -> KernelSpec:
        sig = {**pointers, "R": "i32", "C": "i32", **{k: "constexpr" for k in consts}}
        return KernelSpec(name, fn, sig, consts, num_warps=warps, num_stages=1, aligned=("R", "C"))

    cast = _format("e4m3", hw=True)  # as compiled for a GPU
    tiles = {k: FP8_CUDA_CONFIG[k] for k in ("BLOCK_R", "BLOCK_C")}
    cast_ptrs = {"x_ptr": "*bf16", "row_scale_ptr": "*fp32", "col_scale_ptr": "*fp32"}
    cast_ptrs.update(q_ptr="*u8", qt_ptr="*u8", amax_ptr="*i32")
    specs = []
    for scaling in SCALINGS:
        flags = dict(TENSOR=scaling == "tensorwise", ROWS=True, COLS=True, **tiles)
        amax_ptrs = {"x_ptr": "*bf16", "row_ptr": "*i32", "col_ptr": "*i32"}
        specs.append(spec(f"fp8_quantize_dual amax ({scaling}, bf16)", _fp8_amax_kernel, amax_ptrs, flags))
        name = f"fp8_quantize_dual cast ({scaling}, bf16 to e4m3)"
        specs.append(
            spec(name, _fp8_cast_kernel, cast_ptrs, {**cast, **flags, "GIVEN": False, "RECORD": False})
        )
    amax_ptrs = {"x_ptr": "*bf16", "row_ptr": "*i32", "col_ptr": "*i32"}
    for cfg in FP8_CUDA_CONFIGS[1:]:  # the autotuner's other candidates, for the rowwise pair
        at = f"{cfg['BLOCK_R']}x{cfg['BLOCK_C']}, {cfg['num_warps']} warps"
        flags = dict(TENSOR=False, ROWS=True, COLS=True, BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"])
        w = cfg["num_warps"]
        specs.append(
            spec(f"fp8_quantize_dual amax (rowwise, bf16; {at})", _fp8_amax_kernel, amax_ptrs, flags, w)
        )
        consts = {**cast, **flags, "GIVEN": False, "RECORD": False}
        specs.append(
            spec(
                f"fp8_quantize_dual cast (rowwise, bf16 to e4m3; {at})",
                _fp8_cast_kernel,
                cast_ptrs,
                consts,
                w,
            )
        )
    ptrs = {"x_ptr": "*bf16", "scale_ptr": "*fp32", "q_ptr": "*u8"}
    for rows in (True, False):
        name = f"fp8_quantize_dual one copy ({'rows' if rows else 'columns'}, rowwise, bf16 to e4m3)"
        cfg = FP8_ONE_COPY_CUDA[rows]
        consts = dict(**cast, ROWS=rows, WHOLE=False, BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"])
        specs.append(spec(name, _fp8_one_copy_kernel, ptrs, consts, cfg["num_warps"]))
    for C in (4096, 8192, WHOLE_ROW_MAX):  # whole rows: blocks of 2 rows and of 1 (4, 4 and 8 warps)
        cfg = one_copy_config((1, C), True)
        name = f"fp8_quantize_dual one copy (whole rows of {C}, rowwise, bf16 to e4m3)"
        consts = dict(**cast, ROWS=True, WHOLE=True, BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"])
        specs.append(spec(name, _fp8_one_copy_kernel, ptrs, consts, cfg["num_warps"]))
    name = "fp8_quantize_scaled (delayed tensorwise: cast + amax, bf16 to e4m3)"
    flags = dict(TENSOR=True, ROWS=True, COLS=True, GIVEN=True, RECORD=True, **tiles)
    specs.append(spec(name, _fp8_cast_kernel, cast_ptrs, {**cast, **flags}))
    blocks = {k: TRANSPOSE_CUDA_CONFIG[k] for k in ("BLOCK_R", "BLOCK_C")}
    for elem in ("u8", "fp8e4nv"):  # eager launches hand over the bytes, compiled graphs the fp8
        ptrs = {"x_ptr": f"*{elem}", "y_ptr": f"*{elem}"}
        name = f"fp8_transpose ({elem})"
        specs.append(spec(name, _transpose_bytes_kernel, ptrs, blocks, TRANSPOSE_CUDA_CONFIG["num_warps"]))
    step = {"amax_ptr": "*fp32", "hist_ptr": "*fp32", "fmax_ptr": "*fp32", "scale_ptr": "*fp32", "L": "i32"}
    name = "fp8_delayed_step (history of 16, a training step)"
    specs.append(KernelSpec(name, _fp8_delayed_step_kernel, step, {"SHIFT": True, "BLOCK_L": 16}, 1, 1))
    return specs
