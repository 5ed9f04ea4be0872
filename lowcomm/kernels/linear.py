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

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .gemm import RECIPES, choose_backend, qmatmul

__all__ = ["LowPrecisionLinear", "Float8Linear", "MXFP8Linear", "convert_to_low_precision", "PRECISIONS"]

PRECISIONS = ("fp32", *RECIPES)


class _QLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, recipe, grad_elem, backend, backward_follows):
        x2 = x.reshape(-1, x.shape[-1])
        if _fused_mx(recipe, backend, x2, weight):
            y = _FusedMX.forward(ctx, x2, weight, backward_follows)
        elif _fused_fp8(recipe, backend, x2, weight):
            y = _FusedFloat8.forward(ctx, x2, weight, recipe, backward_follows)
        else:
            y = qmatmul(x2, weight.t(), recipe, backend=backend, **_weight_tile(recipe))
            ctx.save_for_backward(x2, weight)
            ctx.fused = False
        ctx.cfg = (recipe, grad_elem, backend, x.shape, bias is not None)
        y = y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx, gy):
        recipe, grad_elem, backend, x_shape, has_bias = ctx.cfg
        gy2 = gy.reshape(-1, gy.shape[-1])
        dx = dw = db = None
        if ctx.fused:
            fused = _FusedFloat8 if recipe in _FP8_RECIPES else _FusedMX
            dx, dw = fused.backward(ctx, gy2, grad_elem)
            dx = dx.to(gy.dtype).reshape(x_shape) if dx is not None else None
            dw = dw.to(ctx.weight_dtype) if dw is not None else None
        else:
            x2, weight = ctx.saved_tensors
            if ctx.needs_input_grad[0]:
                dx = qmatmul(gy2, weight, recipe, elem_a=grad_elem, backend=backend, **_weight_tile(recipe))
                dx = dx.to(gy.dtype).reshape(x_shape)
            if ctx.needs_input_grad[1]:
                dw = qmatmul(gy2.t(), x2, recipe, elem_a=grad_elem, backend=backend).to(weight.dtype)
        if has_bias and ctx.needs_input_grad[2]:
            db = gy2.sum(0)
        return dx, dw, db, None, None, None, None


def _weight_tile(recipe: str) -> dict:
    """mxfp8_fast blocks the weight in 128x128 tiles (fprop, dgrad) and activations and gradients
    1x128: DeepSeek-V3's granularity, the pairing cuBLAS's blockwise GEMM runs fastest on sm_90."""
    return {"b_tile": "128x128"} if recipe == "mxfp8_fast" else {}


