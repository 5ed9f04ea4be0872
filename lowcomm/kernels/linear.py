"""Low-precision training Linear layers and the module swap that installs them.

One autograd Function holds the whole recipe. With ``y = x Wᵀ + b`` (x: (T, K), W: (N, K)):

    fprop  y  = x  · Wᵀ   contraction over K (in-features)  -> x and W blocked along K
    dgrad  dx = dy · W    contraction over N (out-features) -> dy and W blocked along N
    wgrad  dW = dyᵀ· x    contraction over T (tokens)       -> dy and x blocked along T

so every operand is quantized along the axis its GEMM reduces over (docs/references.md, MX formats:
"each operand is needed blocked along two different axes"). Master weights stay as they are (fp32 or
bf16 Parameters, shared with the original module), so optimizers and DiLoCo see ordinary parameters.

References:
    NVIDIA, "Recipes for Pre-training LLMs with MXFP8" (2025): E4M3 everywhere, rceil scales.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .._compat import autocast_dtype
from .formats import TRITON_READS, get_elem_format
from .gemm import RECIPES, _triton_runs_on, check_backend, choose_backend, fp8_scale, qmatmul

__all__ = [
    "LowPrecisionLinear",
    "Float8Linear",
    "MXFP8Linear",
    "convert_to_low_precision",
    "check_precision_on",
    "layer_backend",
    "PRECISIONS",
    "LAYER_RECIPES",
    "FAST_ACCUM_MODES",
]

#: a layer's recipes: the GEMM recipes, and fp8 tensorwise with delayed scaling (the layer keeps
#: the absolute maxima of earlier steps; its GEMMs are fp8_tensorwise's)
LAYER_RECIPES = (*RECIPES, "fp8_delayed")
PRECISIONS = ("fp32", *LAYER_RECIPES)
#: steps of absolute maxima a delayed-scaling layer keeps (TransformerEngine's default is 1024; a short
#: window lets one outlier step leave the scale soon: docs/references.md, MX formats and FP8)
AMAX_HISTORY_LEN = 16

#: how the fp8 layers (tensorwise, rowwise, delayed) quantize under torch.compile
#: ($LOWCOMM_COMPILED_QUANTIZE, read at import, checked when a layer is made): "triton", the Triton
#: quantize as an operator the compiler keeps whole (a pass of its own over each tensor), or
#: "inductor", the same arithmetic in torch ops (:func:`~.triton_fp8.fp8_quantize_dual_torch`,
#: :func:`~.triton_fp8.fp8_quantize_scaled_torch`: the same bytes and maxima) that the compiler
#: generates and can fuse into the kernel producing the tensor, as torchao's float8 layers are
#: compiled. Eager calls and mxfp8_fast always use their Triton kernels, and fp8_delayed its
#: one-launch step of scales and history.
COMPILED_QUANTIZE = os.environ.get("LOWCOMM_COMPILED_QUANTIZE", "triton")
COMPILED_QUANTIZES = ("triton", "inductor")
#: the recipes whose quantize COMPILED_QUANTIZE chooses
COMPILED_QUANTIZE_RECIPES = ("fp8_tensorwise", "fp8_rowwise", "fp8_delayed")
#: which of an fp8 layer's GEMMs in torch._scaled_mm let the fp8 MMA sum over K in its own
#: precision (``use_fast_accum``) instead of promoting the sums to fp32 as they go:
#: "fprop" (the forward GEMM only, over in-features: TransformerEngine's and torchao's tensorwise
#: default; dgrad and wgrad, summing over out-features and tokens, promote), "all" (torchao's
#: rowwise recipe) or "none". docs/references.md, FP8 on Hopper.
FAST_ACCUM_MODES = ("none", "fprop", "all")
#: the layers' default (the trainer's too)
FAST_ACCUM = "fprop"


def _compiler_quantizes() -> bool:
    """Whether this fp8 quantize runs in torch ops for the compiler: ``inductor`` and compiling."""
    return COMPILED_QUANTIZE == "inductor" and torch.compiler.is_compiling()


class _QLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, weight, bias, recipe, grad_elem, backend, backward_follows, delayed, out_dtype, fast_accum
    ):
        # delayed: fp8_delayed only, (amax, scales, record, scaled): the layer's running maxima,
        # the scales of x, W, dy from its history (None on its first training step: scaled
        # dynamically), whether this call records maxima (evaluation does not), whether its GEMMs
        # run in torch._scaled_mm; out_dtype: the output's dtype (None: x's); fast_accum: one of
        # FAST_ACCUM_MODES
        x2 = x.reshape(-1, x.shape[-1])
        out_dtype = out_dtype or x.dtype
        added = False  # the bias added by the forward GEMM (its epilogue)
        if recipe == "fp8_delayed":
            scaled = delayed[3]
            y, added = _FusedFloat8.forward(
                ctx, x2, weight, bias, recipe, backward_follows, scaled, delayed, out_dtype, fast_accum
            )
        elif mx := _fused_mx(recipe, backend, x2, weight):
            y = _FusedMX.forward(ctx, x2, weight, backward_follows, out_dtype, mx)
        elif which := _fused_backend(recipe, backend, x2, weight):
            scaled = which == "scaled_mm"
            y, added = _FusedFloat8.forward(
                ctx, x2, weight, bias, recipe, backward_follows, scaled, None, out_dtype, fast_accum
            )
        else:
            fast = fast_accum != "none"
            y = qmatmul(x2, weight.t(), recipe, backend=backend, fast_accum=fast, **_weight_tile(recipe))
            ctx.save_for_backward(x2, weight)
            ctx.fused = False
        ctx.cfg = (recipe, grad_elem, backend, x.shape, bias is not None, fast_accum)
        y = y.to(out_dtype).reshape(*x.shape[:-1], weight.shape[0])
        return y + bias.to(out_dtype) if bias is not None and not added else y

    @staticmethod
    def backward(ctx, gy):
        if autocast_dtype(gy.device.type) is None:
            return _QLinear._backward(ctx, gy)
        with torch.autocast(gy.device.type, enabled=False):  # a backward called inside autocast
            return _QLinear._backward(ctx, gy)

    @staticmethod
    def _backward(ctx, gy):
        recipe, grad_elem, backend, x_shape, has_bias, fast_accum = ctx.cfg
        gy2 = gy.reshape(-1, gy.shape[-1])
        dx = dw = db = None
        if ctx.fused:
            fused = _FusedMX if recipe == "mxfp8" else _FusedFloat8
            dx, dw = fused.backward(ctx, gy2, grad_elem)
            dx = dx.to(gy.dtype).reshape(x_shape) if dx is not None else None
            dw = dw.to(ctx.weight_dtype) if dw is not None else None
        else:
            x2, weight = ctx.saved_tensors
            kw = dict(elem_a=grad_elem, backend=backend, fast_accum=fast_accum == "all")
            if ctx.needs_input_grad[0]:
                dx = qmatmul(gy2, weight, recipe, **kw, **_weight_tile(recipe))
                dx = dx.to(gy.dtype).reshape(x_shape)
            if ctx.needs_input_grad[1]:
                dw = qmatmul(gy2.t(), x2, recipe, **kw).to(weight.dtype)
        if has_bias and ctx.needs_input_grad[2]:
            db = gy2.sum(0, dtype=torch.float32)
        return dx, dw, db, None, None, None, None, None, None, None


def _weight_tile(recipe: str) -> dict:
    """mxfp8_fast blocks the weight in 128x128 tiles (fprop, dgrad) and activations and gradients
    1x128: DeepSeek-V3's granularity, the pairing cuBLAS's blockwise GEMM runs fastest on sm_90."""
    return {"b_tile": "128x128"} if recipe == "mxfp8_fast" else {}


def _fused_mx(recipe: str, backend: str, x2: torch.Tensor, weight: torch.Tensor) -> str | None:
    """The backend of this layer call's fused MX path ("triton" or "dequant"), or None: exact MX
    on one of them, both weight sides multiples of 32 (else qmatmul pads K per GEMM)."""
    if recipe != "mxfp8" or weight.shape[0] % 32 or weight.shape[1] % 32:
        return None
    which = choose_backend(recipe, x2.device, backend)
    return which if which in ("triton", "dequant") else None


class _FusedMX:
    """MXFP8 fprop, dgrad and wgrad from one fused quantize per tensor (the triton and dequant
    backends: the GEMMs are :func:`~.triton_mx_gemm.mx_matmul` or, dequantizing the copies to bf16
    for the bf16 GEMM, :func:`~.triton_mx_gemm.mx_dequant_matmul`).

    ``mx_quantize_dual`` writes each of x, W and dy blocked along both of its axes in one pass, and
    the three GEMMs read those copies in place (a transposed view is a stride, not a copy):

        fprop  y  = xr · Wrᵀ        x blocked along K, W along K
        dgrad dx = dyr · Wc         dy blocked along N, W along N
        wgrad dW = dycᵀ · xc        dy blocked along T, x along T

    Only the fp8 copies that backward needs are saved (xc, Wc: a byte per element plus scales),
    not x and W; without a backward to follow (no_grad) only the copies fprop reads are made.
    Tokens are zero-padded to a multiple of 32 (zero rows change no product). The numerics are
    those of the emulated MX path: the same quantization bit for bit (tested), exact products,
    fp32 accumulation.
    """

    @staticmethod
    def forward(
        ctx, x2: torch.Tensor, weight: torch.Tensor, backward_follows: bool, out_dtype, backend: str
    ) -> torch.Tensor:
        from .triton_quantize import mx_quantize, mx_quantize_dual

        gemm = _mx_gemm(backend)

        T = x2.shape[0]
        xp, w = _pad_rows(x2), weight.detach()
        if backward_follows:
            xr, xrs, xc, xcs = mx_quantize_dual(xp)
            wr, wrs, wc, wcs = mx_quantize_dual(w)
            ctx.save_for_backward(xc, xcs, wc, wcs)
        else:  # no_grad (evaluation, inference): only the copies fprop reads
            (xr, xrs), (wr, wrs) = mx_quantize(xp), mx_quantize(w)
        y = gemm(xr, xrs, wr.t(), wrs.t(), out_dtype=_gemm_out(out_dtype))[:T]
        ctx.fused, ctx.tokens, ctx.weight_dtype, ctx.mx_backend = True, T, weight.dtype, backend
        return y

    @staticmethod
    def backward(ctx, gy2: torch.Tensor, grad_elem: str):
        from .triton_quantize import mx_quantize_dual

        gemm = _mx_gemm(ctx.mx_backend)
        xc, xcs, wc, wcs = ctx.saved_tensors
        gr, grs, gc, gcs = mx_quantize_dual(_pad_rows(gy2), elem=grad_elem)
        dx = (
            gemm(gr, grs, wc, wcs, out_dtype=_gemm_out(gy2.dtype))[: ctx.tokens]
            if ctx.needs_input_grad[0]
            else None
        )
        dw = gemm(gc.t(), gcs.t(), xc, xcs) if ctx.needs_input_grad[1] else None
        return dx, dw


def _mx_gemm(backend: str) -> Callable:
    """The exact-MX GEMM of a fused MX backend (looked up at each call: tests replace them)."""
    from . import triton_mx_gemm

    return triton_mx_gemm.mx_dequant_matmul if backend == "dequant" else triton_mx_gemm.mx_matmul


def _gemm_out(want: torch.dtype) -> torch.dtype:
    """What a Triton GEMM writes for an output wanted in ``want``: it, if the GEMM writes it, else
    fp32 (cast after)."""
    from .triton_mx_gemm import OUT_DTYPES

    return want if want in OUT_DTYPES else torch.float32


def _pad_rows(t: torch.Tensor, multiple: int = 32) -> torch.Tensor:
    pad = (-t.shape[0]) % multiple
    return torch.nn.functional.pad(t, (0, 0, 0, pad)) if pad else t.contiguous()


def _quantize_input(t: torch.Tensor, scaling: str) -> torch.Tensor:
    """x or dy as the quantize-once path quantizes it: in a dtype the Triton quantize reads (else
    fp32), its tokens zero-padded to wgrad's multiple (16; blockwise: whole 128-blocks)."""
    return _pad_rows(t if t.dtype in TRITON_READS else t.float(), 128 if scaling == "blockwise" else 16)


