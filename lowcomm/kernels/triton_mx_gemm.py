"""Block-scaled fp8 GEMMs in Triton for GPUs without native MX (Hopper): scales applied in the K loop.

``mx_matmul(a_data, a_scales, b_data, b_scales)`` computes ``C = dequant(A) @ dequant(B)`` for
A (M, K) and B (K, N) in E4M3 with one E8M0 scale per 32 along K, without materializing the
dequantized operands: each 32-wide K step is an fp8 ``tl.dot`` into fp32, multiplied by the outer
product of the two operands' power-of-two scales (exact) and accumulated in fp32. The result
equals the emulated path up to fp32 summation order.

This is the plain "promote every 32 of K" design. docs/references.md (FP8 on Hopper) reports it at
0.21–0.29x of cuBLAS bf16 on H100, because the promotion costs about as many CUDA-core cycles as the
fp8 MMA; beating bf16 needs the promotion hidden behind the MMAs (warp-specialized ping-pong
consumers). It is here as the exact reference kernel for Hopper and runs on CPU under
``TRITON_INTERPRET=1``.

``mx_dequant_matmul`` computes the same exact MX product without fp8 tensor cores: each operand
dequantized to bf16 in one pass (exact: an MX value has at most 4 significant bits), then the
device's bf16 GEMM, whose products are exact and summed in fp32. It runs at about cuBLAS bf16's
speed less the two passes (3 bytes an element), so it is the ``dequant`` backend that ``auto``
takes for exact MX on Hopper; its speed on a GPU is not measured yet.

``blockwise_matmul`` is the same kernel with fp32 scales per 128 of K (the ``mxfp8_fast`` recipe:
MX regrouped to 1x128 blocks): four times fewer promotions, the granularity at which published
Hopper kernels keep fp8 MMAs busy. Neither kernel's speed has been measured here (no GPU was lent
to the sessions that wrote them); BENCHMARKS.md says so.
"""

from __future__ import annotations

import torch

from .triton_quantize import AS_OPS, HAVE_TRITON, TRITON_MISSING, as_op, on_device

if HAVE_TRITON:
    import triton
    import triton.language as tl

