"""Exact-MX GEMM in Triton for GPUs without native MX (Hopper): block scales applied in the K loop.

``mx_matmul(a_data, a_scales, b_data, b_scales)`` computes ``C = dequant(A) @ dequant(B)`` for
A (M, K) and B (K, N) in E4M3 with one E8M0 scale per 32 along K, without materializing the
dequantized operands: each 32-wide K step is an fp8 ``tl.dot`` into fp32, multiplied by the outer
product of the two operands' power-of-two scales (exact) and accumulated in fp32. The result
equals the emulated path up to fp32 summation order.

This is the plain "promote every 32 of K" design. REFERENCE.md measured it at 0.21–0.29x of
cuBLAS bf16 on H100, because the promotion costs about as many CUDA-core cycles as the fp8 MMA;
beating bf16 needs the promotion hidden behind the MMAs (warp-specialized ping-pong consumers).
It is here as the exact reference kernel for Hopper and runs on CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch

from .triton_quantize import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

__all__ = ["mx_matmul"]

if HAVE_TRITON:

    @triton.jit
    def _mx_gemm_kernel(
        a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, 32)
        mask_m = rm < M
        mask_n = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        KB = K // 32
        for kb in range(0, KB):
            k = kb * 32 + rk
            a = tl.load(a_ptr + rm[:, None] * K + k[None, :], mask=mask_m[:, None], other=0.0)  # (BM, 32) fp8
            b = tl.load(b_ptr + k[:, None] * N + rn[None, :], mask=mask_n[None, :], other=0.0)  # (32, BN) fp8
            part = tl.dot(a, b, out_dtype=tl.float32)
            # E8M0 scales -> 2^(s − 127), built from bits (exact); 0xFF (NaN) blocks -> NaN
            sa = tl.load(sa_ptr + rm * KB + kb, mask=mask_m, other=127).to(tl.int32)
            sb = tl.load(sb_ptr + kb * N + rn, mask=mask_n, other=127).to(tl.int32)
            fa = tl.where(sa == 255, float("nan"), _e8m0_to_f32(sa))
            fb = tl.where(sb == 255, float("nan"), _e8m0_to_f32(sb))
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
    """fp32 ``dequant(A) @ dequant(B)`` from MX operands.

    Args:
        a_data: (M, K) float8_e4m3fn, blocked along K (``quantize_mx(a, axis=1)``).
        a_scales: (M, K/32) uint8 E8M0.
        b_data: (K, N) float8_e4m3fn, blocked along K (``quantize_mx(b, axis=0)``).
        b_scales: (K/32, N) uint8 E8M0.

    Raises:
        RuntimeError: triton missing. ValueError: shapes or dtypes that do not fit.
    """
    if not HAVE_TRITON:
        raise RuntimeError("mx_matmul needs triton (pip install triton); use lowcomm.kernels.qmatmul")
    M, K = a_data.shape
    K2, N = b_data.shape
    if K != K2 or K % 32:
        raise ValueError(
            f"mx_matmul needs A (M, K) and B (K, N) with K a multiple of 32, got {tuple(a_data.shape)} "
            f"and {tuple(b_data.shape)}"
        )
    if a_data.dtype != torch.float8_e4m3fn or b_data.dtype != torch.float8_e4m3fn:
        raise ValueError(f"mx_matmul takes float8_e4m3fn operands, got {a_data.dtype} and {b_data.dtype}")
    if a_scales.shape != (M, K // 32) or b_scales.shape != (K // 32, N):
        raise ValueError(
            f"scales must be (M, K/32) and (K/32, N), got {tuple(a_scales.shape)}, {tuple(b_scales.shape)}"
        )
    c = torch.empty(M, N, dtype=torch.float32, device=a_data.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _mx_gemm_kernel[grid](
        a_data.contiguous(),
        a_scales.contiguous(),
        b_data.contiguous(),
        b_scales.contiguous(),
        c,
        M,
        N,
        K,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
    )
    return c
