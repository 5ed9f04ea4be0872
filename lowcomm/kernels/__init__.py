"""Low-precision formats and kernels (FP8, MXFP8, E3M0); knows nothing about replicas."""

from .formats import (
    E8M0_BIAS,
    E8M0_NAN,
    ELEM_FORMATS,
    SCALE_RULES,
    ElemFormat,
    block_exponent,
    dequantize_e3m0,
    dequantize_int_absmax,
    dequantize_mx,
    exp2,
    get_elem_format,
    pack_nibbles,
    quantize_e3m0,
    quantize_int_absmax,
    quantize_mx,
    unpack_nibbles,
)

__all__ = [
    "E8M0_BIAS",
    "E8M0_NAN",
    "ELEM_FORMATS",
    "SCALE_RULES",
    "ElemFormat",
    "block_exponent",
    "dequantize_e3m0",
    "dequantize_int_absmax",
    "dequantize_mx",
    "exp2",
    "get_elem_format",
    "pack_nibbles",
    "quantize_e3m0",
    "quantize_int_absmax",
    "quantize_mx",
    "unpack_nibbles",
]