def _fused_mx(recipe: str, backend: str, x2: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this layer call runs the fused MX path: exact MX on the Triton backend, both weight
    sides multiples of 32 (else qmatmul pads K per GEMM)."""
    return (
        recipe == "mxfp8"
        and weight.shape[0] % 32 == 0
        and weight.shape[1] % 32 == 0
        and choose_backend(recipe, x2.device, backend) == "triton"
    )


class _FusedMX:
    """MXFP8 fprop, dgrad and wgrad from one fused quantize per tensor (Triton backend).

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
    def forward(ctx, x2: torch.Tensor, weight: torch.Tensor, backward_follows: bool) -> torch.Tensor:
        from .triton_mx_gemm import mx_matmul
        from .triton_quantize import mx_quantize, mx_quantize_dual

        T = x2.shape[0]
        xp, w = _pad_rows(x2), weight.detach()
        if backward_follows:
            xr, xrs, xc, xcs = mx_quantize_dual(xp)
            wr, wrs, wc, wcs = mx_quantize_dual(w)
            ctx.save_for_backward(xc, xcs, wc, wcs)
        else:  # no_grad (evaluation, inference): only the copies fprop reads
            (xr, xrs), (wr, wrs) = mx_quantize(xp), mx_quantize(w)
        y = mx_matmul(xr, xrs, wr.t(), wrs.t())[:T]
        ctx.fused, ctx.tokens, ctx.weight_dtype = True, T, weight.dtype
        return y

    @staticmethod
    def backward(ctx, gy2: torch.Tensor, grad_elem: str):
        from .triton_mx_gemm import mx_matmul
        from .triton_quantize import mx_quantize_dual

        xc, xcs, wc, wcs = ctx.saved_tensors
        gr, grs, gc, gcs = mx_quantize_dual(_pad_rows(gy2), elem=grad_elem)
        dx = mx_matmul(gr, grs, wc, wcs)[: ctx.tokens] if ctx.needs_input_grad[0] else None
        dw = mx_matmul(gc.t(), gcs.t(), xc, xcs) if ctx.needs_input_grad[1] else None
        return dx, dw


def _pad_rows(t: torch.Tensor, multiple: int = 32) -> torch.Tensor:
    pad = (-t.shape[0]) % multiple
    return torch.nn.functional.pad(t, (0, 0, 0, pad)) if pad else t.contiguous()


_FP8_RECIPES = ("fp8_tensorwise", "fp8_rowwise")
_FP8_READS = (torch.float32, torch.bfloat16, torch.float16)


def _fused_fp8(recipe: str, backend: str, x2: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this layer call quantizes each tensor once (fp8 recipes through torch._scaled_mm,
    the Triton quantize runs here, both weight sides multiples of 16 as cuBLASLt wants)."""
    from .gemm import _triton_runs_on

    return (
        recipe in _FP8_RECIPES
        and weight.shape[0] % 16 == 0
        and weight.shape[1] % 16 == 0
        and x2.dtype in _FP8_READS
        and weight.dtype in _FP8_READS
        and choose_backend(recipe, x2.device, backend) == "scaled_mm"
        and _triton_runs_on(x2.device)
    )


class _FusedFloat8:
    """fp8 fprop, dgrad and wgrad from one quantize per tensor (torch._scaled_mm backend).

    ``fp8_quantize_dual`` makes each of x (T, K), W (N, K) and dy (T, N) as it is, scaled along its
    last axis, and transposed, scaled along its first; every GEMM then reads two copies in place,
    its contraction axis contiguous in both (cuBLASLt's row-major A, column-major B):

        fprop  y  = xq · wqᵀ        per token, per out-feature     (contraction over K)
        dgrad dx = gq · wqtᵀ        per token, per in-feature      (over N)
        wgrad dW = gqt · xqtᵀ       per out-feature, per in-feature (over T)

    Tensorwise scaling quantizes each tensor once for both copies; rowwise scales differ by axis,
    as in the emulated recipe. Only the fp8 copies backward reads are saved (xqt, wqt), not x and
    W. Tokens are zero-padded to a multiple of 16 (wgrad's contraction; zero rows change no
    product). The numerics are the emulated recipe's: the same bytes (tested), then cuBLAS's sum.
    """

    @staticmethod
    def forward(ctx, x2, weight, recipe: str, backward_follows: bool) -> torch.Tensor:
        from .gemm import scaled_mm
        from .triton_fp8 import fp8_quantize_dual

        scaling = "tensorwise" if recipe == "fp8_tensorwise" else "rowwise"
        T = x2.shape[0]
        xq, sx, xqt, sxt = fp8_quantize_dual(_pad_rows(x2, 16), "e4m3", scaling, cols=backward_follows)
        wq, sw, wqt, swt = fp8_quantize_dual(weight.detach(), "e4m3", scaling, cols=backward_follows)
        out = torch.bfloat16 if scaling == "rowwise" else torch.float32  # rowwise writes bf16
        y = scaled_mm(xq, wq.t(), sx, sw.reshape(1, -1) if sw.dim() else sw, out_dtype=out)[:T]
        if backward_follows:
            ctx.save_for_backward(xqt, sxt, wqt, swt)
        ctx.fused, ctx.tokens, ctx.weight_dtype, ctx.scaling = True, T, weight.dtype, scaling
        return y

    @staticmethod
    def backward(ctx, gy2: torch.Tensor, grad_elem: str):
        from .gemm import scaled_mm
        from .triton_fp8 import fp8_quantize_dual

        xqt, sxt, wqt, swt = ctx.saved_tensors
        want_dx, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (want_dx or want_dw):
            return None, None
        g = _pad_rows(gy2 if gy2.dtype in _FP8_READS else gy2.float(), 16)
        gq, sg, gqt, sgt = fp8_quantize_dual(g, grad_elem, ctx.scaling, rows=want_dx, cols=want_dw)
        out = torch.bfloat16 if ctx.scaling == "rowwise" else torch.float32
        dx = dw = None
        if want_dx:
            dx = scaled_mm(gq, wqt.t(), sg, swt, out_dtype=out)[: ctx.tokens]
        if want_dw:
            dw = scaled_mm(gqt, xqt.t(), sgt.reshape(-1, 1) if sgt.dim() else sgt, sxt, out_dtype=out)
        return dx, dw


class LowPrecisionLinear(nn.Linear):
    """``nn.Linear`` whose three GEMMs run in a low-precision recipe.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        recipe: "mxfp8", "mxfp8_fast" (weights in 128x128 tiles, activations and gradients in
            1x128 blocks, regrouped from MX), "fp8_rowwise" or "fp8_tensorwise".
        grad_elem: element format of gradients, "e4m3" (the MXFP8 recipe) or "e5m2".
        backend: "auto", "emulated" or "scaled_mm" (see :func:`lowcomm.kernels.gemm.qmatmul`).
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
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; allowed: {list(RECIPES)}")
        if grad_elem not in ("e4m3", "e5m2"):
            raise ValueError(f"grad_elem must be 'e4m3' or 'e5m2', got {grad_elem!r}")
        self.recipe, self.grad_elem, self.backend = recipe, grad_elem, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backward_follows = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        return _QLinear.apply(
            x, self.weight, self.bias, self.recipe, self.grad_elem, self.backend, backward_follows
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kw) -> LowPrecisionLinear:
        """A low-precision layer sharing ``linear``'s Parameter objects (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        recipe = kw.pop("recipe", getattr(cls, "default_recipe", "mxfp8"))
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; allowed: {list(RECIPES)}")
        new.recipe = recipe
        new.grad_elem = kw.pop("grad_elem", "e4m3")
        new.backend = kw.pop("backend", "auto")
        if kw:
            raise TypeError(f"unexpected arguments {sorted(kw)}")
        return new

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe}, grad_elem={self.grad_elem}"


class Float8Linear(LowPrecisionLinear):
    """FP8 with dynamic tensorwise (default) or rowwise scaling."""

    default_recipe = "fp8_tensorwise"

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *, scaling: str = "tensorwise", **kw
    ):
        if scaling not in ("tensorwise", "rowwise"):
            raise ValueError(f"scaling must be 'tensorwise' or 'rowwise', got {scaling!r}")
        super().__init__(in_features, out_features, bias, recipe=f"fp8_{scaling}", **kw)


class MXFP8Linear(LowPrecisionLinear):
    """MXFP8: E4M3 elements, one E8M0 scale per 32 along each GEMM's reduction dimension."""

    default_recipe = "mxfp8"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kw):
        super().__init__(in_features, out_features, bias, recipe="mxfp8", **kw)


def _default_skip(name: str, module: nn.Linear) -> bool:
    return name.split(".")[-1] in ("head", "lm_head", "output")


def convert_to_low_precision(
    model: nn.Module,
    recipe: str = "mxfp8",
    *,
    skip: Callable[[str, nn.Linear], bool] | Iterable[str] | None = None,
    grad_elem: str = "e4m3",
    backend: str = "auto",
) -> list[str]:
    """Swap the model's ``nn.Linear`` layers for low-precision ones, in place.

    Args:
        model: any module.
        recipe: "mxfp8", "fp8_rowwise" or "fp8_tensorwise" ("fp32" converts nothing).
        skip: names of layers to leave, or ``fn(name, module) -> bool``; default: the output head
            (a layer named head, lm_head or output).
        grad_elem: element format of gradients.
        backend: GEMM backend.

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
    multiple = 32 if recipe == "mxfp8" else 16
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
            LowPrecisionLinear.from_linear(module, recipe=recipe, grad_elem=grad_elem, backend=backend),
        )
        converted.append(name)
    return converted