#: the weight sides a quantize-once layer needs: cuBLASLt's 16 for fp8, whole 128x128 tiles for
#: mxfp8_fast
_FUSED_MULTIPLE = {"fp8_tensorwise": 16, "fp8_rowwise": 16, "mxfp8_fast": 128}


def _fused_backend(recipe: str, backend: str, x2: torch.Tensor, weight: torch.Tensor) -> str | None:
    """The GEMMs of this layer call when it quantizes each tensor once (None: it quantizes per
    GEMM): "scaled_mm" for the fp8 recipes through torch._scaled_mm and for mxfp8_fast where the
    device has cuBLAS's blockwise GEMM (sm_90; its e5m2 gradient GEMMs then run in Triton), or
    "triton" for mxfp8_fast on the Triton blockwise GEMM. Also needed: the Triton quantize runs
    here, both weight sides are whole multiples (cuBLASLt's 16; 128x128 tiles), dtypes it reads."""
    from .gemm import _triton_reads

    multiple = _FUSED_MULTIPLE.get(recipe)
    if not (
        multiple is not None
        and weight.shape[0] % multiple == 0
        and weight.shape[1] % multiple == 0
        and _triton_reads(x2)
        and _triton_reads(weight)
    ):
        return None
    which = choose_backend(recipe, x2.device, backend)
    return which if which == "scaled_mm" or (which == "triton" and recipe == "mxfp8_fast") else None