__all__ = ["mx_matmul", "mx_dequant_matmul", "blockwise_matmul"]

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
        stride_am,
        stride_ak,
        stride_bk,
        stride_bn,
        stride_sam,
        stride_sak,
        stride_sbk,
        stride_sbn,
        stride_cm,
        stride_cn,
        SB: tl.constexpr,
        E8M0: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # C = sum over K-blocks kb of (A[:, kb] @ B[kb, :]) * sa[:, kb] ⊗ sb[kb, :]; SB elements of K
        # share a scale (32 for MX, 128 for the 1x128 path), E8M0 says how scales are stored.
        rm, rn, a_ptrs, b_ptrs, sa_ptrs, sb_ptrs = _tile_pointers(
            a_ptr, sa_ptr, b_ptr, sb_ptr, M, N, stride_am, stride_ak, stride_bk, stride_bn,
            stride_sam, stride_sbn, SB, BLOCK_M, BLOCK_N, GROUP_M,
        )  # fmt: skip
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, K // SB):
            a = tl.load(a_ptrs)  # (BM, SB) fp8
            b = tl.load(b_ptrs)  # (SB, BN) fp8
            part = tl.dot(a, b, out_dtype=tl.float32)
            fa, fb = _block_scales(sa_ptrs, sb_ptrs, kb, stride_sak, stride_sbk, E8M0)
            acc += part * fa[:, None] * fb[None, :]
            a_ptrs += SB * stride_ak
            b_ptrs += SB * stride_bk
        _store_tile(c_ptr, acc, rm, rn, M, N, stride_cm, stride_cn)

    @triton.jit
    def _tile_pointers(
        a_ptr, sa_ptr, b_ptr, sb_ptr, M, N, stride_am, stride_ak, stride_bk, stride_bn,
        stride_sam, stride_sbn, SB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):  # fmt: skip
        # this program's tile, in groups of GROUP_M rows of tiles so that neighbouring programs
        # share B in L2; pointers to its first K-block of A and B and to its rows' / columns' scales
        pid = tl.program_id(0)
        width = GROUP_M * tl.cdiv(N, BLOCK_N)
        first_m = (pid // width) * GROUP_M
        rows_in_group = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % rows_in_group
        pid_n = (pid % width) // rows_in_group
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, SB)
        # rows/columns past the edge read row/column 0 (no masks in the K loop; never stored);
        # 64-bit offsets: M·K and K·N may pass 2^31
        am = (rm % M).to(tl.int64)
        bn = (rn % N).to(tl.int64)
        a_ptrs = a_ptr + am[:, None] * stride_am + rk[None, :] * stride_ak
        b_ptrs = b_ptr + rk[:, None] * stride_bk + bn[None, :] * stride_bn
        return rm, rn, a_ptrs, b_ptrs, sa_ptr + am * stride_sam, sb_ptr + bn * stride_sbn

    @triton.jit
    def _block_scales(sa_ptrs, sb_ptrs, kb, stride_sak, stride_sbk, E8M0: tl.constexpr):
        # K-block kb's row and column dequantization multipliers
        if E8M0:  # 2^(s − 127), built from bits (exact); 0xFF (NaN) blocks -> NaN
            sa = tl.load(sa_ptrs + kb * stride_sak).to(tl.int32)
            sb = tl.load(sb_ptrs + kb * stride_sbk).to(tl.int32)
            fa = tl.where(sa == 255, float("nan"), _e8m0_to_f32(sa))
            fb = tl.where(sb == 255, float("nan"), _e8m0_to_f32(sb))
        else:  # fp32 dequantization multipliers
            fa = tl.load(sa_ptrs + kb * stride_sak)
            fb = tl.load(sb_ptrs + kb * stride_sbk)
        return fa, fb

    @triton.jit
    def _store_tile(c_ptr, acc, rm, rn, M, N, stride_cm, stride_cn):
        c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn.to(tl.int64)[None, :] * stride_cn
        # bf16 C (the trainer's autocast: no fp32 copy): the fp32 sums rounded once, to nearest
        # even, in integer arithmetic on their bits (the interpreter's cast truncates), so the cast
        # that follows is exact on every backend; NaN stays NaN
        if c_ptr.dtype.element_ty == tl.bfloat16:
            bits = acc.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            acc = tl.where(acc != acc, acc, bits.to(tl.float32, bitcast=True)).to(tl.bfloat16)
        tl.store(c_ptrs, acc, mask=(rm < M)[:, None] & (rn < N)[None, :])

    @triton.jit
    def _e8m0_to_f32(s):
        # 2^(s−127): a normal fp32 for s in [1, 254]; s = 0 is 2^−127 (subnormal): 2^−126 · 0.5
        normal = (tl.maximum(s, 1) << 23).to(tl.float32, bitcast=True)
        return tl.where(s == 0, normal * 0.5, normal)


