"""The reference GPT for M replicas at once: one batched computation instead of M small ones.

M replicas of a :class:`~lowcomm.lm.GPT` differ only in their parameter values. Stacked along a
leading replica axis (``params[name]`` is ``(M, *shape)`` for every parameter name of the
model), their forward passes become batched matrix multiplies (``bmm``), and attention and
the loss run on the replica and batch axes folded together, so a GPU sees a few large kernels
rather than M rounds of small ones. Replica ``m``'s result depends only on ``params[...][m]`` and
its own batch: the arithmetic is the model's own, in batched kernels (equal to the one-replica
forward up to float rounding).

Shapes: M replicas, B batch, T time, C channels, V vocabulary, nh heads, hs head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._compat import autocast_dtype
from .model import GPTConfig

__all__ = ["batched_gpt_loss", "linear_weights", "stack_parameters"]


def stack_parameters(models: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Each parameter of ``models`` (identically shaped) stacked along a new leading axis: new leaf
    tensors that require grad. Tied parameters appear once, under their first name."""
    names = [n for n, _ in models[0].named_parameters()]
    with torch.no_grad():
        return {
            n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]).requires_grad_(True)
            for n in names
        }


def linear_weights(cfg: GPTConfig) -> list[str]:
    """The names of the parameters :func:`batched_gpt_loss` only multiplies by (its linear layers'
    weights and the output head's): the ones a low-precision copy can stand in for."""
    names = [
        f"blocks.{i}.{n}.weight"
        for i in range(cfg.n_layer)
        for n in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
    ]
    return names + ["wte.weight" if cfg.tie_weights else "head.weight"]


def _autocast_operands(*tensors: torch.Tensor | None) -> tuple:
    """A product's operands (None passed through) as autocast's matrix multiplies take them:
    cast to its dtype where it is on. Made here, so a trace of this model with autocast stood in
    for (benchmarks/inductor_codegen.py) sees the same casts."""
    dt = autocast_dtype(tensors[0].device.type)
    return tensors if dt is None else tuple(None if t is None else t.to(dt) for t in tensors)


class _BatchedMatmul(torch.autograd.Function):
    """x (M, N, in) · wᵀ for w (M, out, in), plus b (M, out) if given, autograd's arithmetic with
    w's gradient made in w's own layout: dw = dyᵀ·x (M, out, in), as ``nn.Linear``'s backward
    makes it. Autograd's ``bmm`` of ``w.transpose(1, 2)`` makes it as (x ᵀ·dy)ᵀ, a transposed
    view, which the gradient's accumulation then copies into w's layout: a strided copy of every
    matrix's gradient each step (49 a step for the reference GPT, 8% of a step's device time at
    d=1024 on an H200, measured). Under autocast both operands are cast to its dtype first, as
    autocast's ``bmm`` casts them, and kept so for the backward. A bias goes into the GEMM
    (``baddbmm``: the output starts as the bias, in the product's dtype, and the GEMM adds the
    product to it before its one rounding); its gradient is dy summed over tokens in fp32."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        x, w = _autocast_operands(x, w)
        ctx.save_for_backward(x, w)
        ctx.bias_dtype = None if b is None else b.dtype
        if b is None:
            return torch.bmm(x, w.transpose(1, 2))
        return torch.baddbmm(b.unsqueeze(1).to(x.dtype), x, w.transpose(1, 2))

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w = ctx.saved_tensors
        dy = dy.to(x.dtype)
        dx = torch.bmm(dy, w) if ctx.needs_input_grad[0] else None
        dw = torch.bmm(dy.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        db = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            db = dy.sum(1, dtype=torch.float32).to(ctx.bias_dtype)
        return dx, dw, db


def _linear(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, read_by_extern: bool = False
) -> torch.Tensor:
    """x (M, N, in) · wᵀ (M, out, in) + b (M, out) -> (M, N, out), in the product's dtype (bf16
    under autocast, as nn.Linear's).

    Where a kernel torch.compile generates reads the output next (GELU, the residual), the bias
    is added after the product: the compiler fuses that add into the kernel, free. ``baddbmm``
    would cost more there: it first copies the bias, broadcast to the whole output, into the
    output, and the GEMM then reads it back. ``read_by_extern`` says no generated kernel reads
    the output first: the qkv projection's, which the fused attention (cuDNN's, an extern kernel)
    reads. There the add would be a pass of its own, and Inductor would copy q, k and v out of
    its result into the layout attention takes. So the bias goes into the GEMM, whose output the
    attention reads as views. One set of weights (M = 1: DP) runs nn.Linear's own GEMM on 2-D
    views, its bias added in cuBLAS's epilogue and its weight's gradient made in the weight's
    layout, as the plain loop's layers do."""
    if x.shape[0] == 1:
        N, out = x.shape[1], w.shape[1]
        b2 = None if b is None else b.view(out)
        return F.linear(*_autocast_operands(x.reshape(N, -1), w.view(w.shape[1:]), b2)).view(1, N, out)
    if read_by_extern:
        return _BatchedMatmul.apply(x, w, b)
    y = _BatchedMatmul.apply(x, w, None)
    return y if b is None else y + b.unsqueeze(1).to(y.dtype)


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LayerNorm over C with each replica's own scale and shift: x (M, N, C), w and b (M, C)."""
    return torch.addcmul(b.unsqueeze(1), F.layer_norm(x, x.shape[-1:]), w.unsqueeze(1))