def _delayed_on_scaled_mm(backend: str, x2: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a delayed-scaling layer's GEMMs run in torch._scaled_mm (else emulated in fp32, the
    same fp8 bytes): the device serves fp8 tensorwise; under ``auto`` also cuBLASLt's shapes (both
    weight sides multiples of 16). An explicit ``scaled_mm`` on shapes it cannot take is refused
    by the layout check, naming the rule."""
    if choose_backend("fp8_tensorwise", x2.device, backend, label="fp8_delayed") != "scaled_mm":
        return False
    return backend == "scaled_mm" or (weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0)


def _fp8_copies(t: torch.Tensor, elem: str, scaling: str, cols: bool, delayed, index: int, rows=True):
    """The fp8 copies of ``t`` (as it is, and transposed): dynamic (:func:`fp8_quantize_dual`, two
    passes), or delayed: one pass with ``scales[index]`` from earlier steps (``t``'s own maximum
    on the first step), recording ``t``'s maximum in ``amax[index]`` when the step is training;
    in Triton where the GEMMs run in torch._scaled_mm, in torch ops where they are emulated."""
    from . import triton_fp8
    from .triton_quantize import mx_fast_quantize_dual

    if scaling == "blockwise":  # mxfp8_fast: the weight (index 1) in 128x128 tiles, the rest 1x128
        return mx_fast_quantize_dual(t, elem, "128x128" if index == 1 else "1x128", rows=rows, cols=cols)
    if delayed is None:
        if _compiler_quantizes():
            return triton_fp8.fp8_quantize_dual_torch(t, elem, scaling, rows=rows, cols=cols)
        return triton_fp8.fp8_quantize_dual(t, elem, scaling, rows=rows, cols=cols)
    amax, scales, record, scaled = delayed
    scale = fp8_scale(t.abs().amax().float(), elem) if scales is None else scales[index]
    if _compiler_quantizes():
        scaled = False  # the torch ops, whatever runs the GEMMs: the same bytes and maxima
    quantize = triton_fp8.fp8_quantize_scaled if scaled else triton_fp8.fp8_quantize_scaled_torch
    return quantize(t, scale, elem, rows=rows, cols=cols, amax=amax if record else None, index=index)


def _fp8_gemm_out(scaling: str, want: torch.dtype) -> torch.dtype:
    """What :func:`_fp8_mm`'s torch._scaled_mm writes for an output wanted in ``want``: rowwise
    scaling bf16, all it can; tensorwise as the Triton GEMMs do (a bf16 output under autocast
    saves a cast of an fp32 one)."""
    return torch.bfloat16 if scaling == "rowwise" else _gemm_out(want)


def _fp8_mm(
    a, b, scale_a, scale_b, want: torch.dtype, scaled: bool, scaling: str, fast: bool = False, bias=None
) -> torch.Tensor:
    """``(a * scale_a) @ (b * scale_b)`` of fp8 operands, an output wanted in ``want``:
    torch._scaled_mm (writing :func:`_fp8_gemm_out`; ``fast``: its fast accumulation; ``bias``,
    tensorwise and rowwise only: added in its epilogue), or emulated in fp32. Blockwise
    (mxfp8_fast), scales per 128 of K (``scale_b`` per 128x128 tile of the weight): cuBLAS's GEMM
    where ``scaled`` and both operands are e4m3 (it writes bf16), else the Triton blockwise GEMM,
    each reading the copies in place."""
    from .gemm import blockwise_scaled_mm_operands, scaled_mm

    if scaling == "blockwise":
        if scaled and a.dtype == b.dtype == torch.float8_e4m3fn:  # the layouts cuBLAS reads
            ops = blockwise_scaled_mm_operands(a, scale_a, b, scale_b)
            return scaled_mm(*ops, out_dtype=torch.bfloat16)
        from .triton_mx_gemm import blockwise_matmul

        if scale_b.shape[1] != b.shape[1]:  # 128x128 tiles: the Triton GEMM reads a scale per column
            scale_b = scale_b.repeat_interleave(128, dim=1)
        return blockwise_matmul(a, scale_a, b, scale_b, out_dtype=_gemm_out(want))
    if scaled:
        out_dtype = _fp8_gemm_out(scaling, want)
        return scaled_mm(a, b, scale_a, scale_b, out_dtype=out_dtype, fast_accum=fast, bias=bias)
    return (a.float() * scale_a) @ (b.float() * scale_b)


def _flipped(scale: torch.Tensor) -> torch.Tensor:
    """The scales of a copy seen from its transpose's side of a GEMM: one tensorwise scale as it
    is; a row of scales as a column, or a block grid transposed (a view)."""
    return scale.t() if scale.dim() == 2 else scale


class _FusedFloat8:
    """fp8 fprop, dgrad and wgrad from one quantize per tensor.

    Each of x (T, K), W (N, K) and dy (T, N) is made as it is, scaled along its last axis, and
    transposed, scaled along its first; every GEMM then reads two copies in place, its contraction
    axis contiguous in both (cuBLASLt's row-major A, column-major B):

        fprop  y  = xq · wqᵀ        per token, per out-feature     (contraction over K)
        dgrad dx = gq · wqtᵀ        per token, per in-feature      (over N)
        wgrad dW = gqt · xqtᵀ       per out-feature, per in-feature (over T)

    Dynamic scaling (fp8_tensorwise, fp8_rowwise; torch._scaled_mm with the Triton quantize):
    tensorwise quantizes each tensor once for both copies; rowwise scales differ by axis, as in the
    emulated recipe. Blockwise (mxfp8_fast: cuBLAS's blockwise GEMM on sm_90, for e4m3 operands,
    else the Triton blockwise GEMM): x and dy in 1x128 blocks along each copy's contraction axis,
    W in 128x128 tiles, regrouped from MX in the same pass (:func:`mx_fast_quantize_dual`).
    Delayed scaling (fp8_delayed): tensorwise scales from earlier steps' maxima, each tensor read
    once (:func:`fp8_quantize_scaled`), the GEMMs in torch._scaled_mm where the device has it,
    else emulated in fp32 from the same bytes. Only the fp8 copies backward reads are saved (xqt,
    wqt), not x and W. Tokens are zero-padded to a multiple of 16 (wgrad's contraction;
    blockwise: of 128, whole blocks; zero rows change no product). The numerics are the emulated
    recipe's: the same bytes (tested), then the GEMM's sum.
    """

    @staticmethod
    def forward(
        ctx, x2, weight, bias, recipe: str, backward_follows: bool, scaled: bool, delayed, out_dtype, fast
    ):
        """y (T, N) and whether the GEMM added ``bias`` (its epilogue: torch._scaled_mm with
        tensorwise or rowwise scaling, writing ``out_dtype`` bf16 or fp16 itself; else the caller
        adds it, a pass over y of its own)."""
        scaling = {"fp8_rowwise": "rowwise", "mxfp8_fast": "blockwise"}.get(recipe, "tensorwise")
        T = x2.shape[0]
        x2 = _quantize_input(x2, scaling)
        xq, sx, xqt, sxt = _fp8_copies(x2, "e4m3", scaling, backward_follows, delayed, 0)
        wq, sw, wqt, swt = _fp8_copies(weight.detach(), "e4m3", scaling, backward_follows, delayed, 1)
        fuse = (
            bias is not None
            and scaled
            and scaling != "blockwise"
            and out_dtype in (torch.bfloat16, torch.float16)
            and _fp8_gemm_out(scaling, out_dtype) == out_dtype
        )
        b = bias.detach().to(out_dtype) if fuse else None
        y = _fp8_mm(xq, wq.t(), sx, _flipped(sw), out_dtype, scaled, scaling, fast != "none", bias=b)[:T]
        if backward_follows:
            ctx.save_for_backward(xqt, sxt, wqt, swt)
        ctx.fused, ctx.tokens, ctx.weight_dtype, ctx.scaling = True, T, weight.dtype, scaling
        ctx.scaled, ctx.delayed, ctx.fast_backward = scaled, delayed, fast == "all"
        return y, fuse

    @staticmethod
    def backward(ctx, gy2: torch.Tensor, grad_elem: str):
        xqt, sxt, wqt, swt = ctx.saved_tensors
        want_dx, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (want_dx or want_dw):
            return None, None
        scaling = ctx.scaling
        g = _quantize_input(gy2, scaling)
        gq, sg, gqt, sgt = _fp8_copies(g, grad_elem, scaling, want_dw, ctx.delayed, 2, rows=want_dx)
        dx = dw = None
        fast = ctx.fast_backward
        if want_dx:  # dx in dy's dtype (bf16 under autocast), dW in fp32 (as the GEMM can write them)
            dx = _fp8_mm(gq, wqt.t(), sg, swt, gy2.dtype, ctx.scaled, scaling, fast)[: ctx.tokens]
        if want_dw:
            dw = _fp8_mm(gqt, xqt.t(), _flipped(sgt), sxt, torch.float32, ctx.scaled, scaling, fast)
        return dx, dw


class LowPrecisionLinear(nn.Linear):
    """``nn.Linear`` whose three GEMMs run in a low-precision recipe.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        recipe: "mxfp8", "mxfp8_fast" (weights in 128x128 tiles, activations and gradients in
            1x128 blocks, regrouped from MX), "fp8_rowwise", "fp8_tensorwise" (dynamic scaling:
            each tensor's own maximum) or "fp8_delayed" (tensorwise scales from the maxima of the
            last ``amax_history_len`` training steps, TransformerEngine's delayed scaling: one
            read of each tensor instead of two; a value beyond that range saturates).
        grad_elem: element format of gradients, "e4m3" (the MXFP8 recipe) or "e5m2".
        backend: "auto", "emulated" or "scaled_mm" (see :func:`lowcomm.kernels.gemm.qmatmul`).
        amax_history_len: fp8_delayed only: steps of maxima kept (default 16).
        fast_accum: the fp8 recipes' GEMMs in torch._scaled_mm that sum in the fp8 MMA's own
            precision, one of :data:`FAST_ACCUM_MODES` ("fprop", the default: the forward's;
            "all"; "none"). No effect on the MX recipes or on emulated GEMMs (fp32 sums).

    Delayed scaling: every training forward (one with a backward to follow) is a step of the
    history: the maxima of x and W it reads, and of dy in its backward, join the history at the
    next training forward, and the scales are those of the history's largest finite maxima (a
    step whose tensor held inf or NaN does not set them). The first training step is scaled
    dynamically (no history yet); evaluation uses the history's scales and records nothing. The
    history lives in buffers ``fp8_amax`` (this step's maxima of x, W, dy) and
    ``fp8_amax_history`` (3, amax_history_len), not saved in ``state_dict`` (a model's state stays
    the same across precisions): a restored or joining replica starts with one dynamic step.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        recipe: str = "mxfp8",
        grad_elem: str = "e4m3",
        backend: str = "auto",
        amax_history_len: int = AMAX_HISTORY_LEN,
        fast_accum: str = FAST_ACCUM,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._set_recipe(recipe, grad_elem, backend, amax_history_len, fast_accum)

    def _set_recipe(
        self, recipe: str, grad_elem: str, backend: str, amax_history_len: int, fast_accum: str
    ) -> None:
        if recipe not in LAYER_RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; allowed: {list(LAYER_RECIPES)}")
        if grad_elem not in ("e4m3", "e5m2"):
            raise ValueError(f"grad_elem must be 'e4m3' or 'e5m2', got {grad_elem!r}")
        _check_fast_accum(fast_accum)
        if COMPILED_QUANTIZE not in COMPILED_QUANTIZES:
            raise ValueError(
                f"LOWCOMM_COMPILED_QUANTIZE={COMPILED_QUANTIZE!r} is not allowed: "
                f"one of {list(COMPILED_QUANTIZES)}"
            )
        check_backend(backend, recipe)
        # the Triton kernels' modules (Triton itself where installed) load with the first
        # low-precision layer, not with lowcomm: their operators exist before anything compiles
        from . import triton_fp8, triton_mx_gemm, triton_quantize  # noqa: F401

        self.recipe, self.grad_elem, self.backend, self.fast_accum = recipe, grad_elem, backend, fast_accum
        if recipe == "fp8_delayed":
            _check_history_len(amax_history_len)
            dev = self.weight.device
            self.register_buffer("fp8_amax", torch.zeros(3, device=dev), persistent=False)
            history = torch.zeros(3, amax_history_len, device=dev)
            self.register_buffer("fp8_amax_history", history, persistent=False)
            fmax = [get_elem_format(e).max for e in ("e4m3", "e4m3", grad_elem)]  # x, W, dy
            self.register_buffer("fp8_max", torch.tensor(fmax, device=dev), persistent=False)
            self._fp8_started = False  # a training step has run: the history has maxima

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backward_follows = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        delayed = None
        if self.recipe == "fp8_delayed":  # the GEMMs' backend, decided once for the call
            scaled = _delayed_on_scaled_mm(self.backend, x, self.weight)
            delayed = (*self._delayed_scales(backward_follows, scaled), backward_follows, scaled)
        # under autocast the output has its dtype, as nn.Linear's would, and the recipe's own
        # arithmetic (fp32 emulation, the fp8 GEMMs' own sums) is left alone
        out_dtype = autocast_dtype(x.device.type)
        args = (
            self.recipe,
            self.grad_elem,
            self.backend,
            backward_follows,
            delayed,
            out_dtype,
            self.fast_accum,
        )
        if out_dtype is None:
            return _QLinear.apply(x, self.weight, self.bias, *args)
        with torch.autocast(x.device.type, enabled=False):
            return _QLinear.apply(x, self.weight, self.bias, *args)

    @torch.no_grad()
    def _delayed_scales(self, training: bool, scaled: bool):
        """fp8_delayed: a training step moves the last step's maxima into the history; the scales
        of x, W and dy (None before the first training step: scaled dynamically). ``scaled``: the
        GEMMs run in torch._scaled_mm, and this in one Triton launch (:func:`fp8_delayed_step`)
        instead of ten torch operations, each a launch a layer and step on a GPU."""
        if self.fp8_amax.dtype != torch.float32:  # model.to(bf16) casts buffers; maxima stay fp32
            self.fp8_amax = self.fp8_amax.float()
            self.fp8_amax_history = self.fp8_amax_history.float()
            self.fp8_max = self.fp8_max.float()  # 448 and 57344 are exact in bf16 and fp16
        started = self._fp8_started
        if training:
            self._fp8_started = True
        if not started:
            return self.fp8_amax, None
        hist = self.fp8_amax_history
        if scaled and _triton_runs_on(hist.device):
            from .triton_fp8 import fp8_delayed_step

            return self.fp8_amax, fp8_delayed_step(self.fp8_amax, hist, self.fp8_max, shift=training)
        if training:
            hist.copy_(torch.cat([self.fp8_amax[:, None], hist[:, :-1]], dim=1))
            self.fp8_amax.zero_()
        # the largest finite maxima (a step with inf or NaN sets nothing)
        top = torch.nan_to_num(hist, nan=0.0, posinf=0.0, neginf=0.0).amax(dim=1)
        return self.fp8_amax, fp8_scale(top, fmax=self.fp8_max)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kw) -> LowPrecisionLinear:
        """A low-precision layer sharing ``linear``'s Parameter objects (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        recipe = kw.pop("recipe", getattr(cls, "default_recipe", "mxfp8"))
        grad_elem, backend = kw.pop("grad_elem", "e4m3"), kw.pop("backend", "auto")
        history = kw.pop("amax_history_len", AMAX_HISTORY_LEN)
        fast_accum = kw.pop("fast_accum", FAST_ACCUM)
        if kw:
            raise TypeError(f"unexpected arguments {sorted(kw)}")
        new._set_recipe(recipe, grad_elem, backend, history, fast_accum)
        return new

    def extra_repr(self) -> str:
        extra = f", amax_history_len={self.fp8_amax_history.shape[1]}" if self.recipe == "fp8_delayed" else ""
        if self.recipe.startswith("fp8"):
            extra += f", fast_accum={self.fast_accum}"
        return f"{super().extra_repr()}, recipe={self.recipe}, grad_elem={self.grad_elem}{extra}"


def _check_history_len(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"amax_history_len must be an integer >= 1, got {n!r}")


def _check_fast_accum(mode) -> None:
    if mode not in FAST_ACCUM_MODES:
        raise ValueError(f"fast_accum must be one of {list(FAST_ACCUM_MODES)}, got {mode!r}")


class Float8Linear(LowPrecisionLinear):
    """FP8 with dynamic tensorwise (default) or rowwise scaling, or delayed tensorwise scaling
    (``scaling="delayed"``: scales from earlier steps' maxima, see :class:`LowPrecisionLinear`)."""

    default_recipe = "fp8_tensorwise"

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *, scaling: str = "tensorwise", **kw
    ):
        if scaling not in ("tensorwise", "rowwise", "delayed"):
            raise ValueError(f"scaling must be 'tensorwise', 'rowwise' or 'delayed', got {scaling!r}")
        super().__init__(in_features, out_features, bias, recipe=f"fp8_{scaling}", **kw)


