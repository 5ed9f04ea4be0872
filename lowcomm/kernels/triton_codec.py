"""The e3m0 codec's encode and decode in one pass each (Triton), for buffers on a GPU.

The e3m0 codec (:class:`lowcomm.comm.codecs.E3M0Codec`: a 4-bit sign + exponent code per value, two
a byte, and an E8M0 power-of-two scale per block) is what Streaming DiLoCo sends at 4 bits. Its
torch reference (:func:`lowcomm.kernels.formats.quantize_e3m0`, ``pack_nibbles``; their inverses)
makes about 25 passes over a buffer for an encode and a handful for a decode, each writing a
full-size temporary. A round of the trainer's in-process group encodes every replica's
pseudo-gradient and the mean again and decodes them all, on the GPU's one stream between two
training steps, so those passes are GPU time the steps wait for. Here each is one pass: read
fp32, write the payload (half a byte a value and a byte a block), or read the payload and write
fp32.

The bytes are the reference's, bit for bit (tests, interpreted on CPU): the block's exponent
comes from the bits of its absolute maximum (the reference's ``frexp``, without a transcendental),
the value is scaled by the same two exact powers of two in the same order, and its code is read
off the bits of the scaled magnitude; decoding builds each power of two from its bits, which is
the product the reference rounds (exact in fp32 down to its subnormals). Non-finite inputs map
as the reference maps them (a NaN to code 0 and a block of a NaN to the smallest scale; an
infinity to the largest code at scale 2).

Blocks of a power of two from 2 to :data:`MAX_BLOCK` values (the codec's default is 128); other
block sizes, and CPU buffers outside tests, take the torch reference. Runs on CUDA, and on CPU
tensors under ``TRITON_INTERPRET=1`` (how CI tests it).
"""

from __future__ import annotations

import torch

from .triton_quantize import HAVE_TRITON, TRITON_MISSING, on_device

if HAVE_TRITON:
    import triton
    import triton.language as tl

__all__ = ["e3m0_encode", "e3m0_decode", "serves", "MAX_BLOCK"]

#: the largest codec block the kernels take (a program holds whole blocks)
MAX_BLOCK = 4096
#: values a program encodes (whole blocks; one block where a block is larger), bytes it decodes
_ENCODE_VALUES, _DECODE_BYTES, _WARPS = 4096, 2048, 4


def serves(block: int) -> bool:
    """Whether the kernels run here (Triton is installed) and take this codec block size."""
    return HAVE_TRITON and _takes(block)


def _takes(block: int) -> bool:
    return 2 <= block <= MAX_BLOCK and block & (block - 1) == 0


