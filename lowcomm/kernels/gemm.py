"""Low-precision GEMMs behind one dispatch function.

``qmatmul(a, b, recipe)`` computes ``a @ b`` (a: (M, K), b: (K, N)) with both operands quantized
along the contraction dimension K, accumulating in fp32, and returns fp32.

Recipes:
    ``fp8_tensorwise``: one fp32 scale per operand (amax / elem max), E4M3 (or E5M2).
    ``fp8_rowwise``: one scale per row of ``a`` and per column of ``b``.
    ``mxfp8``: MX, one E8M0 scale per 32 consecutive elements along K (rceil rule by default).
    ``mxfp8_fast``: MX data regrouped for a 1x128-blocked GEMM: each group of four 32-blocks takes
        the group's largest scale and the elements of the other blocks are re-rounded to E4M3 at
        that scale (double rounding; small values of a block much smaller than its neighbours can
        underflow). Not bit-exact MX; its error against the exact path is measured in BENCHMARKS.md.
        ``b_tile="128x128"`` blocks ``b`` (a weight) in 128x128 tiles instead: coarser still, and
        the pairing cuBLAS's blockwise GEMM runs fastest on sm_90 (the Linear layers use it).

Backends:
    ``emulated``: quantize with the torch reference, dequantize, fp32 matmul. Runs anywhere and is
        exact up to the fp32 accumulation order: the numerics every faster path is checked against.
    ``scaled_mm``: ``torch._scaled_mm`` on CUDA: tensorwise / rowwise on sm_89 and newer, MX (E8M0
        scales, 1x32 blocks) on sm_100 and newer, ``mxfp8_fast`` through the blockwise GEMM (1x128
        fp32 scales on both operands, bf16 output) on sm_90, where docs/references.md (FP8 on
        Hopper) reports it at about 1.3x cuBLAS bf16 at 8192^3 (cuBLASLt >= 12.9; not measured
        by this project yet).
    ``triton``: operands quantized by the fused Triton kernel (one pass each); MXFP8: the exact-MX
        Triton kernel that applies both operands' E8M0 scales in its K loop; MXFP8 fast: the same
        kernel with fp32 scales per 128 of K (for Hopper, which has no MX in cuBLAS; also CPU
        under ``TRITON_INTERPRET=1``).
    ``dequant``: MXFP8 only: operands quantized by the fused Triton kernel, dequantized exactly to
        bf16 (an MX value has at most 4 significant bits; bf16 has fp32's exponent range) and
        multiplied by the bf16 GEMM, whose products are exact and summed in fp32: exact MX at about
        bf16's speed on a GPU without MX in cuBLAS (sm_89, sm_90; torch >= 2.8 for its fp32 output).
    ``auto``: ``scaled_mm`` where the device can serve the recipe (for ``mxfp8_fast`` on sm_90: if a
        one-time probe finds the blockwise GEMM in this torch/cuBLAS, and for e4m3 operands with N a
        multiple of 16); on sm_90 otherwise ``dequant`` for ``mxfp8`` (``triton`` under torch < 2.8)
        and ``triton`` for ``mxfp8_fast``; else ``emulated``.

A request the chosen backend cannot serve raises a ValueError naming the reason; nothing falls
back silently unless ``backend="auto"`` was asked for.

References:
    OCP Microscaling Formats (MX) v1.0; NVIDIA, "Recipes for Pre-training LLMs with MXFP8" (2025).
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from .formats import FP8_MIN_SCALE, TRITON_READS, dequantize_mx, get_elem_format, quantize_mx

__all__ = [
    "regroup_mx_1x128",
    "RECIPES",
    "BACKENDS",
    "qmatmul",
    "quantize_fp8",
    "fake_quantize",
    "choose_backend",
    "to_cublas_blocked",
    "blockwise_scaled_mm_operands",
    "regroup_mx_128x128",
    "expand_block_scales",
    "scaled_mm_layout_error",
    "scaled_mm",
    "fp8_cast",
]

RECIPES = ("fp8_tensorwise", "fp8_rowwise", "mxfp8", "mxfp8_fast")
BACKENDS = ("auto", "emulated", "scaled_mm", "triton", "dequant")
MX_BLOCK = 32
_ACROSS = {"1x128": 1, "128x128": 128}  # mxfp8_fast tiles: elements per scale across the K axis
logger = logging.getLogger(__name__)


def quantize_fp8(x: torch.Tensor, elem: str = "e4m3", scaling: str = "tensorwise", axis: int = -1):
    """Dynamic fp8 scaling: ``x ≈ data.float() * scale``.

    Args:
        x: floating tensor.
        elem: "e4m3" or "e5m2".
        scaling: "tensorwise" (one scale) or "rowwise" (one scale per slice along ``axis``, i.e.
            per row when ``axis=-1``).
        axis: the reduction axis for rowwise scaling.

    Returns:
        ``(data, scale)``: fp8 data and fp32 scales (shape () or keepdim along ``axis``).
    """
    fmt = get_elem_format(elem)
    if fmt.dtype is None:
        raise ValueError(f"quantize_fp8 takes elem 'e4m3' or 'e5m2', got {elem!r}")
    xf = x.float()
    if scaling == "tensorwise":
        amax = xf.abs().amax()
    elif scaling == "rowwise":
        amax = xf.abs().amax(dim=axis, keepdim=True)
    else:
        raise ValueError(f"scaling must be 'tensorwise' or 'rowwise', got {scaling!r}")
    scale = fp8_scale(amax, elem)
    return fp8_cast(xf, scale, elem), scale


def fp8_cast(x: torch.Tensor, scale: torch.Tensor, elem: str = "e4m3") -> torch.Tensor:
    """``x`` times the reciprocal of ``scale`` (of at least :data:`FP8_MIN_SCALE`), clamped to the
    format's range and rounded to fp8 (NaN stays NaN): the cast of every fp8 scaling, dynamic or
    with a scale given in advance (delayed scaling). A multiplication by one reciprocal per scale,
    each correctly rounded, as the Triton kernels compute it (an IEEE division per element took
    about fifteen instructions of their sm_90 code each); within an ulp of fp32 of ``x / scale``
    before the rounding to fp8."""
    fmt = get_elem_format(elem)
    if fmt.dtype is None:
        raise ValueError(f"fp8_cast takes elem 'e4m3' or 'e5m2', got {elem!r}")
    inverse = 1.0 / scale.float().clamp(min=FP8_MIN_SCALE)
    y = (x.float() * inverse).clamp(-fmt.max, fmt.max)
    # one NaN byte, as the kernels write (an infinity times a zero reciprocal is a NaN whose sign
    # the CPU chooses)
    return y.masked_fill(y.isnan(), float("nan")).to(fmt.dtype)


def fp8_scale(amax: torch.Tensor, elem: str = "e4m3", *, fmax: torch.Tensor | None = None) -> torch.Tensor:
    """The dequantization scale of dynamic fp8 scaling from an absolute maximum: ``amax`` maps to
    the format's largest value (a scale of at least :data:`FP8_MIN_SCALE`); a zero (or NaN)
    ``amax`` gets scale 1. ``fmax``: the formats' largest values, one per entry of ``amax`` (fp32,
    on its device), instead of ``elem``'s."""
    top = get_elem_format(elem).max if fmax is None else fmax
    return torch.where(amax > 0, (amax / top).clamp(min=FP8_MIN_SCALE), 1.0)