class MXFP8Linear(LowPrecisionLinear):
    """MXFP8: E4M3 elements, one E8M0 scale per 32 along each GEMM's reduction dimension."""

    default_recipe = "mxfp8"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kw):
        super().__init__(in_features, out_features, bias, recipe="mxfp8", **kw)


def _default_skip(name: str, module: nn.Linear) -> bool:
    return name.split(".")[-1] in ("head", "lm_head", "output")


#: what each layer recipe needs to run on a GPU's own fp8 or MX hardware (else: the fp32 emulation)
_NEEDS = {
    "fp8_tensorwise": "fp8 GEMMs need sm_89 or newer",
    "fp8_rowwise": "fp8 GEMMs need sm_89 or newer",
    "fp8_delayed": "fp8 GEMMs need sm_89 or newer",
    "mxfp8": "MX GEMMs need sm_100 (cuBLAS, torch >= 2.7) or sm_90 with Triton",
    "mxfp8_fast": "its GEMMs need sm_90: cuBLAS's blockwise GEMM or Triton",
}


def layer_backend(recipe: str, device: torch.device) -> str:
    """Where a layer of ``recipe`` (backend ``auto``) runs its GEMMs on ``device``: "scaled_mm",
    "triton", "dequant" or "emulated" (fp32 arithmetic on the quantized values). fp8_delayed's GEMMs are
    fp8_tensorwise's."""
    if recipe not in LAYER_RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; allowed: {list(LAYER_RECIPES)}")
    return choose_backend("fp8_tensorwise" if recipe == "fp8_delayed" else recipe, device, "auto", recipe)


