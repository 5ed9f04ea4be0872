"""Block-scaled fp8 GEMMs in Triton for GPUs without native MX (Hopper): scales applied in the K loop.

``mx_matmul(a_data, a_scales, b_data, b_scales)`` computes ``C = dequant(A) @ dequant(B)`` for
A (M, K) and B (K, N) in E4M3 with one E8M0 scale per 32 along K, without materializing the
dequantized operands: each 32-wide K step is an fp8 ``tl.dot`` into fp32, multiplied by the outer
product of the two operands' power-of-two scales (exact) and accumulated in fp32. The result
equals the emulated path up to fp32 summation order.

This is the plain "promote every 32 of K" design. REFERENCE.md measured it at 0.21–0.29x of
cuBLAS bf16 on H100, because the promotion costs about as many CUDA-core cycles as the fp8 MMA;
beating bf16 needs the promotion hidden behind the MMAs (warp-specialized ping-pong consumers).
It is here as the exact reference kernel for Hopper and runs on CPU under ``TRITON_INTERPRET=1``.

``blockwise_matmul`` is the same kernel with fp32 scales per 128 of K (the ``mxfp8_fast`` recipe:
MX regrouped to 1x128 blocks): four times fewer promotions, the granularity at which published
Hopper kernels keep fp8 MMAs busy. Neither kernel's speed has been measured here (no GPU was lent
to the sessions that wrote them); BENCHMARKS.md says so.
"""

from __future__ import annotations

import torch

from .triton_quantize import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

__all__ = ["mx_matmul", "blockwise_matmul"]

if HAVE_TRITON:

    @triton.jit
    def _block_scaled_gemm_kernel(
        a_ptr,
        sa_ptr,
        b_ptr,
        sb_ptr,
        c_ptr,
        M,
        N,
        K,
        SB: tl.constexpr,
        E8M0: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # C = sum over K-blocks kb of (A[:, kb] @ B[kb, :]) * sa[:, kb] ⊗ sb[kb, :]; SB elements of K
        # share a scale (32 for MX, 128 for the 1x128 path), E8M0 says how scales are stored
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, SB)
        mask_m = rm < M
        mask_n = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        KB = K // SB
        for kb in range(0, KB):
            k = kb * SB + rk
            a = tl.load(a_ptr + rm[:, None] * K + k[None, :], mask=mask_m[:, None], other=0.0)  # (BM, SB) fp8
            b = tl.load(b_ptr + k[:, None] * N + rn[None, :], mask=mask_n[None, :], other=0.0)  # (SB, BN) fp8
            part = tl.dot(a, b, out_dtype=tl.float32)
            if E8M0:  # 2^(s − 127), built from bits (exact); 0xFF (NaN) blocks -> NaN
                sa = tl.load(sa_ptr + rm * KB + kb, mask=mask_m, other=127).to(tl.int32)
                sb = tl.load(sb_ptr + kb * N + rn, mask=mask_n, other=127).to(tl.int32)
                fa = tl.where(sa == 255, float("nan"), _e8m0_to_f32(sa))
                fb = tl.where(sb == 255, float("nan"), _e8m0_to_f32(sb))
            else:  # fp32 dequantization multipliers
                fa = tl.load(sa_ptr + rm * KB + kb, mask=mask_m, other=1.0)
                fb = tl.load(sb_ptr + kb * N + rn, mask=mask_n, other=1.0)
            acc += part * fa[:, None] * fb[None, :]
        tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _e8m0_to_f32(s):
        # 2^(s−127): a normal fp32 for s in [1, 254]; s = 0 is 2^−127 (subnormal): 2^−126 · 0.5
        normal = (tl.maximum(s, 1) << 23).to(tl.float32, bitcast=True)
        return tl.where(s == 0, normal * 0.5, normal)


def mx_matmul(
    a_data: torch.Tensor,
    a_scales: torch.Tensor,
    b_data: torch.Tensor,
    b_scales: torch.Tensor,
    *,
    block_m: int = 32,
    block_n: int = 32,
) -> torch.Tensor:
    """fp32 ``dequant(A) @ dequant(B)`` from MX operands (exact MX).

    Args:
        a_data: (M, K) float8_e4m3fn, blocked along K (``quantize_mx(a, axis=1)``).
        a_scales: (M, K/32) uint8 E8M0.
        b_data: (K, N) float8_e4m3fn, blocked along K (``quantize_mx(b, axis=0)``).
        b_scales: (K/32, N) uint8 E8M0.

    Raises:
        RuntimeError: triton missing. ValueError: shapes or dtypes that do not fit.
    """
    return _launch(a_data, a_scales, b_data, b_scales, 32, torch.uint8, block_m, block_n, "mx_matmul")


def blockwise_matmul(
    a_data: torch.Tensor,
    a_scales: torch.Tensor,
    b_data: torch.Tensor,
    b_scales: torch.Tensor,
    *,
    block: int = 128,
    block_m: int = 32,
    block_n: int = 32,
) -> torch.Tensor:
    """fp32 ``(A · sa) @ (B · sb)`` with fp32 scales per ``block`` elements along K (the 1x128 path).

    The same kernel as :func:`mx_matmul` with one scale per 128 of K: a quarter of the promotions
    of exact MX, which is what lets a Hopper kernel hide them behind the MMAs (the DeepSeek-V3
    recipe's granularity). ``regroup_mx_1x128`` turns MX operands into these.

    Args:
        a_data: (M, K) float8_e4m3fn. a_scales: (M, K/block) float32.
        b_data: (K, N) float8_e4m3fn. b_scales: (K/block, N) float32 (one per column and K-block).
        block: elements of K per scale (a power of two >= 16).

    Raises:
        RuntimeError: triton missing. ValueError: shapes or dtypes that do not fit.
    """
    if block < 16 or block & (block - 1):
        raise ValueError(f"blockwise_matmul: block={block} must be a power of two >= 16")
    return _launch(
        a_data, a_scales, b_data, b_scales, block, torch.float32, block_m, block_n, "blockwise_matmul"
    )


def _launch(a_data, a_scales, b_data, b_scales, sb: int, scale_dtype, block_m, block_n, name) -> torch.Tensor:
    if not HAVE_TRITON:
        raise RuntimeError(f"{name} needs triton (pip install triton); use lowcomm.kernels.qmatmul")
    M, K = a_data.shape
    K2, N = b_data.shape
    if K != K2 or K % sb:
        raise ValueError(
            f"{name} needs A (M, K) and B (K, N) with K a multiple of {sb}, got {tuple(a_data.shape)} "
            f"and {tuple(b_data.shape)}"
        )
    if a_data.dtype != torch.float8_e4m3fn or b_data.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{name} takes float8_e4m3fn operands, got {a_data.dtype} and {b_data.dtype}")
    if a_scales.shape != (M, K // sb) or b_scales.shape != (K // sb, N):
        raise ValueError(
            f"scales must be (M, K/{sb}) and (K/{sb}, N), got {tuple(a_scales.shape)} and "
            f"{tuple(b_scales.shape)}"
        )
    if a_scales.dtype != scale_dtype or b_scales.dtype != scale_dtype:
        raise ValueError(f"{name} takes {scale_dtype} scales, got {a_scales.dtype} and {b_scales.dtype}")
    c = torch.empty(M, N, dtype=torch.float32, device=a_data.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _block_scaled_gemm_kernel[grid](
        a_data.contiguous(),
        a_scales.contiguous(),
        b_data.contiguous(),
        b_scales.contiguous(),
        c,
        M,
        N,
        K,
        SB=sb,
        E8M0=scale_dtype == torch.uint8,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
    )
    return c