def regroup_mx_1x128(data: torch.Tensor, scales: torch.Tensor, axis: int = -1):
    """MX (1x32 E8M0) operands -> 1x128 blocks: the group's largest scale, elements re-rounded.

    Args:
        data: fp8 (E4M3 or E5M2) blocked by 32 along ``axis`` (length a multiple of 128).
        scales: E8M0 bytes, ``shape[axis] // 32`` along ``axis``.

    Returns:
        ``(data128, scale128)``: data in the same fp8 format and fp32 power-of-two scales, one per
        128 along ``axis``.
    """
    return _regroup(data, scales, axis, 1)


def regroup_mx_128x128(data: torch.Tensor, scales: torch.Tensor, axis: int = 0):
    """2-D MX operands -> 128x128 tiles (DeepSeek-V3's weight blocks): one scale per tile, the
    largest of its 4 x 128 MX scales, elements re-rounded at it.

    Args:
        data: (R, C) fp8 blocked by 32 along ``axis``; both sides multiples of 128.
        scales: E8M0 bytes as ``quantize_mx(..., axis=axis)`` returns them.

    Returns:
        ``(data128, scale128)``: fp8 data in the same format, fp32 scales (R/128, C/128).
    """
    return _regroup(data, scales, axis, 128)


def _regroup(data: torch.Tensor, scales: torch.Tensor, axis: int, across: int):
    """Regroup MX blocks along ``axis`` to 128 along it and ``across`` along the other (2-D) axis."""
    if across > 1 and data.dim() != 2:
        raise ValueError(f"128x128 tiles need a 2-D operand, got shape {tuple(data.shape)}")
    axis = axis % data.dim()
    n = data.shape[axis]
    if n % 128 or (across > 1 and data.shape[1 - axis] % across):
        raise ValueError(
            f"regrouping to {across}x128 blocks needs multiples of 128 along axis {axis}"
            + (" and the other axis" if across > 1 else "")
            + f", got shape {tuple(data.shape)}"
        )
    x = dequantize_mx(data, scales, block=MX_BLOCK, axis=axis).movedim(axis, -1)
    s = scales.movedim(axis, -1).to(torch.int32)
    g = s.reshape(*s.shape[:-1], n // 128, 4).amax(dim=-1)  # the group's largest exponent
    if across > 1:  # (m, n/128) -> (m/128, n/128): the tile's largest
        g = g.reshape(-1, across, n // 128).amax(dim=1)
    scale = torch.ldexp(torch.ones_like(g, dtype=torch.float32), g - 127)
    xs = x / expand_block_scales(scale, x.shape)  # exact: powers of two
    fmax = torch.finfo(data.dtype).max  # the element format stays (E4M3, or E5M2 for gradients)
    q = xs.clamp(-fmax, fmax).to(data.dtype)  # the second rounding
    return q.movedim(-1, axis), scale.movedim(-1, axis)


def expand_block_scales(scale: torch.Tensor, shape) -> torch.Tensor:
    """Per-element multipliers from per-block ``scale``: each dim repeated ``shape[d] // scale.shape[d]``."""
    for d, (n, k) in enumerate(zip(shape, scale.shape)):
        if n != k:
            scale = scale.repeat_interleave(n // k, dim=d)
    return scale


def fake_quantize(
    x: torch.Tensor,
    recipe: str,
    axis: int,
    elem: str = "e4m3",
    scale_rule: str = "rceil",
    tile: str = "1x128",
):
    """What ``x`` becomes after quantization for ``recipe`` along ``axis`` (fp32, same shape).

    ``tile`` ("1x128" or "128x128", 2-D only) is the ``mxfp8_fast`` block shape.
    """
    if recipe == "mxfp8_fast":
        _check_tile(tile)
        axis = axis % x.dim()
        pads = [0, 0] * x.dim()  # F.pad order: last dim first
        pads[2 * (x.dim() - 1 - axis) + 1] = (-x.shape[axis]) % 128
        if tile == "128x128":
            pads[2 * axis + 1] = (-x.shape[1 - axis]) % 128
        xp = torch.nn.functional.pad(x, pads) if any(pads) else x
        data, scales = quantize_mx(xp, elem=elem, block=MX_BLOCK, scale_rule=scale_rule, axis=axis)
        q, s = _regroup(data, scales, axis, _ACROSS[tile])
        out = q.float() * expand_block_scales(s, q.shape)
        return out[tuple(slice(0, n) for n in x.shape)]
    if recipe == "mxfp8":
        data, scales = quantize_mx(x, elem=elem, block=MX_BLOCK, scale_rule=scale_rule, axis=axis)
        return dequantize_mx(data, scales, block=MX_BLOCK, axis=axis)
    if recipe in ("fp8_tensorwise", "fp8_rowwise"):
        data, scale = quantize_fp8(x, elem, "tensorwise" if recipe == "fp8_tensorwise" else "rowwise", axis)
        return data.float() * scale
    raise ValueError(f"unknown recipe {recipe!r}; allowed: {list(RECIPES)}")


def to_cublas_blocked(scales: torch.Tensor) -> torch.Tensor:
    """Rearrange a (rows, K/32) matrix of E8M0 scales into cuBLAS's block-scaling layout.

    cuBLAS (sm_100 block-scaled GEMMs) reads scales in tiles of 128 rows x 4 scale columns, the
    tiles in row-major order over (rows/128, cols/4), and inside a tile the scale of (r, c) at
    offset ``(r % 32) * 16 + (r // 32) * 4 + c``. Rows pad to 128 and columns to 4 with zeros.

    Returns:
        a flat uint8 tensor of ``ceil(rows/128)·128 · ceil(cols/4)·4`` bytes.
    """
    rows, cols = scales.shape
    R, C = -(-rows // 128), -(-cols // 4)
    padded = torch.zeros(R * 128, C * 4, dtype=torch.uint8, device=scales.device)
    padded[:rows, :cols] = scales.view(torch.uint8) if scales.dtype != torch.uint8 else scales
    tiles = padded.view(R, 128, C, 4).permute(0, 2, 1, 3)  # (R, C, 128, 4)
    # inside a tile: row r = 32·q + p goes to offset p·16 + q·4 + c
    tiles = tiles.reshape(R, C, 4, 32, 4).permute(0, 1, 3, 2, 4)  # (R, C, p, q, c)
    return tiles.reshape(-1)


def _capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def check_backend(backend: str, recipe: str, label: str | None = None) -> None:
    """Refuses a backend that is unknown, or that cannot serve ``recipe`` on any device (Triton
    serves the MX recipes only), naming ``label`` (default the recipe)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {list(BACKENDS)}")
    if backend == "triton" and recipe not in ("mxfp8", "mxfp8_fast"):
        raise ValueError(f"backend 'triton' serves mxfp8 and mxfp8_fast only, not {label or recipe}")
    if backend == "dequant" and recipe != "mxfp8":
        raise ValueError(f"backend 'dequant' serves mxfp8 only, not {label or recipe}")


def choose_backend(recipe: str, device: torch.device, backend: str = "auto", label: str | None = None) -> str:
    """The backend that serves ``recipe`` on ``device``; raises ValueError if an explicit one cannot
    (naming ``label``, default the recipe: a layer recipe built on this GEMM recipe names itself)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; allowed: {list(RECIPES)}")
    check_backend(backend, recipe, label)
    cap = _capability(device)
    if recipe == "mxfp8_fast":  # the blockwise (1x128 fp32 scales) cuBLAS GEMM: sm_90 only
        need = (9, 0)
        can_scaled_mm = cap is not None and cap[0] == 9 and hasattr(torch, "_scaled_mm")
        if backend == "auto" and can_scaled_mm:
            can_scaled_mm = _blockwise_scaled_mm_works(device)
    else:
        need = (10, 0) if recipe == "mxfp8" else (8, 9)
        can_scaled_mm = cap is not None and cap >= need and hasattr(torch, "_scaled_mm")
        if recipe == "mxfp8" and not hasattr(torch, "float8_e8m0fnu"):  # MX scales' dtype: torch 2.7
            can_scaled_mm = False
    label = label or recipe
    if backend == "scaled_mm" and not can_scaled_mm:
        raise ValueError(
            f"backend 'scaled_mm' cannot serve {label} on {device} (capability {cap}); it needs CUDA sm_"
            f"{need[0]}{need[1]}{' exactly' if recipe == 'mxfp8_fast' else ' or newer'}"
            f"{' and torch >= 2.7 (float8_e8m0fnu scales)' if recipe == 'mxfp8' else ''}. "
            "Use backend='emulated' or 'auto'"
        )
    if backend in ("triton", "dequant"):
        if not _triton_runs_on(device):
            from .triton_quantize import TRITON_MISSING

            why = f"; {TRITON_MISSING}" if TRITON_MISSING else ""
            raise ValueError(
                f"backend {backend!r} needs Triton and CUDA (or TRITON_INTERPRET=1 on CPU); got {device}{why}"
            )
    if backend == "dequant" and cap is not None and not _dequant_runs_on(cap):
        raise ValueError(
            f"backend 'dequant' cannot serve {label} on {device} (capability {cap}): it needs sm_89 or "
            f"newer (Triton's fp8 conversions) and torch >= 2.8 (torch.mm's out_dtype; this is "
            f"{torch.__version__}). Use backend='emulated' or 'auto'"
        )
    if backend == "auto":
        if can_scaled_mm:
            return "scaled_mm"
        if recipe in ("mxfp8", "mxfp8_fast") and cap is not None and cap[0] == 9:
            from .triton_quantize import HAVE_TRITON

            if not HAVE_TRITON:
                return "emulated"
            return "dequant" if recipe == "mxfp8" and _dequant_runs_on(cap) else "triton"
        return "emulated"
    return backend


def _dequant_runs_on(cap: tuple[int, int]) -> bool:
    """Whether the ``dequant`` backend runs on a GPU of capability ``cap`` with this torch."""
    from .triton_mx_gemm import MM_OUT_DTYPE

    return cap >= (8, 9) and MM_OUT_DTYPE


def qmatmul(
    a: torch.Tensor,
    b: torch.Tensor,
    recipe: str = "mxfp8",
    *,
    elem_a: str = "e4m3",
    elem_b: str = "e4m3",
    backend: str = "auto",
    scale_rule: str = "rceil",
    b_tile: str = "1x128",
    fast_accum: bool = False,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``a @ b`` with both operands quantized along K; an fp32 result (or ``out_dtype``).

    Args:
        a: (M, K). b: (K, N). For ``mxfp8`` K is zero-padded to a multiple of 32.
        recipe: one of :data:`RECIPES`.
        elem_a, elem_b: element formats ("e4m3" or "e5m2"; gradients may use "e5m2").
        backend: one of :data:`BACKENDS`.
        scale_rule: MX scale rule ("rceil" or "floor").
        b_tile: ``mxfp8_fast`` only: "1x128" or "128x128" blocks for ``b`` (a weight: one scale
            per 128x128 tile, DeepSeek-V3's weight granularity; coarser, and the pairing cuBLAS runs
            fastest on sm_90, docs/references.md). N is zero-padded to a multiple of 128 for it.
        fast_accum: fp8 tensorwise and rowwise in ``torch._scaled_mm``: the fp8 MMA sums over
            the whole of K in its own precision (:func:`scaled_mm`); no effect on the other
            recipes and backends, whose sums are fp32.
        out_dtype: torch.float32 or torch.bfloat16: the result's dtype, written by the GEMM where
            it can (cuBLAS's fp8 rowwise and blockwise GEMMs write bf16 only: an fp32 result is
            their output converted, one more pass over it; the dequant backend's fp32 result on
            CUDA needs torch >= 2.8, its bf16 one does not).

    Raises:
        ValueError: shapes that do not match or that the recipe cannot take, an unknown recipe,
            backend or ``out_dtype``, or a backend the device cannot serve.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"qmatmul needs (M, K) @ (K, N), got {tuple(a.shape)} @ {tuple(b.shape)}")
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"qmatmul: out_dtype must be torch.float32 or torch.bfloat16, got {out_dtype}")
    if _check_tile(b_tile) != "1x128" and recipe != "mxfp8_fast":
        raise ValueError(f"b_tile={b_tile!r} is a block shape of recipe 'mxfp8_fast', not {recipe!r}")
    block = {"mxfp8": MX_BLOCK, "mxfp8_fast": 128}.get(recipe)
    pad = (-a.shape[1]) % block if block else 0
    if pad:  # zero blocks change no product; MX needs whole blocks along K (groups of 4 for the fast path)
        a = torch.nn.functional.pad(a, (0, pad))
        b = torch.nn.functional.pad(b, (0, 0, 0, pad))
    n_pad = (-b.shape[1]) % 128 if b_tile == "128x128" else 0
    if n_pad:  # zero columns: whole 128x128 tiles; their outputs are cut off below
        return qmatmul(
            a, torch.nn.functional.pad(b, (0, n_pad)), recipe, elem_a=elem_a, elem_b=elem_b,
            backend=backend, scale_rule=scale_rule, b_tile=b_tile, fast_accum=fast_accum,
            out_dtype=out_dtype,
        )[:, : b.shape[1]]  # fmt: skip
    which = choose_backend(recipe, a.device, backend)
    if which == "scaled_mm" and recipe == "mxfp8_fast":
        why = _blockwise_refusal(a, b, elem_a, elem_b)
        if why and backend == "auto":
            from .triton_quantize import HAVE_TRITON

            which = "triton" if HAVE_TRITON else "emulated"
        elif why:
            raise ValueError(f"the blockwise _scaled_mm cannot serve this mxfp8_fast GEMM: {why}")
    if which == "scaled_mm":
        y = _scaled_mm(a, b, recipe, elem_a, elem_b, scale_rule, b_tile, fast_accum, out_dtype)
        return y.to(out_dtype)
    if which == "dequant":
        from .triton_mx_gemm import mx_dequant_matmul

        return mx_dequant_matmul(*_mx_operands(a, b, elem_a, elem_b, scale_rule), out_dtype=out_dtype)
    if which == "triton":
        from .triton_mx_gemm import blockwise_matmul, mx_matmul

        operands = _mx_operands(a, b, elem_a, elem_b, scale_rule)
        if recipe == "mxfp8_fast":
            qa, ga, qb, gb = _fast_operands(*operands, b_tile)
            gb = expand_block_scales(gb, (gb.shape[0], qb.shape[1]))  # per column: what the kernel reads
            return blockwise_matmul(qa, ga, qb, gb.contiguous(), out_dtype=out_dtype)
        return mx_matmul(*operands, out_dtype=out_dtype)
    qa = fake_quantize(a, recipe, axis=1, elem=elem_a, scale_rule=scale_rule)
    qb = fake_quantize(b, recipe, axis=0, elem=elem_b, scale_rule=scale_rule, tile=b_tile)
    return (qa @ qb).to(out_dtype)


def _triton_runs_on(device: torch.device) -> bool:
    """Whether lowcomm's Triton kernels run on ``device``: CUDA, or CPU under TRITON_INTERPRET=1."""
    from .triton_quantize import HAVE_TRITON

    return HAVE_TRITON and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def _mx_operands(a: torch.Tensor, b: torch.Tensor, elem_a: str, elem_b: str, scale_rule: str):
    """``(da, sa, db, sb)``: ``a`` MX-blocked along K (axis 1), ``b`` along K (axis 0). The fused
    Triton quantize (one pass each) where it runs, else the torch reference: the same bytes (tested)."""
    if not _triton_runs_on(a.device):
        da, sa = quantize_mx(a, elem=elem_a, block=MX_BLOCK, scale_rule=scale_rule, axis=1)
        db, sb = quantize_mx(b, elem=elem_b, block=MX_BLOCK, scale_rule=scale_rule, axis=0)
        return da, sa, db, sb
    from .triton_quantize import mx_quantize

    # what the kernel reads (the reference quantizes fp32 as well)
    a, b = (t if t.dtype in TRITON_READS else t.float() for t in (a, b))
    return (*mx_quantize(a, elem_a, scale_rule, axis=1), *mx_quantize(b, elem_b, scale_rule, axis=0))


def _fast_operands(da, sa, db, sb, b_tile: str):
    """``(qa, ga, qb, gb)`` of ``mxfp8_fast`` from MX operands: A in 1x128 blocks, B in ``b_tile``."""
    return (*regroup_mx_1x128(da, sa, axis=1), *_regroup(db, sb, 0, _ACROSS[_check_tile(b_tile)]))


def _check_tile(tile: str) -> str:
    if tile not in _ACROSS:
        raise ValueError(f"the mxfp8_fast tile must be one of {list(_ACROSS)}, got {tile!r}")
    return tile


def blockwise_scaled_mm_operands(qa, ga, qb, gb):
    """Block-scaled operands laid out as ``torch._scaled_mm``'s blockwise GEMM checks them.

    ``qa`` (M, K) and ``qb`` (K, N) fp8 with fp32 dequantization scales ``ga`` (M, K/128) and
    ``gb`` either (K/128, N) (1x128 blocks along K) or (K/128, N/128) (128x128 tiles), as
    :func:`regroup_mx_1x128` / :func:`regroup_mx_128x128` return them. cuBLAS wants A row-major,
    B column-major, 1x128 scales "outer-dim-major" (``scale_a`` with strides (1, M); ``scale_b``
    whose transpose (N, K/128) has strides (1, N), i.e. ``scale_b`` row-major) and 128x128 scales
    inner-dim-major as seen from B's transpose (``scale_b.t()`` (N/128, K/128) row-major).

    Returns:
        ``(a, b, scale_a, scale_b)`` for ``torch._scaled_mm(a, b, scale_a, scale_b, ...)``.
    """
    tiled = gb.shape[1] != qb.shape[1]
    if tiled and qb.shape[0] == 128 and gb.shape[1] > 1:  # one block along K: a scale per column
        gb, tiled = gb.repeat_interleave(128, dim=1)[:, : qb.shape[1]], False
    scale_b = gb.t().contiguous().t() if tiled else gb.contiguous()
    return qa.contiguous(), qb.t().contiguous().t(), ga.t().contiguous().t(), scale_b


def scaled_mm_layout_error(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> str:
    """What in these ``torch._scaled_mm`` operands breaks ATen's and cuBLASLt's rules ("" if nothing).

    The rules (docs/references.md, FP8 on Hopper): ``a`` (M, K) row-major and ``b`` (K, N)
    column-major, both fp8; K and N multiples of 16 and leading dimensions 16-byte aligned (a byte
    per element); and by scaling mode: tensorwise, one fp32 scale each; rowwise, fp32 ``scale_a``
    (M, 1) and ``scale_b`` (1, N), contiguous, with a bf16 output; blockwise 1x128, fp32
    ``scale_a`` (M, K/128) with strides (1, M), and ``scale_b`` (K/128, N) row-major or (K/128,
    N/128) column-major for 128x128 tiles; MX, E8M0 scales swizzled to whole 128x4 tiles
    (:func:`to_cublas_blocked`). A ``bias`` (added in the GEMM's epilogue) is N contiguous values
    in the output's dtype, bf16 or fp16 (ATen refuses it with an fp32 output); this library fuses
    it only into tensorwise and rowwise GEMMs, the epilogue torchao's float8 layers use too.
    Checked on every call, on every device, so that CI (CPU) catches what would fail on a GPU.
    """
    why = _operand_layout_error(a, b, scale_a, scale_b, out_dtype)
    if why or bias is None:
        return why
    N = b.shape[1]
    if scale_a.numel() > 1 and scale_a.shape != (a.shape[0], 1):
        return "a bias is fused only into tensorwise and rowwise GEMMs"
    if out_dtype not in (torch.bfloat16, torch.float16):
        return f"a bias needs a bf16 or fp16 output, not {out_dtype}"
    if bias.shape != (N,) or bias.dtype != out_dtype or not bias.is_contiguous():
        got = f"{bias.dtype} of shape {tuple(bias.shape)}"
        return f"bias must be {N} contiguous {out_dtype} values, got {got}"
    return ""


def _operand_layout_error(a, b, scale_a, scale_b, out_dtype) -> str:
    """:func:`scaled_mm_layout_error` of the operands and scales."""
    fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        return f"shapes {tuple(a.shape)} @ {tuple(b.shape)} are not (M, K) @ (K, N)"
    M, K = a.shape
    N = b.shape[1]
    if a.dtype not in fp8 or b.dtype not in fp8:
        return f"operands must be fp8, got {a.dtype} and {b.dtype}"
    if a.stride(1) != 1 or (M > 1 and a.stride(0) < K):
        return f"a must be row-major, got strides {a.stride()} for shape {tuple(a.shape)}"
    if b.stride(0) != 1 or (N > 1 and b.stride(1) < K):
        return f"b must be column-major, got strides {b.stride()} for shape {tuple(b.shape)}"
    if K % 16 or N % 16:
        return f"K and N must be multiples of 16, got K={K}, N={N}"
    if (M > 1 and a.stride(0) % 16) or (N > 1 and b.stride(1) % 16):
        return f"leading dimensions must be 16-byte aligned, got {a.stride(0)} and {b.stride(1)}"
    if not torch.compiler.is_compiling():  # (a traced tensor has no address)
        for name, s in (("scale_a", scale_a), ("scale_b", scale_b)):
            if s.data_ptr() % 16:
                return f"{name} must start 16-byte aligned, got an address {s.data_ptr() % 16} bytes past"
    e8m0 = getattr(torch, "float8_e8m0fnu", None)
    if e8m0 is not None and scale_a.dtype == e8m0:  # MX: 1x32 blocks, swizzled
        want_a = -(-M // 128) * 128 * -(-(K // 32) // 4) * 4
        want_b = -(-N // 128) * 128 * -(-(K // 32) // 4) * 4
        if scale_b.dtype != e8m0 or scale_a.numel() != want_a or scale_b.numel() != want_b:
            return f"MX scales must be E8M0 swizzled to {want_a} and {want_b} bytes"
        return ""
    if scale_a.dtype != torch.float32 or scale_b.dtype != torch.float32:
        return f"scales must be fp32, got {scale_a.dtype} and {scale_b.dtype}"
    if scale_a.numel() == 1 and scale_b.numel() == 1:
        return ""  # tensorwise
    if scale_a.shape == (M, 1) and scale_b.shape == (1, N):
        if not (scale_a.is_contiguous() and scale_b.is_contiguous()):
            return "rowwise scales must be contiguous"
        if out_dtype != torch.bfloat16:
            return f"rowwise scaling writes bf16, not {out_dtype}"
        return ""
    if scale_a.shape == (M, K // 128) and K % 128 == 0:  # blockwise
        if M > 1 and K > 128 and scale_a.stride() != (1, M):
            return f"1x128 scale_a must have strides (1, M), got {scale_a.stride()}"
        if scale_b.shape == (K // 128, N):
            if N > 1 and K > 128 and scale_b.stride() != (N, 1):
                return f"1x128 scale_b must be row-major, got strides {scale_b.stride()}"
        elif scale_b.shape == (K // 128, N // 128) and N % 128 == 0:
            if K == 128 and N > 128:
                return (
                    "128x128 scale_b tiles need K > 128: with one block along K the H200's products "
                    "were wrong; pass one scale per column instead (rowwise scaling's shapes)"
                )
            if K > 128 and N > 128 and scale_b.stride() != (1, K // 128):
                return f"128x128 scale_b must be column-major, got strides {scale_b.stride()}"
        else:
            return f"blockwise scale_b must be (K/128, N) or (K/128, N/128), got {tuple(scale_b.shape)}"
        if out_dtype != torch.bfloat16:
            return f"blockwise scaling writes bf16, not {out_dtype}"
        return ""
    return f"no scaling mode takes scales of shapes {tuple(scale_a.shape)} and {tuple(scale_b.shape)}"


def scaled_mm(
    a, b, scale_a, scale_b, out_dtype: torch.dtype, fast_accum: bool = False, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``torch._scaled_mm`` after :func:`scaled_mm_layout_error` found nothing wrong.

    ``fast_accum`` (fp8 tensorwise and rowwise scaling only): the fp8 MMA's own running sum over
    the whole of K (about 14 bits on Hopper), where by default the sums are promoted to fp32 as
    they go (docs/references.md, FP8 on Hopper: what each costs). ``bias`` (tensorwise and
    rowwise, a bf16 or fp16 output): added to the fp32 sums in the GEMM's epilogue, before the
    output's one rounding, instead of a pass of its own over the output.

    Raises:
        ValueError: naming the rule the operands break (instead of cuBLASLt's error on a GPU).
    """
    why = scaled_mm_layout_error(a, b, scale_a, scale_b, out_dtype, bias)
    if why:
        raise ValueError(f"torch._scaled_mm operands break cuBLASLt's rules: {why}")
    kw = {} if bias is None else {"bias": bias}  # (a stand-in of the tests may not take one)
    return torch._scaled_mm(
        a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, use_fast_accum=fast_accum, **kw
    )


def _blockwise_refusal(a: torch.Tensor, b: torch.Tensor, elem_a: str, elem_b: str) -> str:
    """Why the blockwise _scaled_mm cannot take this GEMM ("" when it can)."""
    if elem_a != "e4m3" or elem_b != "e4m3":
        return f"it takes e4m3 operands (got {elem_a}, {elem_b}); the triton backend takes e5m2"
    if b.shape[1] % 16 or a.shape[1] % 128:
        return f"N must be a multiple of 16 and K of 128, got N={b.shape[1]}, K={a.shape[1]}"
    return ""


@functools.cache
def _blockwise_scaled_mm_works(device: torch.device) -> bool:
    """Whether this torch/cuBLAS runs the blockwise GEMM on ``device`` (cuBLASLt >= 12.9 and a torch
    that routes 1x128 fp32 scales): tried once on a 128x256x128 GEMM; ``auto`` uses Triton if not.
    K is two blocks: with one (K = 128) the scales' shapes, (M, 1) and (1, N), are rowwise scaling's
    too, which ATen takes first and torch has served on sm_90 since before the blockwise GEMM, so
    a torch without the blockwise GEMM would pass."""
    try:
        # zero bytes viewed as fp8: torch 2.4 cannot fill an fp8 tensor on a CPU
        q = torch.zeros(128, 256, device=device, dtype=torch.uint8).view(torch.float8_e4m3fn)
        g = torch.ones(128, 2, device=device)
        scaled_mm(*blockwise_scaled_mm_operands(q, g, q.t(), g.t()), out_dtype=torch.bfloat16)
        return True
    except (RuntimeError, ValueError, NotImplementedError) as e:
        logger.warning("blockwise torch._scaled_mm unavailable on %s (%s); mxfp8_fast uses Triton", device, e)
        return False


def _scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    recipe: str,
    elem_a: str,
    elem_b: str,
    scale_rule: str = "rceil",
    b_tile: str = "1x128",
    fast_accum: bool = False,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """torch._scaled_mm: a row-major, b column-major; scales are dequantization multipliers
    (``fast_accum``: fp8 tensorwise and rowwise only, see :func:`scaled_mm`). The result in
    ``out_dtype`` where cuBLAS writes it (tensorwise; MX), else in bf16 (rowwise, blockwise)."""
    if recipe == "mxfp8_fast":  # 1x128 x (1x128 | 128x128) fp32 block scales; writes bf16
        # M and N zero-padded to whole 128-blocks (cut off the output below): the layers' fused
        # path, which trained right on an H200, hands cuBLAS nothing else, while a model whose
        # per-GEMM path had M or N of 64 and 192 reached a NaN loss there (not isolated further)
        if _triton_reads(a) and _triton_reads(b):
            fast = _fast_copies(a, b, elem_a, elem_b, scale_rule, b_tile)
        else:
            operands = _mx_operands(_whole_blocks(a), _whole_blocks(b), elem_a, elem_b, scale_rule)
            fast = _fast_operands(*operands, b_tile)
        y = scaled_mm(*blockwise_scaled_mm_operands(*fast), out_dtype=torch.bfloat16)
        return y[: a.shape[0], : b.shape[1]]
    if recipe == "mxfp8":
        da, sa, db, sb = _mx_operands(a, b, elem_a, elem_b, scale_rule)
        e8m0 = getattr(torch, "float8_e8m0fnu", None)
        if e8m0 is None:
            raise ValueError("this torch has no float8_e8m0fnu dtype; MX _scaled_mm needs torch >= 2.7")
        # scales of a: (M, K/32); of b: (K/32, N) -> per output column (N, K/32); both swizzled
        return scaled_mm(
            da.contiguous(),
            db.t().contiguous().t(),
            to_cublas_blocked(sa).view(e8m0),
            to_cublas_blocked(sb.t()).view(e8m0),
            out_dtype=out_dtype,
        )
    pad_k, n = (-a.shape[1]) % 16, b.shape[1]
    if pad_k or n % 16:  # cuBLASLt wants K and N multiples of 16 (wgrad's K is the token count):
        # zero rows of K change no product, zero columns of N are cut off the output
        a = torch.nn.functional.pad(a, (0, pad_k))
        b = torch.nn.functional.pad(b, (0, (-n) % 16, 0, pad_k))
    scaling = "tensorwise" if recipe == "fp8_tensorwise" else "rowwise"
    out_dtype = torch.bfloat16 if scaling == "rowwise" else out_dtype  # rowwise needs bf16 output
    y = scaled_mm(*fp8_scaled_mm_operands(a, b, elem_a, elem_b, scaling), out_dtype, fast_accum)
    return y[:, :n]


def fp8_scaled_mm_operands(a: torch.Tensor, b: torch.Tensor, elem_a: str, elem_b: str, scaling: str):
    """``(a, b, scale_a, scale_b)`` of an fp8 ``torch._scaled_mm`` for ``a @ b`` (K and N
    multiples of 16): ``a`` quantized along K, row-major; ``b`` quantized along K (its columns:
    the rows of bᵀ), column-major; the scales in cuBLASLt's shapes (rowwise (M, 1) and (1, N))."""
    da, sa = _fp8_along_k(a, elem_a, scaling)
    dbt, sb = _fp8_along_k(b.t(), elem_b, scaling)
    if scaling == "rowwise":
        sa, sb = sa.reshape(-1, 1).contiguous(), sb.reshape(1, -1).contiguous()
    return da, dbt.t(), sa, sb


def _triton_reads(t: torch.Tensor) -> bool:
    """Whether lowcomm's Triton quantize kernels run on ``t`` as it is (its device and dtype)."""
    return _triton_runs_on(t.device) and t.dtype in TRITON_READS


def _fast_copies(a, b, elem_a: str, elem_b: str, scale_rule: str, b_tile: str):
    """``(qa, ga, qb, gb)`` of ``mxfp8_fast`` (as :func:`_fast_operands` makes them: the same bytes
    and scales, tested) from one :func:`~lowcomm.kernels.triton_quantize.mx_fast_quantize_dual`
    copy per operand, in the layouts cuBLAS reads: a's rows (or, for a transposed view, its
    transpose's columns) and b's columns. M and N are zero-padded to whole 128-blocks (their
    outputs are cut off by the caller); K is already."""
    from .triton_quantize import mx_fast_quantize_dual

    if _transposed_view(a) and a.shape[0] % 128 == 0:  # read in place
        _, _, qa, ga = mx_fast_quantize_dual(a.t(), elem_a, "1x128", scale_rule, rows=False)
        ga = ga.t()  # (K/128, M) row-major is (M, K/128) with strides (1, M): cuBLAS's A
    else:
        qa, ga, _, _ = mx_fast_quantize_dual(_whole_blocks(a), elem_a, "1x128", scale_rule, cols=False)
    _, _, qbt, gb = mx_fast_quantize_dual(_whole_blocks(b), elem_b, b_tile, scale_rule, rows=False)
    return qa, ga, qbt.t(), gb


def _transposed_view(t: torch.Tensor) -> bool:
    """Whether ``t`` is the transpose of a contiguous tensor (``W.t()``, wgrad's ``dyᵀ``): a
    quantize reads ``t.t()`` in place and makes its other copy."""
    return not t.is_contiguous() and t.t().is_contiguous()


def _whole_blocks(t: torch.Tensor, block: int = 128) -> torch.Tensor:
    """``t`` contiguous, both sides zero-padded to multiples of ``block``."""
    rows, cols = (-t.shape[0]) % block, (-t.shape[1]) % block
    return torch.nn.functional.pad(t, (0, cols, 0, rows)) if rows or cols else t.contiguous()


def _fp8_along_k(t: torch.Tensor, elem: str, scaling: str):
    """``t`` (R, K) quantized along K: a row-major fp8 copy (R, K) and its scales. In Triton where it
    runs (one copy, :func:`~lowcomm.kernels.triton_fp8.fp8_quantize_dual`; a transposed view is
    read in place, its transposed copy made): the bytes of :func:`quantize_fp8` (tested), at the
    quantize's bandwidth instead of torch ops'."""
    if _triton_reads(t):
        from .triton_fp8 import fp8_quantize_dual

        if _transposed_view(t):  # its columns' copy
            _, _, q, s = fp8_quantize_dual(t.t(), elem, scaling, rows=False)
        else:
            q, s, _, _ = fp8_quantize_dual(t, elem, scaling, cols=False)
        return q, s
    # torch ops; a transposed view (wgrad's dyᵀ) keeps its strides through the cast: copy it
    q, s = quantize_fp8(t, elem, scaling, axis=1)
    return q.contiguous(), s