def check_precision_on(precision: str, device: torch.device) -> None:
    """Refuses a precision whose layers would fall back to the fp32 emulation on a GPU (numerically
    the recipe, at a fraction of bf16's speed: what a user who asks a GPU for fp8 does not want).
    On a CPU the emulation is the recipe's path; "fp32" is served everywhere; the library's layers
    still take ``backend="emulated"`` on any device when asked for by name.

    Raises:
        ValueError: naming the precision, the GPU's capability, what the recipe needs and the
            precisions this GPU runs.
    """
    from .._checks import refuse
    from .gemm import _capability
    from .triton_quantize import TRITON_MISSING

    if device.type != "cuda" or precision == "fp32" or layer_backend(precision, device) != "emulated":
        return
    served = [r for r in LAYER_RECIPES if layer_backend(r, device) != "emulated"]
    cap = _capability(device)
    gpu = f"sm_{cap[0]}{cap[1]}" if cap else str(device)
    triton = f"; Triton: {TRITON_MISSING}" if TRITON_MISSING and precision.startswith("mx") else ""
    raise refuse(
        "precision",
        precision,
        f"{', '.join(['fp32', *served])} on this GPU ({gpu}): {precision} would run in the fp32 "
        f"emulation here ({_NEEDS[precision]}{triton}); --device cpu emulates it on purpose",
    )


