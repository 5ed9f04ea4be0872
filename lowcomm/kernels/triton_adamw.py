"""AdamW for M replicas stacked along a leading axis, in one pass per tensor (Triton).

:class:`lowcomm.optim.ReplicaAdamW` steps batched replicas' parameters, each ``(M, *shape)``, with
it. One launch reads a tensor's gradient (bf16 where the forward used a bf16 copy of the
parameter, else fp32), multiplies each replica's slice by that replica's clip coefficient, takes
torch's AdamW step on the fp32 parameter and moments, and writes the parameter's bf16 copy for
the next forward where it has one: per element 30 bytes (bf16 gradient) where autocast's casts,
the clip's own pass and a fused AdamW move 52 (README, "On a GPU").

The arithmetic is :class:`torch.optim.AdamW`'s (``foreach=False``), in fp32, in its order:

    g  = grad · coef[m]
    p  = p · (1 − lr·wd)
    m1 = m1 + (1 − β1)·(g − m1)                 (lerp)
    m2 = m2·β2 + (1 − β2)·g·g                   (addcmul)
    p  = p − step_size · m1 / (√m2 / √bc2 + ε)  (addcdiv), step_size = lr / bc1

with the bias corrections ``bc1 = 1 − β1^t`` and ``bc2 = 1 − β2^t`` computed on the host from
the step count, as torch's does without ``capturable`` (docs/references.md, "AdamW's
arithmetic"). The lerp and the addcmul are one FMA each, as torch rounds them; a GPU may contract
other products and sums that torch rounds twice, and torch's CPU square root is not correctly
rounded, so results agree with torch's to float rounding, not bit for bit (the moments, which
take no square root, agree bit for bit interpreted by triton 3.9 against torch 2.13's CPU build;
torch 2.11's lerp and triton 3.6's interpreted fma round apart). The copy is the parameter rounded to
nearest even, the cast autocast makes (a GPU's conversion instruction; Triton's interpreter
truncates to bf16, so there the kernel rounds the bits itself first).

Runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it).
"""

from __future__ import annotations

import math

import torch

from .triton_quantize import HAVE_TRITON, TRITON_MISSING, hw_cvt, on_device

if HAVE_TRITON:
    import triton
    import triton.language as tl

__all__ = ["adamw_replicas_"]

#: elements a program steps, and its warps: 4 values a thread, each fp32 tensor read and written
#: in 16-byte accesses, a bf16 one in 8-byte ones. With 8 values a thread (4 warps) the compiler
#: moved the bf16 values between layouts through shared memory (5 barriers, 712 instructions
#: against 432 for sm_90a; ``python -m lowcomm.kernels.triton_static --only adamw``)
_BLOCK, _WARPS = 1024, 8

