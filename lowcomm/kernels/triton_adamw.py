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

import functools
import math

import torch

from .triton_quantize import HAVE_TRITON, TRITON_MISSING, hw_cvt, on_device

if HAVE_TRITON:
    import triton
    import triton.language as tl

__all__ = ["adamw_replicas_", "adamw_replicas_multi_", "sumsq_replicas"]

#: elements a program steps, and its warps: 4 values a thread, each fp32 tensor read and written
#: in 16-byte accesses, a bf16 one in 8-byte ones. With 8 values a thread (4 warps) the compiler
#: moved the bf16 values between layouts through shared memory (5 barriers, 712 instructions
#: against 432 for sm_90a; ``python -m lowcomm.kernels.triton_static --only adamw``)
_BLOCK, _WARPS = 1024, 8

if HAVE_TRITON:

    @triton.jit
    def _adamw_math(
        p, g, m1, m2, decay, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, bc2_sqrt, eps
    ):
        # torch's AdamW on fp32 values (the module's docstring), g already scaled by the coefficient
        p = p * decay
        m1 = tl.fma(one_minus_beta1, g - m1, m1)  # lerp, as torch computes it: one rounding
        m2 = tl.fma(one_minus_beta2 * g, g, m2 * beta2)  # mul_, then addcmul: one rounding
        denom = tl.div_rn(tl.sqrt_rn(m2), bc2_sqrt) + eps  # IEEE sqrt and division, as torch's
        p = p + tl.div_rn((-step_size) * m1, denom)  # addcdiv: (value · m1) / denom
        return p, m1, m2

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
        p, m1, m2 = _adamw_math(
            p, g, m1, m2, decay, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, bc2_sqrt, eps
        )
        tl.store(p_ptr + at, p, mask=mask)
        tl.store(m1_ptr + at, m1, mask=mask)
        tl.store(m2_ptr + at, m2, mask=mask)
        if HAS_COPY:
            if RNE_BF16:  # the interpreter truncates to bf16: round the bits to nearest even first
                bits = p.to(tl.uint32, bitcast=True)
                bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
                p = tl.where(p != p, p, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
            tl.store(copy_ptr + at, p.to(copy_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _chunk(chunk_tensor_ptr, chunk_start_ptr, n_ptr, VEC: tl.constexpr, BLOCK: tl.constexpr):
        # a multi-tensor program's work: chunk program_id(0) of tensor t (chunk_tensor_ptr), its
        # offsets within a replica (from chunk_start_ptr, a multiple of BLOCK), which of them are
        # inside (n_ptr[t] elements a replica, a multiple of VEC), and replica program_id(1)'s
        # offsets within the tensor
        c = tl.program_id(0)
        t = tl.load(chunk_tensor_ptr + c)
        n = tl.multiple_of(tl.load(n_ptr + t), VEC)
        offs = tl.multiple_of(tl.load(chunk_start_ptr + c), BLOCK) + tl.arange(0, BLOCK)
        return t, offs, offs < n, tl.program_id(1).to(tl.int64) * n + offs

    @triton.jit
    def _adamw_multi_kernel(
        base_ptr,
        delta_ptr,
        hyper_ptr,
        n_ptr,
        chunk_tensor_ptr,
        chunk_start_ptr,
        coef_ptr,
        HAS_COEF: tl.constexpr,
        VEC: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # program (c, r): chunk c of one tensor (chunk_tensor_ptr[c], from chunk_start_ptr[c]),
        # replica r. The tensor's p, g, m1, m2 lie at base_ptr + delta_ptr[4t + i] (fp32 elements
        # from the first tensor of the launch: an argument, so its alignment is known), its
        # scalars at hyper_ptr[8t:] (_adamw_replicas_kernel's order), its elements a replica at
        # n_ptr[t]; VEC: every offset and length a multiple of it (16-byte accesses where 4)
        r = tl.program_id(1)
        t, offs, mask, at = _chunk(chunk_tensor_ptr, chunk_start_ptr, n_ptr, VEC, BLOCK)
        d = delta_ptr + 4 * t
        p_at = base_ptr + tl.multiple_of(tl.load(d), VEC) + at
        g_at = base_ptr + tl.multiple_of(tl.load(d + 1), VEC) + at
        m1_at = base_ptr + tl.multiple_of(tl.load(d + 2), VEC) + at
        m2_at = base_ptr + tl.multiple_of(tl.load(d + 3), VEC) + at
        h = hyper_ptr + 8 * t
        g = tl.load(g_at, mask=mask, other=0.0)
        if HAS_COEF:
            g = g * tl.load(coef_ptr + r)
        p = tl.load(p_at, mask=mask, other=0.0)
        m1 = tl.load(m1_at, mask=mask, other=0.0)
        m2 = tl.load(m2_at, mask=mask, other=0.0)
        p, m1, m2 = _adamw_math(
            p,
            g,
            m1,
            m2,
            tl.load(h),
            tl.load(h + 1),
            tl.load(h + 2),
            tl.load(h + 3),
            tl.load(h + 4),
            tl.load(h + 5),
            tl.load(h + 6),
            tl.load(h + 7),
        )
        tl.store(p_at, p, mask=mask)
        tl.store(m1_at, m1, mask=mask)
        tl.store(m2_at, m2, mask=mask)

    @triton.jit
    def _sumsq_kernel(
        base_ptr,
        delta_ptr,
        n_ptr,
        chunk_tensor_ptr,
        chunk_start_ptr,
        out_ptr,
        M,
        VEC: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # program (c, r): the sum of squares (fp32) of chunk c of one tensor's replica r, into
        # out_ptr[c, r]; the tensor at base_ptr + delta_ptr[t] elements (base_ptr's type), as in
        # _adamw_multi_kernel
        t, offs, mask, at = _chunk(chunk_tensor_ptr, chunk_start_ptr, n_ptr, VEC, BLOCK)
        at += tl.multiple_of(tl.load(delta_ptr + t), VEC)
        x = tl.load(base_ptr + at, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + tl.program_id(0) * M + tl.program_id(1), tl.sum(x * x, axis=0))


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
    M = p.shape[0] if p.dim() else 0
    fp32 = {"p": p, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    _check_stacked("adamw_replicas_", fp32, M, p.device, (torch.float32,), shape=p.shape)
    others = {k: t for k, t in (("grad", grad), ("copy", copy)) if t is not None}
    _check_stacked("adamw_replicas_", others, M, p.device, shape=p.shape)
    n = p.numel() // M if M else 0
    if n == 0:
        return
    with on_device(p):
        _adamw_replicas_kernel[(triton.cdiv(n, _BLOCK), M)](
            p,
            grad,
            exp_avg,
            exp_avg_sq,
            coef if coef is not None else p,
            copy if copy is not None else p,
            n,
            *_scalars(step, lr, beta1, beta2, eps, weight_decay),
            HAS_COEF=coef is not None,
            HAS_COPY=copy is not None,
            RNE_BF16=copy is not None and copy.dtype == torch.bfloat16 and not hw_cvt(p),
            BLOCK=_BLOCK,
            num_warps=_WARPS,
        )


def _scalars(step: float, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> tuple:
    """A step's scalars in the kernels' order: decay, β1, β2, 1 − β1, 1 − β2, lr / bc1, √bc2, ε
    (the bias corrections from the step count, on the host, as torch's AdamW computes them)."""
    bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
    return (1.0 - lr * weight_decay, beta1, beta2, 1.0 - beta1, 1.0 - beta2, lr / bc1, math.sqrt(bc2), eps)


@functools.lru_cache(maxsize=64)
def _chunks(ns: tuple, device: torch.device) -> tuple:
    """A multi-tensor launch's programs over tensors of ``ns`` elements a replica: each chunk of
    ``_BLOCK``'s tensor (int32) and first element (int64), and ``ns`` (int64), on ``device``; made
    once per list of shapes (a model's parameters keep theirs)."""
    tensor = [t for t, n in enumerate(ns) for _ in range(0, n, _BLOCK)]
    start = [s for n in ns for s in range(0, n, _BLOCK)]
    return (
        torch.tensor(tensor, dtype=torch.int32, device=device),
        torch.tensor(start, dtype=torch.int64, device=device),
        torch.tensor(ns, dtype=torch.int64, device=device),
    )


def _deltas(tensors: list, base: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Where each tensor starts, in elements from ``base`` (all of its dtype), as an int64 tensor
    on its device (a copy that does not wait for the GPU: the kernel reading it is queued after it
    on the same stream); and the widest VEC (elements) dividing every offset, every tensor's
    elements a replica and ``base``'s 16-byte alignment, up to a 16-byte access."""
    size = base.element_size()
    deltas = [(t.data_ptr() - base.data_ptr()) // size for t in tensors]
    vec = 16 // size if base.data_ptr() % 16 == 0 else 1
    while vec > 1 and any(
        d % vec or (t.numel() // max(t.shape[0], 1)) % vec for d, t in zip(deltas, tensors)
    ):
        vec //= 2
    return torch.tensor(deltas, dtype=torch.int64).to(base.device, non_blocking=True), vec


def _check_stacked(fn: str, named: dict, M: int, device: torch.device, dtypes=None, shape=None) -> None:
    """Each of ``named`` contiguous (M, ...) on ``device`` (of ``shape`` and ``dtypes`` where
    given), else a ValueError naming the tensor."""
    for name, t in named.items():
        fits = t.shape == shape if shape is not None else t.dim() > 0 and t.shape[0] == M
        if not fits or not t.is_contiguous() or t.device != device:
            want = tuple(shape) if shape is not None else f"({M}, ...)"
            raise ValueError(
                f"{fn}: {name} is {tuple(t.shape)} on {t.device} (contiguous: {t.is_contiguous()}); "
                f"every tensor must be contiguous, {want}, on {device}"
            )
        if dtypes is not None and t.dtype not in dtypes:
            raise ValueError(f"{fn}: {name} is {t.dtype}; it must be one of {[str(d) for d in dtypes]}")


def adamw_replicas_multi_(
    params: list,
    grads: list,
    exp_avgs: list,
    exp_avg_sqs: list,
    hypers: list,
    coef: torch.Tensor | None = None,
) -> None:
    """One AdamW step of several stacked fp32 parameters in one launch, each as
    :func:`adamw_replicas_` steps it with an fp32 gradient and no copy (the same arithmetic on
    the same fp32 scalars). For the many small parameters of a model (biases, layer norms), where
    a launch each, or torch's multi-tensor step (a dozen launches, and M views of each gradient
    for the coefficients), costs the host more than their bytes cost the GPU.

    Args:
        params, grads, exp_avgs, exp_avg_sqs: fp32, contiguous, each (M, ...) with one M, on one
            device; the four of a parameter of one shape.
        hypers: each parameter's ``dict(step, lr, beta1, beta2, eps, weight_decay)``, its step
            count after this step.
        coef: (M,) fp32, each replica's gradient factor, or None for 1.
    """
    if not HAVE_TRITON:
        raise RuntimeError(f"adamw_replicas_multi_ needs Triton ({TRITON_MISSING})")
    if not params:
        return
    M, dev = params[0].shape[0] if params[0].dim() else 0, params[0].device
    f32 = (torch.float32,)
    for i, quad in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)):
        named = dict(zip((f"p[{i}]", f"grad[{i}]", f"exp_avg[{i}]", f"exp_avg_sq[{i}]"), quad))
        _check_stacked("adamw_replicas_multi_", named, M, dev, f32)
        if any(t.shape != quad[0].shape for t in quad):
            raise ValueError(f"adamw_replicas_multi_: parameter {i}'s tensors differ in shape")
    if M == 0:
        return
    tensor, start, ns = _chunks(tuple(p.numel() // M for p in params), dev)
    if len(tensor) == 0:
        return
    quads = [t for quad in zip(params, grads, exp_avgs, exp_avg_sqs) for t in quad]
    deltas, vec = _deltas(quads, params[0])
    hyper = torch.tensor([v for h in hypers for v in _scalars(**h)], dtype=torch.float32)
    hyper = hyper.to(dev, non_blocking=True)
    with on_device(params[0]):
        _adamw_multi_kernel[(len(tensor), M)](
            params[0],
            deltas,
            hyper,
            ns,
            tensor,
            start,
            coef if coef is not None else hyper,
            HAS_COEF=coef is not None,
            VEC=vec,
            BLOCK=_BLOCK,
            num_warps=_WARPS,
        )


def sumsq_replicas(tensors: list) -> torch.Tensor:
    """Each replica's sum of squares over stacked tensors ``(M, ...)`` of any float dtype, in
    fp32: ``(M,)``. One launch per dtype among them and a sum of its chunks' partial sums (no
    atomics: the same bits every run). The per-replica clip's norms (their square roots) in two
    or three launches, where torch's multi-tensor norm needs every replica's view of every
    gradient (400 for the reference GPT's 4 replicas) built on the host first."""
    if not HAVE_TRITON:
        raise RuntimeError(f"sumsq_replicas needs Triton ({TRITON_MISSING})")
    if not tensors:
        raise ValueError("sumsq_replicas: no tensors")
    M, dev = tensors[0].shape[0] if tensors[0].dim() else 0, tensors[0].device
    floats = (torch.float32, torch.bfloat16, torch.float16)
    _check_stacked("sumsq_replicas", {f"tensors[{i}]": t for i, t in enumerate(tensors)}, M, dev, floats)
    total = torch.zeros(M, dtype=torch.float32, device=dev)
    if M == 0:
        return total
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        group = [t for t in tensors if t.dtype == dtype]
        tensor, start, ns = _chunks(tuple(t.numel() // M for t in group), dev)
        if len(tensor) == 0:
            continue
        partial = torch.empty(len(tensor), M, dtype=torch.float32, device=dev)
        deltas, vec = _deltas(group, group[0])
        with on_device(group[0]):
            _sumsq_kernel[(len(tensor), M)](
                group[0], deltas, ns, tensor, start, partial, M, VEC=vec, BLOCK=_BLOCK, num_warps=_WARPS
            )
        total += partial.sum(0)
    return total


def static_specs() -> list:
    """The kernel as launched on CUDA by a bf16 run's matrices (bf16 gradient, clip coefficients,
    bf16 copy) and by an fp32 run's, the multi-tensor step and the clip's sums of squares, for
    :mod:`lowcomm.kernels.triton_static`."""
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
    # the multi-tensor step (the small parameters) and the clip's sums of squares (bf16 copies'
    # gradients, fp32 ones), every tensor 16-byte aligned (VEC: 16 bytes of elements)
    tables = {"delta_ptr": "*i64", "n_ptr": "*i64", "chunk_tensor_ptr": "*i32", "chunk_start_ptr": "*i64"}
    consts = dict(HAS_COEF=True, VEC=4, BLOCK=_BLOCK)
    sig = {"base_ptr": "*fp32", **tables, "hyper_ptr": "*fp32", "coef_ptr": "*fp32"}
    sig.update({k: "constexpr" for k in consts})
    specs.append(KernelSpec("adamw_multi", _adamw_multi_kernel, sig, consts, num_warps=_WARPS, num_stages=1))
    for like, vec in (("bf16", 8), ("fp32", 4)):
        consts = dict(VEC=vec, BLOCK=_BLOCK)
        sig = {"base_ptr": f"*{like}", **tables, "out_ptr": "*fp32", "M": "i32"}
        sig.update({k: "constexpr" for k in consts})
        name = f"sumsq_replicas ({like})"
        specs.append(KernelSpec(name, _sumsq_kernel, sig, consts, num_warps=_WARPS, num_stages=1))
    return specs