def convert_to_low_precision(
    model: nn.Module,
    recipe: str = "mxfp8",
    *,
    skip: Callable[[str, nn.Linear], bool] | Iterable[str] | None = None,
    grad_elem: str = "e4m3",
    backend: str = "auto",
    amax_history_len: int = AMAX_HISTORY_LEN,
    fast_accum: str = FAST_ACCUM,
) -> list[str]:
    """Swap the model's ``nn.Linear`` layers for low-precision ones, in place.

    Args:
        model: any module.
        recipe: "mxfp8", "mxfp8_fast", "fp8_rowwise", "fp8_tensorwise" or "fp8_delayed" ("fp32"
            converts nothing).
        skip: names of layers to leave, or ``fn(name, module) -> bool``; default: the output head
            (a layer named head, lm_head or output).
        grad_elem: element format of gradients.
        backend: GEMM backend.
        amax_history_len: fp8_delayed only: steps of maxima each layer keeps.
        fast_accum: which fp8 GEMMs sum in the fp8 MMA's own precision (:data:`FAST_ACCUM_MODES`).

    Returns:
        The names of the converted layers. Layers whose shapes the recipe cannot take (features
        not multiples of 32 for MX, of 16 for fp8) are left as they are.

    Raises:
        ValueError: an unknown recipe.
    """
    if recipe not in PRECISIONS:
        raise ValueError(f"unknown precision {recipe!r}; allowed: {list(PRECISIONS)}")
    if recipe == "fp32":
        return []
    if skip is None:
        skip_fn = _default_skip
    elif callable(skip):
        skip_fn = skip
    else:
        names = set(skip)
        skip_fn = lambda name, m: name in names  # noqa: E731
    if recipe == "fp8_delayed":  # checked before any layer is swapped
        _check_history_len(amax_history_len)
    _check_fast_accum(fast_accum)
    multiple = 32 if recipe == "mxfp8" else 16
    kw = {"amax_history_len": amax_history_len} if recipe == "fp8_delayed" else {}
    converted = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or skip_fn(name, module):
            continue
        if module.in_features % multiple or module.out_features % multiple:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(
            parent,
            child,
            LowPrecisionLinear.from_linear(
                module, recipe=recipe, grad_elem=grad_elem, backend=backend, fast_accum=fast_accum, **kw
            ),
        )
        converted.append(name)
    return converted