if HAVE_TRITON:

    @triton.jit
    def _pow2_bits(e):
        """The bits of the fp32 ``2**e`` for int32 ``e``: normal from -126, subnormal down to -149,
        zero below (where the reference's product rounds to zero), infinity above 127."""
        normal = (e + 127) << 23
        sub = tl.where(e >= -149, 1 << tl.minimum(tl.maximum(e + 149, 0), 22), 0)
        bits = tl.where(e >= -126, normal, sub)
        return tl.where(e > 127, 0x7F800000, bits)

    @triton.jit
    def _code(x, f1, f2):
        """The 4-bit code of ``x`` scaled by ``f1`` then ``f2`` (the reference's order)."""
        y = tl.abs(x * f1 * f2)
        yb = y.to(tl.int32, bitcast=True)
        # y = 1.m · 2**e: code e + 7, one more where the mantissa reaches the midpoint 1.5
        code = (yb >> 23) - 120 + ((yb & 0x7FFFFF) >= 0x400000).to(tl.int32)
        code = tl.where(y >= 0.0078125, tl.minimum(tl.maximum(code, 1), 7), 0)  # 2**-7: half of 2**-6
        return code | tl.where((code > 0) & (x < 0), 8, 0)

    @triton.jit
    def _e3m0_encode_kernel(x_ptr, out_ptr, n, nd, nblocks, BLOCK: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # this program's blocks
        at = rows[:, None].to(tl.int64) * BLOCK + tl.arange(0, BLOCK)[None, :]
        x = tl.load(x_ptr + at, mask=at < n, other=0.0)  # past the end: the reference's zeros
        ax = tl.abs(x)
        nan = tl.max((ax != ax).to(tl.int32), axis=1) > 0
        amax = tl.max(ax, axis=1)
        # the reference's k = ceil(log2(amax)) through frexp, from the bits: a normal amax = 1.m · 2**(E-127)
        bits = amax.to(tl.int32, bitcast=True)
        E, M = (bits >> 23) & 0xFF, bits & 0x7FFFFF
        k = E - 126 - (M == 0).to(tl.int32)
        k = tl.where(E == 0, tl.where(M > 0x400000, -126, -127), k)  # subnormal (or zero) amax
        k = tl.where(E == 255, 1, k)  # infinity: frexp gives exponent 0, corrected once to 1
        k = tl.where(nan | (amax == 0.0), -127, k)
        k = tl.minimum(tl.maximum(k, -127), 127)
        h = k >> 1  # floor(k / 2), as the reference's k // 2
        f1 = _pow2_bits(-h).to(tl.float32, bitcast=True)[:, None]
        f2 = _pow2_bits(h - k).to(tl.float32, bitcast=True)[:, None]
        # each pair of neighbours one byte, the first in the low nibble
        even, odd = tl.split(tl.reshape(_code(x, f1, f2), (ROWS, BLOCK // 2, 2)))
        half = rows[:, None].to(tl.int64) * (BLOCK // 2) + tl.arange(0, BLOCK // 2)[None, :]
        tl.store(out_ptr + half, (even | (odd << 4)).to(tl.uint8), mask=half < nd)
        tl.store(out_ptr + nd + rows, (k + 127).to(tl.uint8), mask=rows < nblocks)

    @triton.jit
    def _value(code, k):
        """The fp32 of a 4-bit code at block exponent ``k``: ±2**(code−7+k), ±0 for a zero code.
        The scale byte 255 (k = 128, which no encode writes) gives the reference's products by its
        infinite 2**128: ±inf, and NaN for a zero code."""
        mag = code & 7
        bits = tl.where(mag == 0, 0, _pow2_bits(mag - 7 + k))
        bits = tl.where(k > 127, tl.where(mag == 0, 0x7FC00000, 0x7F800000), bits)
        return (bits | tl.where(code >= 8, -2147483648, 0)).to(tl.float32, bitcast=True)

    @triton.jit
    def _e3m0_decode_kernel(p_ptr, out_ptr, n, nd, BLOCK: tl.constexpr, BYTES: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
        byte = tl.load(p_ptr + i, mask=i < nd, other=0).to(tl.int32)
        k = tl.load(p_ptr + nd + (2 * i) // BLOCK, mask=i < nd, other=127).to(tl.int32) - 127
        values = tl.reshape(tl.join(_value(byte & 15, k), _value(byte >> 4, k)), (2 * BYTES,))
        at = tl.program_id(0).to(tl.int64) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
        tl.store(out_ptr + at, values, mask=at < n)


def _check(block: int) -> None:
    if not HAVE_TRITON:
        raise RuntimeError(f"the e3m0 kernels need Triton ({TRITON_MISSING})")
    if not _takes(block):
        raise ValueError(
            f"the e3m0 kernels take a block of a power of two from 2 to {MAX_BLOCK}, got {block}"
        )


def e3m0_encode(x: torch.Tensor, block: int) -> torch.Tensor:
    """The e3m0 payload of a 1-D fp32 tensor: ``ceil(n/2)`` bytes of codes, two a byte (element
    2i in the low nibble), then one E8M0 scale byte per block of ``block`` values (the last block
    may be short); what ``E3M0Codec(block).encode`` writes."""
    _check(block)
    x = x.contiguous()  # (a strided view of a buffer: the kernel reads consecutive values)
    n = x.numel()
    nd, nblocks = (n + 1) // 2, -(-n // block)
    out = torch.empty(nd + nblocks, dtype=torch.uint8, device=x.device)
    if n:
        rows = max(_ENCODE_VALUES // block, 1)
        with on_device(x):
            _e3m0_encode_kernel[(triton.cdiv(nblocks, rows),)](
                x, out, n, nd, nblocks, BLOCK=block, ROWS=rows, num_warps=_WARPS
            )
    return out


def e3m0_decode(payload: torch.Tensor, numel: int, block: int) -> torch.Tensor:
    """The fp32 values of an :func:`e3m0_encode` payload of ``numel`` values."""
    _check(block)
    payload = payload.contiguous()
    out = torch.empty(numel, dtype=torch.float32, device=payload.device)
    nd = (numel + 1) // 2
    if numel:
        with on_device(payload):
            _e3m0_decode_kernel[(triton.cdiv(nd, _DECODE_BYTES),)](
                payload, out, numel, nd, BLOCK=block, BYTES=_DECODE_BYTES, num_warps=_WARPS
            )
    return out


def static_specs() -> list:
    """The two kernels as a round launches them on CUDA at the codec's default block (128), for
    :mod:`lowcomm.kernels.triton_static`."""
    from .triton_static import KernelSpec

    ints = {"n": "i32", "nd": "i32"}
    return [
        KernelSpec(
            "e3m0_encode (block 128)",
            _e3m0_encode_kernel,
            {"x_ptr": "*fp32", "out_ptr": "*u8", **ints, "nblocks": "i32"},
            {"BLOCK": 128, "ROWS": _ENCODE_VALUES // 128},
            num_warps=_WARPS,
            num_stages=1,
            aligned=("n", "nd", "nblocks"),
        ),
        KernelSpec(
            "e3m0_decode (block 128)",
            _e3m0_decode_kernel,
            {"p_ptr": "*u8", "out_ptr": "*fp32", **ints},
            {"BLOCK": 128, "BYTES": _DECODE_BYTES},
            num_warps=_WARPS,
            num_stages=1,
            aligned=("n", "nd"),
        ),
    ]
