"""Low-precision number formats and their exact torch reference quantizers.

Everything here is plain torch and runs on any device. Faster kernels (Triton) must match these
functions bit for bit; codecs in :mod:`lowcomm.comm` reuse them for what goes on the wire.

Formats:
    E4M3 (``torch.float8_e4m3fn``): max 448, no infinities.
    E5M2 (``torch.float8_e5m2``): max 57344.
    E8M0 scales: one byte, value ``2**(byte - 127)``; byte 0xFF is NaN (OCP MX v1.0).
    E3M0: 1 sign bit, 3 exponent bits, no mantissa (Streaming DiLoCo's 4-bit outer gradients).
        Code 0 is zero, codes 1..7 are ``2**(code - 7)`` so the largest magnitude is 1.0 and a
        per-block power-of-two scale brings each block's absmax into (0.5, 1].

Scale rules for power-of-two block scales:
    ``"floor"``: OCP MX v1.0, ``k = floor(log2(amax)) - emax_elem``; values above the element
        maximum saturate.
    ``"rceil"``: the MXFP8 pre-training recipe, ``k = ceil(log2(amax / elem_max))`` so that
        ``amax / 2**k <= elem_max`` and nothing saturates (the default).

References:
    OCP Microscaling Formats (MX) v1.0 Specification, sections 5.1-5.3.
    NVIDIA, "Recipes for Pre-training LLMs with MXFP8" (2025), scale rounding.
    Douillard et al., "Streaming DiLoCo with overlapping communication" (2025), E3M0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "ElemFormat",
    "ELEM_FORMATS",
    "SCALE_RULES",
    "FP8_MIN_SCALE",
    "E8M0_BIAS",
    "E8M0_NAN",
    "get_elem_format",
    "block_exponent",
    "exp2",
    "quantize_mx",
    "dequantize_mx",
    "quantize_e3m0",
    "dequantize_e3m0",
    "quantize_int_absmax",
    "dequantize_int_absmax",
    "pack_nibbles",
    "unpack_nibbles",
]

E8M0_BIAS = 127
E8M0_NAN = 0xFF
SCALE_RULES = ("floor", "rceil")
#: the smallest fp8 tensorwise / rowwise scale: the smallest normal fp32, whose reciprocal (2^126)
#: is finite, so that the cast multiplies by it. A tensor whose maximum is below 448 x 2^-126
#: (about 5e-36) gets this scale and leaves the top of the fp8 range unused
FP8_MIN_SCALE = 2.0**-126

#: the dtypes the Triton quantize kernels read (triton_quantize, triton_fp8); others are read as
#: fp32 first. Here, not beside the kernels, so that asking does not import Triton
TRITON_READS = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class ElemFormat:
    """An element format of a block-scaled tensor.

    Attributes:
        name: short name ("e4m3", "e5m2", "e3m0").
        max: largest finite magnitude.
        emax: exponent of the largest power of two not above ``max`` (OCP ``emax_elem``).
        dtype: torch storage dtype, or None for formats stored as packed codes (e3m0).
        bits: bits per element on the wire.
    """

    name: str
    max: float
    emax: int
    dtype: torch.dtype | None
    bits: int


ELEM_FORMATS: dict[str, ElemFormat] = {
    "e4m3": ElemFormat("e4m3", 448.0, 8, torch.float8_e4m3fn, 8),
    "e5m2": ElemFormat("e5m2", 57344.0, 15, torch.float8_e5m2, 8),
    "e3m0": ElemFormat("e3m0", 1.0, 0, None, 4),
}


def get_elem_format(name: str) -> ElemFormat:
    """Return the element format called ``name``; raise ValueError naming the allowed ones."""
    try:
        return ELEM_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown element format {name!r}; allowed: {sorted(ELEM_FORMATS)}") from None


def exp2(k: torch.Tensor) -> torch.Tensor:
    """Exact ``2.0**k`` in fp32 for integer tensors ``k`` in [-149, 127]."""
    return torch.ldexp(torch.ones_like(k, dtype=torch.float32), k.to(torch.int32))


def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    # frexp: a = m * 2**e with m in [0.5, 1), exact for normals and subnormals.
    _, e = torch.frexp(a)
    return e.to(torch.int32) - 1


def block_exponent(amax: torch.Tensor, fmt: ElemFormat, rule: str = "rceil") -> torch.Tensor:
    """Power-of-two scale exponent ``k`` per block (scale = 2**k), clamped to E8M0's [-127, 127].

    Args:
        amax: fp32 tensor of per-block absolute maxima (finite, >= 0).
        fmt: element format the scaled values must fit.
        rule: "rceil" (no saturation) or "floor" (OCP; saturating).

    Returns:
        int32 tensor of exponents, same shape as ``amax``. All-zero blocks get -127.
    """
    if rule not in SCALE_RULES:
        raise ValueError(f"unknown scale_rule {rule!r}; allowed: {list(SCALE_RULES)}")
    amax = amax.to(torch.float32)
    if rule == "floor":
        k = _floor_log2(amax) - fmt.emax
    else:
        # ceil(log2(amax / max)) from the exact floor of log2 of the fp32 quotient, then one exact
        # correction step for the rounding of that quotient.
        r = amax / fmt.max
        m, e = torch.frexp(r)
        k = e.to(torch.int32) - (m == 0.5).to(torch.int32)
        k = k + (torch.ldexp(amax, -k) > fmt.max).to(torch.int32)
    k = torch.where(amax > 0, k, torch.full_like(k, -E8M0_BIAS))
    return k.clamp(-E8M0_BIAS, E8M0_BIAS)


def _blocks(x: torch.Tensor, block: int, axis: int) -> tuple[torch.Tensor, int]:
    """Move ``axis`` last and split it into blocks: returns (view (..., nblocks, block), axis)."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    axis = axis % x.dim()
    n = x.shape[axis]
    if n % block != 0:
        raise ValueError(f"dimension {axis} of size {n} is not a multiple of the block size {block}")
    xt = x.movedim(axis, -1)
    return xt.reshape(*xt.shape[:-1], n // block, block), axis


def quantize_mx(
    x: torch.Tensor,
    elem: str = "e4m3",
    block: int = 32,
    scale_rule: str = "rceil",
    axis: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to MX: fp8 elements with one E8M0 scale per ``block`` values along ``axis``.

    Args:
        x: floating tensor; ``x.shape[axis]`` must be a multiple of ``block``.
        elem: "e4m3" or "e5m2".
        block: elements per scale (32 in MX v1.0).
        scale_rule: "rceil" (default) or "floor".
        axis: the blocked (reduction) dimension.

    Returns:
        ``(data, scales)``: data in the fp8 dtype with ``x``'s shape; scales uint8 (E8M0 bytes) with
        ``x``'s shape except ``shape[axis] // block`` along ``axis``. A block holding NaN or Inf gets
        the NaN scale 0xFF (its data is NaN too).
    """
    fmt = get_elem_format(elem)
    if fmt.dtype is None:
        raise ValueError(f"quantize_mx takes elem 'e4m3' or 'e5m2', got {elem!r}")
    xb, axis = _blocks(x.to(torch.float32), block, axis)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    bad = ~torch.isfinite(amax)
    k = block_exponent(torch.where(bad, torch.zeros_like(amax), amax), fmt, scale_rule)
    scaled = xb * exp2(-k)
    if scale_rule == "floor":
        scaled = scaled.clamp(-fmt.max, fmt.max)  # saturate; NaN passes through clamp
    scaled = torch.where(bad, torch.full_like(scaled, float("nan")), scaled)
    data = scaled.to(fmt.dtype).reshape(*xb.shape[:-2], -1).movedim(-1, axis)
    scales = torch.where(bad, torch.full_like(k, E8M0_NAN), k + E8M0_BIAS).to(torch.uint8)
    scales = scales.squeeze(-1).movedim(-1, axis)
    return data, scales


def dequantize_mx(
    data: torch.Tensor,
    scales: torch.Tensor,
    block: int = 32,
    axis: int = -1,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_mx`: ``data * 2**(scale - 127)`` per block, in ``dtype``."""
    if scales.dtype != torch.uint8:
        scales = scales.view(torch.uint8)
    xb, axis = _blocks(data.to(torch.float32), block, axis)
    s = scales.movedim(axis % scales.dim(), -1).unsqueeze(-1).to(torch.int32)
    out = xb * exp2(s - E8M0_BIAS)
    out = torch.where(s == E8M0_NAN, torch.full_like(out, float("nan")), out)
    return out.reshape(*xb.shape[:-2], -1).movedim(-1, axis).to(dtype)


# ---- E3M0: 4-bit sign + exponent, for outer gradients ------------------------------------------

_E3M0 = ELEM_FORMATS["e3m0"]


def quantize_e3m0(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 1-D fp32 tensor (length a multiple of ``block``) to E3M0 codes.

    Each block gets the scale ``2**k`` with ``k = ceil(log2(amax))`` so ``|x| / 2**k <= 1``. A scaled
    magnitude ``y`` rounds to the nearest of ``{0, 2**-6, ..., 2**0}`` (ties away from zero).

    Returns:
        ``(codes, exponents)``: uint8 codes in [0, 15] (bit 3 = sign, bits 0-2 = exponent code) and
        int32 block exponents ``k``.
    """
    xb = x.reshape(-1, block)
    k = block_exponent(xb.abs().amax(dim=1, keepdim=True), _E3M0, "rceil")
    # scaled by 2**-k in two normal factors: 2**-127 (a block past 2**126) is subnormal, which a
    # process that flushes denormals (torch.set_flush_denormal, a library built with fast math)
    # reads as zero; the two products are exact, so the codes are the same
    y = (xb * exp2(-(k // 2)) * exp2(k // 2 - k)).abs()
    # y = 1.f · 2**e: e from the exponent bits; between 2**e and 2**(e+1) the midpoint is 1.5 · 2**e,
    # i.e. a mantissa of at least 0x400000 rounds up. Code = e + 7 (+1 when rounding up).
    bits = y.view(torch.int32)
    code = (bits >> 23) - 127 + 7 + ((bits & 0x7FFFFF) >= 0x400000).to(torch.int32)
    # Below 2**-6 the neighbours are 0 and 2**-6; the midpoint is 2**-7.
    code = torch.where(y >= 2.0**-7, code.clamp(1, 7), torch.zeros_like(code))
    sign = (xb < 0).to(torch.int32) << 3
    codes = (code | torch.where(code > 0, sign, torch.zeros_like(sign))).to(torch.uint8)
    return codes.reshape(-1), k.reshape(-1)


def dequantize_e3m0(codes: torch.Tensor, exponents: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of :func:`quantize_e3m0`; returns fp32 of length ``codes.numel()``."""
    mags = [0.0] + [2.0 ** (c - 7) for c in range(1, 8)]
    lut = torch.tensor(mags + [-m for m in mags], dtype=torch.float32, device=codes.device)  # code -> value
    val = lut[codes.reshape(-1, block).long()]
    return (val * exp2(exponents.reshape(-1, 1))).reshape(-1)


# ---- integer absmax ------------------------------------------------------------------------------


def quantize_int_absmax(x: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-block absmax integer quantization of a 1-D fp32 tensor.

    ``q = round(x / s)`` with ``s = amax / qmax``, ``qmax = 2**(bits-1) - 1`` (127 for int8, 7 for
    int4); round half to even. Returns ``(q int8, s fp32 per block)``; all-zero blocks get s = 1.
    """
    qmax = 2 ** (bits - 1) - 1
    xb = x.reshape(-1, block)
    amax = xb.abs().amax(dim=1, keepdim=True)
    s = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = torch.round(xb / s).clamp(-qmax, qmax).to(torch.int8)
    return q.reshape(-1), s.reshape(-1)


def dequantize_int_absmax(q: torch.Tensor, s: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of :func:`quantize_int_absmax`."""
    return (q.reshape(-1, block).to(torch.float32) * s.reshape(-1, 1)).reshape(-1)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 values in [0, 15] two per byte (element 2i in the low nibble); pads odd lengths."""
    c = codes.to(torch.uint8)
    if c.numel() % 2:
        c = torch.cat([c, c.new_zeros(1)])
    c = c.reshape(-1, 2)
    return c[:, 0] | (c[:, 1] << 4)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: the first ``numel`` 4-bit values as uint8."""
    out = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
    return out[:numel]