if HAVE_TRITON:

    @triton.jit
    def _adamw_replicas_kernel(
        p_ptr,
        g_ptr,
        m1_ptr,
        m2_ptr,
        coef_ptr,
        copy_ptr,
        n,
        decay,
        beta1,
        beta2,
        one_minus_beta1,
        one_minus_beta2,
        step_size,
        bc2_sqrt,
        eps,
        HAS_COEF: tl.constexpr,
        HAS_COPY: tl.constexpr,
        RNE_BF16: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        r = tl.program_id(1)  # the replica
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        at = r.to(tl.int64) * n + offs
        g = tl.load(g_ptr + at, mask=mask, other=0.0).to(tl.float32)
        if HAS_COEF:
            g = g * tl.load(coef_ptr + r)
        p = tl.load(p_ptr + at, mask=mask, other=0.0)
        m1 = tl.load(m1_ptr + at, mask=mask, other=0.0)
        m2 = tl.load(m2_ptr + at, mask=mask, other=0.0)
        p = p * decay
        m1 = tl.fma(one_minus_beta1, g - m1, m1)  # lerp, as torch computes it: one rounding
        m2 = tl.fma(one_minus_beta2 * g, g, m2 * beta2)  # mul_, then addcmul: one rounding
        denom = tl.div_rn(tl.sqrt_rn(m2), bc2_sqrt) + eps  # IEEE sqrt and division, as torch's
        p = p + tl.div_rn((-step_size) * m1, denom)  # addcdiv: (value · m1) / denom
        tl.store(p_ptr + at, p, mask=mask)
        tl.store(m1_ptr + at, m1, mask=mask)
        tl.store(m2_ptr + at, m2, mask=mask)
        if HAS_COPY:
            if RNE_BF16:  # the interpreter truncates to bf16: round the bits to nearest even first
                bits = p.to(tl.uint32, bitcast=True)
                bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
                p = tl.where(p != p, p, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
            tl.store(copy_ptr + at, p.to(copy_ptr.dtype.element_ty), mask=mask)


def adamw_replicas_(
    p: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    coef: torch.Tensor | None = None,
    copy: torch.Tensor | None = None,
) -> None:
    """One AdamW step of the stacked parameter ``p`` (M, ...) in place, in one launch.

    Args:
        p, exp_avg, exp_avg_sq: fp32, contiguous, the same shape.
        grad: the gradient, fp32 or bf16/fp16, contiguous, ``p``'s shape.
        step: the step count after this step (1 at the first).
        coef: (M,) fp32, each replica's gradient factor (its clip coefficient), or None for 1.
        copy: where to write ``p`` in low precision after the step (contiguous), or None.
    """
    if not HAVE_TRITON:
        raise RuntimeError(f"adamw_replicas_ needs Triton ({TRITON_MISSING})")
    tensors = {"p": p, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "copy": copy}
    for name, t in tensors.items():
        if t is None:
            continue
        if t.shape != p.shape or not t.is_contiguous() or t.device != p.device:
            raise ValueError(
                f"adamw_replicas_: {name} is {tuple(t.shape)} on {t.device} "
                f"(contiguous: {t.is_contiguous()}); every tensor must be contiguous, "
                f"{tuple(p.shape)}, on {p.device}"
            )
    for name in ("p", "exp_avg", "exp_avg_sq"):
        if tensors[name].dtype != torch.float32:
            raise ValueError(f"adamw_replicas_: {name} is {tensors[name].dtype}; it must be float32")
    M = p.shape[0]
    n = p.numel() // M if M else 0
    if n == 0:
        return
    bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
    with on_device(p):
        _adamw_replicas_kernel[(triton.cdiv(n, _BLOCK), M)](
            p,
            grad,
            exp_avg,
            exp_avg_sq,
            coef if coef is not None else p,
            copy if copy is not None else p,
            n,
            1.0 - lr * weight_decay,
            beta1,
            beta2,
            1.0 - beta1,
            1.0 - beta2,
            lr / bc1,
            math.sqrt(bc2),
            eps,
            HAS_COEF=coef is not None,
            HAS_COPY=copy is not None,
            RNE_BF16=copy is not None and copy.dtype == torch.bfloat16 and not hw_cvt(p),
            BLOCK=_BLOCK,
            num_warps=_WARPS,
        )


def static_specs() -> list:
    """The kernel as launched on CUDA by a bf16 run's matrices (bf16 gradient, clip coefficients,
    bf16 copy) and by an fp32 run's, for :mod:`lowcomm.kernels.triton_static`."""
    from .triton_static import KernelSpec

    scalars = (
        "decay",
        "beta1",
        "beta2",
        "one_minus_beta1",
        "one_minus_beta2",
        "step_size",
        "bc2_sqrt",
        "eps",
    )
    specs = []
    for grad, copy in (("bf16", "*bf16"), ("fp32", None)):
        ptrs = {
            "p_ptr": "*fp32",
            "g_ptr": f"*{grad}",
            "m1_ptr": "*fp32",
            "m2_ptr": "*fp32",
            "coef_ptr": "*fp32",
        }
        ptrs["copy_ptr"] = copy or "*fp32"
        sig = {**ptrs, "n": "i32", **{s: "fp32" for s in scalars}}
        consts = dict(HAS_COEF=True, HAS_COPY=copy is not None, RNE_BF16=False, BLOCK=_BLOCK)
        sig.update({k: "constexpr" for k in consts})
        name = f"adamw_replicas ({grad} gradient{', bf16 copy' if copy else ''})"
        specs.append(
            KernelSpec(
                name, _adamw_replicas_kernel, sig, consts, num_warps=_WARPS, num_stages=1, aligned=("n",)
            )
        )
    return specs
