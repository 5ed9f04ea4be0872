"""Codecs: how a flat fp32 buffer is turned into the bytes that go on the wire, and back.

A codec maps a 1-D fp32 tensor of ``n`` elements to one uint8 payload of exactly
``encoded_nbytes(n)`` bytes (element data first, then per-block scales) and back. A payload is
self-describing given ``n``, so a receiver can split and decode it with no side channel, and the
byte count a group reports is exactly the payload sizes it handed to its collectives.

Block-scaled codecs split the buffer into blocks of ``block`` consecutive elements (the last block
may be short); the buffer's shape does not matter, so a bias or a norm weight costs the same per
element as a large matrix. Encoding is blockwise, so encoding a block-aligned slice gives the same
bytes as the matching slice of the whole encoding (the sharded all-reduce relies on this).

| codec      | element            | scale per block        | bits/element at block 128 |
|------------|--------------------|------------------------|---------------------------|
| fp32       | fp32               | -                      | 32                        |
| bf16       | bf16 (RNE)         | -                      | 16                        |
| fp8_e4m3   | E4M3               | E8M0, rceil rule       | 8.0625                    |
| fp8_e5m2   | E5M2               | E8M0, rceil rule       | 8.0625                    |
| int8       | int8, round-even   | fp32 absmax / 127      | 8.25                      |
| int4       | int4 in [-7, 7]    | fp32 absmax / 7        | 4.25                      |
| e3m0       | sign + 3-bit exp   | E8M0, ceil(log2 amax)  | 4.0625                    |

Decoding always produces fp32; sums of decoded values are accumulated in fp32 by the groups.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from ..kernels.formats import (
    E8M0_BIAS,
    dequantize_e3m0,
    dequantize_int_absmax,
    dequantize_mx,
    pack_nibbles,
    quantize_e3m0,
    quantize_int_absmax,
    quantize_mx,
    unpack_nibbles,
)

__all__ = [
    "Codec",
    "NonFiniteError",
    "CODECS",
    "DEFAULT_BLOCK",
    "get_codec",
]

DEFAULT_BLOCK = 128
#: where the e3m0 codec runs its Triton kernels (tests add "cpu": the kernels interpreted)
KERNEL_DEVICES = ("cuda",)


class NonFiniteError(ValueError):
    """Raised when a buffer handed to a codec holds NaN or Inf."""


def _as_u8(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).reshape(-1)


def _bytes_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret uint8 bytes as ``dtype`` (copying when a slice is not aligned for it)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if t.storage_offset() % itemsize:
        t = t.clone()
    return t.contiguous().view(dtype)


class Codec(ABC):
    """Encode a flat fp32 buffer to a uint8 payload and back.

    Attributes:
        name: registry name, the same on every replica (checked at start-up).
        block: elements per scale for block-scaled codecs (0 for unscaled ones).
    """

    name: str = ""
    block: int = 0
    elem_bits: int = 32
    scale_bytes: int = 0

    def encoded_nbytes(self, numel: int) -> int:
        """Exact payload size in bytes for a buffer of ``numel`` elements."""
        data = math.ceil(numel * self.elem_bits / 8)
        if self.block:
            data += math.ceil(numel / self.block) * self.scale_bytes
        return data

    @property
    def bits_per_element(self) -> float:
        """Wire bits per element including scales, for full blocks."""
        return self.elem_bits + (8 * self.scale_bytes / self.block if self.block else 0.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encode a 1-D fp32 tensor; raises ValueError on a bad shape, and NonFiniteError on NaN/Inf
        in a CPU tensor (on a GPU that check would stop the stream until the device caught up: a
        non-finite value there shows in the decoded mean, and the trainer stops at its next log)."""
        if x.dim() != 1 or x.dtype != torch.float32:
            raise ValueError(f"codec {self.name} encodes 1-D float32 tensors, got {tuple(x.shape)} {x.dtype}")
        if x.numel() and not x.is_cuda and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise NonFiniteError(f"codec {self.name}: input holds {bad} non-finite value(s) of {x.numel()}")
        out = self._encode(x)
        assert out.numel() == self.encoded_nbytes(x.numel())
        return out

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        """Decode a payload of a ``numel``-element buffer to fp32; ValueError if its size is wrong."""
        expected = self.encoded_nbytes(numel)
        if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() != expected:
            raise ValueError(
                f"codec {self.name}: payload for {numel} elements must be {expected} uint8 bytes, "
                f"got {payload.numel()} {payload.dtype}"
            )
        return self._decode(payload, numel)

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(encode(x))``: what a receiver sees of ``x``."""
        return self.decode(self.encode(x), x.numel())

    def _block(self, numel: int) -> int:
        """The block a buffer of ``numel`` elements is cut in: a block longer than the buffer is
        the buffer (the same scale, as zeros change no maximum; the same bytes), so a huge block
        (one scale per buffer) pads nothing instead of allocating the block."""
        return min(self.block, max(numel, 1))

    def _padded(self, x: torch.Tensor, numel: int) -> torch.Tensor:
        pad = (-x.numel()) % self._block(numel)
        return torch.cat([x, x.new_zeros(pad)]) if pad else x

    def _split(self, payload: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        nd = math.ceil(numel * self.elem_bits / 8)
        return payload[:nd], payload[nd:]

    @abstractmethod
    def _encode(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, block={self.block})"


class Fp32Codec(Codec):
    name = "fp32"

    def _encode(self, x):
        return _as_u8(x).clone()

    def _decode(self, payload, numel):
        return _bytes_as(payload, torch.float32).clone()


class Bf16Codec(Codec):
    name = "bf16"
    elem_bits = 16

    def _encode(self, x):
        return _as_u8(x.to(torch.bfloat16))

    def _decode(self, payload, numel):
        return _bytes_as(payload, torch.bfloat16).to(torch.float32)


class Fp8Codec(Codec):
    """FP8 elements with one E8M0 scale per block (the rceil rule: nothing saturates)."""

    elem_bits = 8
    scale_bytes = 1

    def __init__(self, elem: str, block: int = DEFAULT_BLOCK):
        self.elem = elem
        self.name = f"fp8_{elem}"
        self.block = block

    def _encode(self, x):
        b = self._block(x.numel())
        data, scales = quantize_mx(self._padded(x, x.numel()), elem=self.elem, block=b, scale_rule="rceil")
        return torch.cat([_as_u8(data)[: x.numel()], scales.reshape(-1)])

    def _decode(self, payload, numel):
        data, scales = self._split(payload, numel)
        dtype = torch.float8_e4m3fn if self.elem == "e4m3" else torch.float8_e5m2
        data = self._padded(data, numel)
        return dequantize_mx(data.view(dtype), scales, block=self._block(numel))[:numel]


class IntCodec(Codec):
    """Symmetric int8 / int4 with a per-block fp32 absmax scale; int4 packs two values per byte."""

    scale_bytes = 4

    def __init__(self, bits: int, block: int = DEFAULT_BLOCK):
        self.elem_bits = bits
        self.name = f"int{bits}"
        self.block = block

    def _encode(self, x):
        q, s = quantize_int_absmax(self._padded(x, x.numel()), self.elem_bits, self._block(x.numel()))
        q = q[: x.numel()]
        data = _as_u8(q) if self.elem_bits == 8 else pack_nibbles((q + 8).to(torch.uint8))
        return torch.cat([data, _as_u8(s)])

    def _decode(self, payload, numel):
        data, s = self._split(payload, numel)
        if self.elem_bits == 8:
            q = data.view(torch.int8)
        else:
            q = unpack_nibbles(data, numel).to(torch.int8) - 8
        q = self._padded(q, numel)
        return dequantize_int_absmax(q, _bytes_as(s, torch.float32), self._block(numel))[:numel]


class E3M0Codec(Codec):
    """4-bit E3M0 (sign + 3 exponent bits) with an E8M0 power-of-two scale per block. A GPU
    buffer is encoded and decoded in one Triton pass each (:mod:`lowcomm.kernels.triton_codec`:
    the same bytes), where the torch reference takes some 25 passes and their temporaries."""

    name = "e3m0"
    elem_bits = 4
    scale_bytes = 1

    def __init__(self, block: int = DEFAULT_BLOCK):
        self.block = block

    def _kernels(self, t: torch.Tensor):
        """:mod:`lowcomm.kernels.triton_codec` where it serves ``t`` (imported for buffers on
        :data:`KERNEL_DEVICES` only: a CPU job never imports Triton for its codec), else None."""
        if t.device.type not in KERNEL_DEVICES:
            return None
        from ..kernels import triton_codec

        return triton_codec if triton_codec.serves(self.block) else None

    def _encode(self, x):
        if (kernels := self._kernels(x)) is not None:
            return kernels.e3m0_encode(x, self.block)
        codes, k = quantize_e3m0(self._padded(x, x.numel()), self._block(x.numel()))
        return torch.cat([pack_nibbles(codes[: x.numel()]), (k + E8M0_BIAS).to(torch.uint8)])

    def _decode(self, payload, numel):
        if (kernels := self._kernels(payload)) is not None:
            return kernels.e3m0_decode(payload, numel, self.block)
        data, scales = self._split(payload, numel)
        codes = unpack_nibbles(data, numel)
        codes = self._padded(codes, numel)
        return dequantize_e3m0(codes, scales.to(torch.int32) - E8M0_BIAS, self._block(numel))[:numel]


CODECS = ("fp32", "bf16", "fp8_e4m3", "fp8_e5m2", "int8", "int4", "e3m0")


def get_codec(name: str, block: int | None = None) -> Codec:
    """Build the codec called ``name`` (one of :data:`CODECS`).

    Args:
        name: codec name.
        block: elements per scale for block-scaled codecs (default 128); ignored by fp32 / bf16.

    Raises:
        ValueError: unknown name, or a block size below 1.
    """
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ValueError(f"codec block size must be an int >= 1, got {block!r}")
    b = block or DEFAULT_BLOCK
    if name == "fp32":
        return Fp32Codec()
    if name == "bf16":
        return Bf16Codec()
    if name in ("fp8_e4m3", "fp8_e5m2"):
        return Fp8Codec(name[4:], b)
    if name in ("int8", "int4"):
        return IntCodec(int(name[3:]), b)
    if name == "e3m0":
        return E3M0Codec(b)
    raise ValueError(f"unknown codec {name!r}; allowed: {list(CODECS)}")