# Launch configurations by scale block (SB). CUDA ones were chosen by compiling for sm_90a on a
# machine without a GPU (``python benchmarks/kernels.py --static``, tests/test_kernels.py): no
# register spills, shared memory well inside an H100 SM's 227 KB, fp8 wgmma issued. Their speed is
# not measured yet. The interpreter gets small tiles (it runs numpy per program).
CUDA_CONFIGS = {
    32: {"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
    128: {"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
}
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 1}


def gemm_config(sb: int, device: torch.device) -> dict:
    """The tiles, warps and stages the block-scaled GEMM launches with for ``sb`` elements per scale."""
    return dict(CUDA_CONFIGS[sb] if torch.device(device).type == "cuda" else INTERPRET_CONFIG)


def static_specs() -> list:
    """The GEMM at its CUDA configurations and the operand layouts the training layers use, for
    :mod:`lowcomm.kernels.triton_static` (compiled for a GPU that is not here)."""
    from .triton_static import KernelSpec

    params = _block_scaled_gemm_kernel.params
    ints = [p.name for p in params[5:] if not p.is_constexpr]  # sizes and strides
    # which strides are 1: A K-contiguous or M-contiguous (a transposed column-blocked copy),
    # B K-contiguous (Wᵀ in fprop) or N-contiguous (dgrad, wgrad); C row-major
    layouts = {
        "A k-major, B k-major": ("stride_ak", "stride_bk"),
        "A k-major, B n-major": ("stride_ak", "stride_bn"),
        "A m-major, B n-major": ("stride_am", "stride_bn"),
    }
    specs = []
    for sb, scale in ((32, "*u8"), (128, "*fp32")):
        cfg = CUDA_CONFIGS[sb]
        for layout, unit in layouts.items():
            # a scale tensor is contiguous along its operand's contiguous axis
            sa_unit = "stride_sak" if "A k-major" in layout else "stride_sam"
            sb_unit = "stride_sbk" if "B k-major" in layout else "stride_sbn"
            unit = (*unit, sa_unit, sb_unit, "stride_cn")
            sig = {"a_ptr": "*fp8e4nv", "sa_ptr": scale, "b_ptr": "*fp8e4nv", "sb_ptr": scale}
            # the MX layer under bf16 autocast writes y and dx in bf16, dW in fp32
            bf16_out = sb == 32 and "A m-major" not in layout
            sig["c_ptr"] = "*bf16" if bf16_out else "*fp32"
            suffix = " -> bf16" if bf16_out else ""
            sig.update({n: "constexpr" if n in unit else "i32" for n in ints})
            consts = {n: 1 for n in unit}
            consts.update(SB=sb, E8M0=sb == 32, **{k: v for k, v in cfg.items() if k.isupper()})
            sig.update({p.name: "constexpr" for p in params if p.is_constexpr})
            specs.append(
                KernelSpec(
                    name=f"{'mx_matmul' if sb == 32 else 'blockwise_matmul'} ({layout}){suffix}",
                    fn=_block_scaled_gemm_kernel,
                    signature=sig,
                    constexprs=consts,
                    num_warps=cfg["num_warps"],
                    num_stages=cfg["num_stages"],
                    aligned=tuple(n for n in ints if n not in unit),
                )
            )
    return specs


def mx_matmul(
    a_data: torch.Tensor,
    a_scales: torch.Tensor,
    b_data: torch.Tensor,
    b_scales: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.float32,
    config: dict | None = None,
) -> torch.Tensor:
    """``dequant(A) @ dequant(B)`` from MX operands (exact MX), summed in fp32.

    Operands may be strided views (a transposed copy of the other axis's quantization is read in
    place): only the shapes below matter.

    Args:
        a_data: (M, K) float8_e4m3fn (or e5m2: gradients), blocked along K
            (``quantize_mx(a, axis=1)``).
        a_scales: (M, K/32) uint8 E8M0.
        b_data: (K, N) float8_e4m3fn or e5m2, blocked along K (``quantize_mx(b, axis=0)``).
        b_scales: (K/32, N) uint8 E8M0.
        out_dtype: the result's dtype: float32, or bfloat16 (the fp32 sums rounded once to nearest
            even as they are written, with no fp32 copy).
        config: launch configuration overrides (keys of :data:`CUDA_CONFIGS`' entries).

    Raises:
        RuntimeError: triton missing. ValueError: shapes or dtypes that do not fit.
    """
    return _launch(a_data, a_scales, b_data, b_scales, 32, torch.uint8, config, "mx_matmul", out_dtype)


def blockwise_matmul(
    a_data: torch.Tensor,
    a_scales: torch.Tensor,
    b_data: torch.Tensor,
    b_scales: torch.Tensor,
    *,
    block: int = 128,
    out_dtype: torch.dtype = torch.float32,
    config: dict | None = None,
) -> torch.Tensor:
    """``(A · sa) @ (B · sb)`` with fp32 scales per ``block`` elements along K (the 1x128 path),
    summed in fp32.

    The same kernel as :func:`mx_matmul` with one scale per 128 of K: a quarter of the promotions
    of exact MX, which is what lets a Hopper kernel hide them behind the MMAs (the DeepSeek-V3
    recipe's granularity). ``regroup_mx_1x128`` turns MX operands into these.

    Args:
        a_data: (M, K) float8_e4m3fn. a_scales: (M, K/block) float32.
        b_data: (K, N) float8_e4m3fn. b_scales: (K/block, N) float32 (one per column and K-block).
        block: elements of K per scale (a power of two >= 16).
        out_dtype: as :func:`mx_matmul`'s.
        config: launch configuration overrides.

    Raises:
        RuntimeError: triton missing. ValueError: shapes or dtypes that do not fit.
    """
    if block < 16 or block & (block - 1):
        raise ValueError(f"blockwise_matmul: block={block} must be a power of two >= 16")
    return _launch(
        a_data, a_scales, b_data, b_scales, block, torch.float32, config, "blockwise_matmul", out_dtype
    )


#: the dtypes the GEMMs write
OUT_DTYPES = (torch.float32, torch.bfloat16)


def mx_dequant_matmul(
    a_data: torch.Tensor,
    a_scales: torch.Tensor,
    b_data: torch.Tensor,
    b_scales: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """:func:`mx_matmul`'s exact MX product through bf16 tensor cores: each operand dequantized to
    bf16 in one pass (:func:`~lowcomm.kernels.triton_quantize.mx_dequantize`, exact: an MX value
    has at most 4 significant bits and bf16 holds fp32's exponent range), then multiplied by the
    device's bf16 GEMM (cuBLAS on CUDA), whose products of bf16 values are exact and summed in fp32.

    The same numbers as the emulated path up to fp32 summation order, at about the speed of a
    bf16 GEMM plus two passes over the fp8 operands (3 bytes an element), where :func:`mx_matmul`
    promotes every 32 of K on the CUDA cores. In a block scaled below 2^-124 (e4m3; 2^-117 for
    e5m2) the smallest values fall between bf16's subnormal steps and are rounded. A bf16 result
    on CUDA is cuBLAS's bf16 GEMM's (fp32 sums rounded once; torch's
    ``allow_bf16_reduced_precision_reduction`` lets cuBLAS split K with bf16 partial sums); an
    fp32 one needs torch >= 2.8 (``torch.mm(..., out_dtype=)``).

    Args: as :func:`mx_matmul`'s (operands may be transposed views of the quantize's copies).

    Raises:
        RuntimeError: triton missing, or an fp32 result on CUDA under torch < 2.8. ValueError:
            shapes or dtypes that do not fit.
    """
    _check_operands(a_data, a_scales, b_data, b_scales, 32, torch.uint8, "mx_dequant_matmul", out_dtype)
    if a_data.is_cuda and out_dtype == torch.float32 and not MM_OUT_DTYPE:
        raise RuntimeError(
            f"mx_dequant_matmul: an fp32 result needs torch.mm(..., out_dtype=), torch >= 2.8 (this is "
            f"{torch.__version__}); use mx_matmul"
        )
    if as_op():  # compiled: one operator, as the Triton GEMM's (the compiler never sees mm.dtype)
        return torch.ops.lowcomm.mx_dequant_matmul(a_data, a_scales, b_data, b_scales, out_dtype)
    return _dequant_mm(a_data, a_scales, b_data, b_scales, out_dtype)


def _dequant_mm(a_data, a_scales, b_data, b_scales, out_dtype: torch.dtype) -> torch.Tensor:
    """The operands (checked by :func:`_check_operands`) dequantized and multiplied."""
    from .triton_quantize import _run_dequant

    def dequant(data, scales, rows: bool):  # bf16 in the operand's layout: a transposed view stays one
        e5m2 = data.dtype == torch.float8_e5m2
        if data.is_contiguous() or not data.t().is_contiguous():
            return _run_dequant(data, scales, rows, e5m2)
        return _run_dequant(data.t(), scales.t(), not rows, e5m2).t()

    return _bf16_mm(dequant(a_data, a_scales, True), dequant(b_data, b_scales, False), out_dtype)


def _bf16_mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` of bf16 operands written in ``out_dtype``: cuBLAS's bf16 GEMM on CUDA (one
    operation; benchmarks/host_overhead.py stands in for it on its pretend GPU), on CPU (the
    interpreter's tests) exact products summed in fp32, autocast or not."""
    if not a.is_cuda:
        with torch.autocast("cpu", enabled=False):
            return (a.float() @ b.float()).to(out_dtype)
    return torch.mm(a, b) if out_dtype == torch.bfloat16 else torch.mm(a, b, out_dtype=torch.float32)


#: torch.mm takes an output dtype (fp32 from bf16 operands on CUDA: torch >= 2.8)
MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


def _launch(
    a_data, a_scales, b_data, b_scales, sb: int, scale_dtype, config, name, out_dtype
) -> torch.Tensor:
    _check_operands(a_data, a_scales, b_data, b_scales, sb, scale_dtype, name, out_dtype)
    if config is None and as_op():
        return torch.ops.lowcomm.block_scaled_matmul(a_data, a_scales, b_data, b_scales, sb, out_dtype)
    return _gemm(a_data, a_scales, b_data, b_scales, sb, config, name, out_dtype)


def _check_operands(a_data, a_scales, b_data, b_scales, sb: int, scale_dtype, name, out_dtype) -> None:
    """What the block-scaled GEMMs refuse: no Triton, shapes, dtypes, devices, output dtype."""
    if not HAVE_TRITON:
        raise RuntimeError(f"{name} needs Triton ({TRITON_MISSING}); or use lowcomm.kernels.qmatmul")
    if a_data.dim() != 2 or b_data.dim() != 2:
        raise ValueError(f"{name} takes 2-D operands, got {tuple(a_data.shape)} and {tuple(b_data.shape)}")
    M, K = a_data.shape
    K2, N = b_data.shape
    if K != K2 or K % sb:
        raise ValueError(
            f"{name} needs A (M, K) and B (K, N) with K a multiple of {sb}, got {tuple(a_data.shape)} "
            f"and {tuple(b_data.shape)}"
        )
    fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
    if a_data.dtype not in fp8 or b_data.dtype not in fp8:
        raise ValueError(
            f"{name} takes float8_e4m3fn or float8_e5m2 operands, got {a_data.dtype} and {b_data.dtype}"
        )
    if a_scales.shape != (M, K // sb) or b_scales.shape != (K // sb, N):
        raise ValueError(
            f"scales must be (M, K/{sb}) and (K/{sb}, N), got {tuple(a_scales.shape)} and "
            f"{tuple(b_scales.shape)}"
        )
    devices = {t.device for t in (a_data, a_scales, b_data, b_scales)}
    if len(devices) > 1:
        where = sorted(map(str, devices))
        raise ValueError(f"{name}: operands and scales must be on one device, got {where}")
    if a_scales.dtype != scale_dtype or b_scales.dtype != scale_dtype:
        raise ValueError(f"{name} takes {scale_dtype} scales, got {a_scales.dtype} and {b_scales.dtype}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"{name} writes {[str(d) for d in OUT_DTYPES]}, not {out_dtype}")


def _gemm(
    a_data, a_scales, b_data, b_scales, sb: int, config, name: str, out_dtype=torch.float32
) -> torch.Tensor:
    cfg = gemm_config(sb, a_data.device)
    unknown = set(config or {}) - set(cfg)
    if unknown:
        raise ValueError(f"{name}: unknown config keys {sorted(unknown)}; allowed: {sorted(cfg)}")
    cfg.update(config or {})
    M, K = a_data.shape
    N = b_data.shape[1]
    c = torch.empty(M, N, dtype=out_dtype, device=a_data.device)
    if M == 0 or N == 0:
        return c
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    with on_device(a_data):
        _block_scaled_gemm_kernel[grid](
            a_data,
            a_scales,
            b_data,
            b_scales,
            c,
            M,
            N,
            K,
            *a_data.stride(),
            *b_data.stride(),
            *a_scales.stride(),
            *b_scales.stride(),
            *c.stride(),
            SB=sb,
            E8M0=a_scales.dtype == torch.uint8,
            **cfg,
        )
    return c


if AS_OPS:
    # an operator torch.compile keeps whole: its launch (pointers, strides) is not traced
    # the schema is spelled out: torch 2.4 cannot read it from this module's string annotations
    @torch.library.custom_op(
        "lowcomm::block_scaled_matmul",
        mutates_args=(),
        schema="(Tensor a_data, Tensor a_scales, Tensor b_data, Tensor b_scales, int block, "
        "ScalarType out_dtype) -> Tensor",
    )
    def _block_scaled_matmul_op(
        a_data: torch.Tensor,
        a_scales: torch.Tensor,
        b_data: torch.Tensor,
        b_scales: torch.Tensor,
        block: int,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        return _gemm(a_data, a_scales, b_data, b_scales, block, None, "block_scaled_matmul", out_dtype)

    @_block_scaled_matmul_op.register_fake
    def _(a_data, a_scales, b_data, b_scales, block, out_dtype):
        return a_data.new_empty(a_data.shape[0], b_data.shape[1], dtype=out_dtype)

    @torch.library.custom_op(
        "lowcomm::mx_dequant_matmul",
        mutates_args=(),
        schema="(Tensor a_data, Tensor a_scales, Tensor b_data, Tensor b_scales, ScalarType out_dtype) "
        "-> Tensor",
    )
    def _mx_dequant_matmul_op(
        a_data: torch.Tensor,
        a_scales: torch.Tensor,
        b_data: torch.Tensor,
        b_scales: torch.Tensor,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        return _dequant_mm(a_data, a_scales, b_data, b_scales, out_dtype)

    @_mx_dequant_matmul_op.register_fake
    def _(a_data, a_scales, b_data, b_scales, out_dtype):
        return a_data.new_empty(a_data.shape[0], b_data.shape[1], dtype=out_dtype)