def batched_block(
    x: torch.Tensor,
    params: dict[str, torch.Tensor],
    w: dict[str, torch.Tensor],
    p: str,
    n_head: int,
    seq_len: int,
) -> torch.Tensor:
    """One transformer block (:class:`~lowcomm.lm.model.Block`) of M replicas: x (M, B·T, C) ->
    the same; ``params`` the stacked parameters, ``w`` what its linear layers multiply by (a
    parameter or its low-precision copy), both under the block's prefix ``p`` ("blocks.3.")."""
    M, N, C = x.shape
    T, nh = seq_len, n_head
    B = N // T
    h = _layer_norm(x, params[p + "ln1.weight"], params[p + "ln1.bias"])
    qkv = _linear(
        h, w[p + "attn.qkv.weight"], params[p + "attn.qkv.bias"], read_by_extern=True
    )  # (M, B·T, 3C)
    # (M, B·T, 3C) -> 3 x (M·B, nh, T, hs): replicas and batch folded, as one batch
    q, k, v = (t.reshape(M * B, T, nh, C // nh).transpose(1, 2) for t in qkv.split(C, dim=2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (M·B, nh, T, hs)
    y = y.transpose(1, 2).reshape(M, B * T, C)
    x = x + _linear(y, w[p + "attn.proj.weight"], params[p + "attn.proj.bias"])
    h = _layer_norm(x, params[p + "ln2.weight"], params[p + "ln2.bias"])
    h = F.gelu(_linear(h, w[p + "mlp.fc.weight"], params[p + "mlp.fc.bias"]))
    return x + _linear(h, w[p + "mlp.proj.weight"], params[p + "mlp.proj.bias"])


def batched_gpt_loss(
    params: dict[str, torch.Tensor],
    cfg: GPTConfig,
    idx: torch.Tensor,
    targets: torch.Tensor,
    weights: dict[str, torch.Tensor] | None = None,
    splits: int = 1,
) -> torch.Tensor:
    """Mean cross-entropy of each replica on its own batch, or on each of ``splits`` equal parts
    of it.

    Args:
        params: the stacked parameters (:func:`stack_parameters`), ``(M, *shape)`` each.
        cfg: the model's shape.
        idx, targets: token ids, (M, B, T) int64.
        weights: low-precision copies of some of :func:`linear_weights`, multiplied by in their
            place (the copies autocast would make; the embedding lookup still reads ``params``).
        splits: parts of each replica's B sequences, one loss each (B a multiple of it). One set
            of parameters (M = 1) reading the batches of several replicas in one batch gives each
            of those replicas' losses.

    Returns:
        (M·splits,) losses; with ``splits`` 1, replica ``m``'s equal to
        ``GPT(params[...][m])(idx[m], targets[m])``.
    """
    M, B, T = idx.shape
    C = cfg.n_embd
    w = {**params, **(weights or {})}  # what the linear layers multiply by
    wte = params["wte.weight"]  # (M, V, C)
    rows = torch.arange(M, device=idx.device).view(M, 1, 1)
    x = wte[rows, idx] + params["wpe.weight"][:, :T].unsqueeze(1)  # (M, B, T, C)
    x = x.reshape(M, B * T, C)
    for i in range(cfg.n_layer):
        x = batched_block(x, params, w, f"blocks.{i}.", n_head=cfg.n_head, seq_len=T)
    x = _layer_norm(x, params["ln_f.weight"], params["ln_f.bias"])
    head = w["wte.weight"] if cfg.tie_weights else w["head.weight"]
    logits = _linear(x, head, None)  # (M, B·T, V)
    per_token = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    return per_token.view(M * splits, -1).mean(dim=1)
