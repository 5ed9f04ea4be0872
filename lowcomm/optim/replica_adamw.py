"""AdamW over M replicas' stacked parameters, with the clip and the bf16 weights in its pass.

Batched replicas (:mod:`lowcomm.lm.batched`) hold M replicas' parameters stacked as ``(M, *shape)``
fp32 tensors and train them with one AdamW (AdamW acts on every element alone). Under bf16
autocast each step then moves, per element of a matrix: its cast to bf16 in the forward, its bf16
gradient cast back to fp32 in the backward, the per-replica clip's pass that scales the gradient,
and the optimizer's own. :class:`ReplicaAdamW` keeps a bf16 copy of each matrix for the forward
(:meth:`fresh_copies`), so autograd hands it the bf16 gradient itself, and on CUDA steps each
tensor in one Triton launch (:func:`lowcomm.kernels.triton_adamw.adamw_replicas_`) that reads that
gradient, applies its replica's clip coefficient, and writes the new bf16 copy with the parameter;
the small fp32 parameters (biases, layer norms) all in one launch.
The numbers are autocast's and AdamW's: the copy is the parameter rounded to nearest even, the
cast autocast makes, and the bf16 gradient is the one autocast's cast turned into fp32.

Anything else that writes a parameter (DiLoCo's outer step, a checkpoint's load, a joiner's
weights) bumps its version counter; the next :meth:`fresh_copies` re-casts the copies of those
whose version moved, so a copy is never stale. Without Triton or off CUDA the step is AdamW's
multi-tensor arithmetic in torch operations, after the coefficient is applied to the gradients.
The state dict is AdamW's: a ``torch.optim.AdamW``'s loads into it and its into one.
"""

from __future__ import annotations

import torch

from .._compat import foreach_norm_fp32

__all__ = ["ReplicaAdamW", "KERNEL_MIN", "clip_coefficients"]

#: elements a replica from which a parameter without a copy takes the kernel (one launch) rather
#: than the multi-tensor step shared with the other small ones
KERNEL_MIN = 1 << 15


def _hyper(group: dict, state: dict) -> dict:
    """A parameter's step arguments for the Triton kernels: its step count (after this step) and
    its group's hyper-parameters."""
    beta1, beta2 = group["betas"]
    return dict(
        step=state["step"],
        lr=group["lr"],
        beta1=beta1,
        beta2=beta2,
        eps=group["eps"],
        weight_decay=group["weight_decay"],
    )


def _multi_steps(p: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether a small parameter takes the multi-tensor kernel: an fp32 parameter and gradient
    (its own, not a copy's), both contiguous (else torch's multi-tensor step)."""
    return p.dtype == g.dtype == torch.float32 and g is p.grad and p.is_contiguous() and g.is_contiguous()


def _have_triton() -> bool:
    from ..kernels.triton_quantize import HAVE_TRITON

    return HAVE_TRITON


class ReplicaAdamW(torch.optim.Optimizer):
    """AdamW (:class:`torch.optim.AdamW`'s arithmetic and state dict) for stacked replicas'
    parameters, each ``(M, *shape)``: ``step(grad_coef=c)`` scales replica m's gradients by
    ``c[m]`` (its clip coefficient) in the same pass; ``step(max_norm=x)`` computes those
    coefficients as ``clip_grad_norm_`` would, per replica.

    Args:
        params: parameter groups, as for :class:`torch.optim.AdamW` (``weight_decay`` per group).
        lr, betas, eps, weight_decay: AdamW's.
        copies: ``{key: parameter}``, the parameters to keep a low-precision copy of for the
            forward (:meth:`fresh_copies` hands them out under their keys).
        copy_dtype: the copies' dtype.
        kernel: step through the Triton kernel (None: where every parameter is on CUDA and Triton
            runs; True also runs it on CPU under ``TRITON_INTERPRET=1``, for tests). Otherwise the
            step is AdamW's multi-tensor arithmetic in torch operations.
    """

    def __init__(
        self,
        params,
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float = 0.0,
        copies: dict | None = None,
        copy_dtype: torch.dtype = torch.bfloat16,
        kernel: bool | None = None,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        flat = [p for g in self.param_groups for p in g["params"]]
        if kernel is None:  # (asked on CUDA only: asking imports Triton)
            kernel = bool(flat) and all(p.is_cuda for p in flat) and _have_triton()
        self.kernel = kernel
        self._masters = dict(copies or {})
        with torch.no_grad():
            self.copies = {
                k: p.detach().to(copy_dtype).requires_grad_(True) for k, p in self._masters.items()
            }
        self._key_of = {id(p): k for k, p in self._masters.items()}
        self._synced = {k: p._version for k, p in self._masters.items()}

    def fresh_copies(self) -> dict:
        """The low-precision copies, ``{key: copy}``, each re-cast first where its parameter was
        written since (its version counter moved: an outer step, a load, a joiner's weights)."""
        stale = [k for k, p in self._masters.items() if p._version != self._synced[k]]
        if stale:
            with torch.no_grad():
                for k in stale:
                    self.copies[k].copy_(self._masters[k])
                    self._synced[k] = self._masters[k]._version
        return self.copies

    def gradients(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(param, gradient)`` for every parameter that has one, in group order: its copy's
        (low precision) where only the copy got one; the two summed into the parameter's where
        both did (a tied embedding: looked up in fp32, used as the output head through its copy)."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                c = self._copy(p)
                g, gc = p.grad, (c.grad if c is not None else None)
                if g is not None and gc is not None:
                    g = g.add_(gc)
                    c.grad = None
                g = g if g is not None else gc
                if g is not None:
                    out.append((p, g))
        return out

    def fill_missing_gradients(self) -> None:
        """A zero ``.grad`` for every parameter that got no gradient, neither it nor its copy."""
        for group in self.param_groups:
            for p in group["params"]:
                c = self._copy(p)
                if p.grad is None and (c is None or c.grad is None):
                    p.grad = torch.zeros_like(p)

    def _settle(self, grads: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for p, g in grads:
            if g is not p.grad:  # a copy's low-precision gradient: its fp32 value
                p.grad = g.float()
                self._copy(p).grad = None

    @torch.no_grad()
    def step(self, closure=None, *, grad_coef: torch.Tensor | None = None, max_norm: float | None = None):
        """One AdamW step of every replica; ``grad_coef`` (M,) scales replica m's gradients first,
        or ``max_norm`` clips each replica's gradients to that total 2-norm
        (:func:`clip_coefficients` of the same gradients the step reads: one pass over the
        parameters to collect them, not two).

        With the kernel, each parameter that has a copy or :data:`KERNEL_MIN` elements a replica
        goes through it, one launch each; the small fp32 rest (layer norms, biases) through one
        launch for all of them (:func:`~lowcomm.kernels.triton_adamw.adamw_replicas_multi_`),
        where one launch each, or torch's multi-tensor step (a dozen launches and M views of
        each gradient for the coefficients), would cost the host more than their bytes cost the
        GPU; anything else through torch's multi-tensor step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = self.gradients()
        if max_norm is not None:
            if grad_coef is not None:
                raise ValueError("ReplicaAdamW.step: pass grad_coef or max_norm, not both")
            grad_coef = clip_coefficients([g for _, g in grads], max_norm, kernel=self.kernel)
        if self.kernel:
            coef = grad_coef.float().contiguous() if grad_coef is not None else None
            group_of = {id(p): group for group in self.param_groups for p in group["params"]}
            big = [(p, g) for p, g in grads if self._copy(p) is not None or p[0].numel() >= KERNEL_MIN]
            self._kernel_step(big, coef, group_of)
            done = {id(p) for p, _ in big}
            small = [(p, g) for p, g in grads if id(p) not in done and _multi_steps(p, g)]
            self._multi_step(small, coef, group_of)
            done.update(id(p) for p, _ in small)
            grads = [(p, g) for p, g in grads if id(p) not in done]
        self._torch_step(grads, grad_coef)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for c in self.copies.values():
            c.grad = None

    def load_state_dict(self, state_dict: dict) -> None:
        """AdamW's state dict (this optimizer's or a :class:`torch.optim.AdamW`'s, fused or not);
        the step counts become host numbers once, here (see :meth:`_state`)."""
        super().load_state_dict(state_dict)
        for st in self.state.values():
            if "step" in st:
                st["step"] = float(st["step"])

    def _copy(self, p: torch.Tensor) -> torch.Tensor | None:
        k = self._key_of.get(id(p))
        return None if k is None else self.copies[k]

    def _state(self, p: torch.Tensor) -> dict:
        """``p``'s state, made at its first step, with its step count advanced. The count is a
        Python number: the bias corrections are computed on the host, and reading a tensor's
        value would stop the host until the GPU got there (torch's AdamW turns a number into its
        tensor when it loads this state dict)."""
        st = self.state[p]
        if not st:
            st["step"] = 0.0
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["step"] += 1
        return st

    def _torch_step(self, grads: list[tuple[torch.Tensor, torch.Tensor]], coef: torch.Tensor | None) -> None:
        """AdamW's multi-tensor step (torch's arithmetic, operation for operation) of the parameters
        in ``grads``, after their gradients' fp32 values are scaled by ``coef``; then their copies."""
        if not grads:
            return
        ours = {id(p) for p, _ in grads}
        self._settle(grads)
        if coef is not None:
            for m in range(coef.shape[0]):
                torch._foreach_mul_([p.grad[m] for p, _ in grads], coef[m])
        for group in self.param_groups:
            params = [p for p in group["params"] if id(p) in ours]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            states = [self._state(p) for p in params]
            grads_ = [p.grad for p in params]
            m1, m2 = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
            steps = [s["step"] for s in states]
            if wd != 0:
                torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_lerp_(m1, grads_, 1 - beta1)
            torch._foreach_mul_(m2, beta2)
            torch._foreach_addcmul_(m2, grads_, grads_, 1 - beta2)
            step_size = [-(lr / (1 - beta1**t)) for t in steps]
            denom = torch._foreach_sqrt(m2)
            torch._foreach_div_(denom, [(1 - beta2**t) ** 0.5 for t in steps])
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, m1, denom, step_size)
        for p, _ in grads:
            if (k := self._key_of.get(id(p))) is not None:
                self.copies[k].copy_(p)
                self._synced[k] = p._version

    def _multi_step(self, grads: list, coef: torch.Tensor | None, group_of: dict) -> None:
        """The parameters of ``grads`` (fp32, no copy) in one launch of the multi-tensor kernel;
        ``coef`` fp32 and contiguous, ``group_of`` each parameter's group by its id."""
        if not grads:
            return
        from ..kernels.triton_adamw import adamw_replicas_multi_

        states = [self._state(p) for p, _ in grads]
        hypers = [_hyper(group_of[id(p)], st) for (p, _), st in zip(grads, states)]
        adamw_replicas_multi_(
            [p for p, _ in grads],
            [g for _, g in grads],
            [st["exp_avg"] for st in states],
            [st["exp_avg_sq"] for st in states],
            hypers,
            coef=coef,
        )
        for p, _ in grads:
            torch.autograd.graph.increment_version(p)  # the kernel wrote it, no torch operation

    def _kernel_step(self, grads: list, coef: torch.Tensor | None, group_of: dict) -> None:
        """Each parameter of ``grads`` in one launch: gradient, coefficient, AdamW, copy (``coef``
        and ``group_of`` as for :meth:`_multi_step`)."""
        from ..kernels.triton_adamw import adamw_replicas_

        for p, g in grads:
            st, copy = self._state(p), self._copy(p)
            hyper = _hyper(group_of[id(p)], st)
            adamw_replicas_(p, g, st["exp_avg"], st["exp_avg_sq"], **hyper, coef=coef, copy=copy)
            torch.autograd.graph.increment_version(p)  # the kernel wrote it, no torch operation
            if copy is not None:
                self._synced[self._key_of[id(p)]] = p._version


@torch.no_grad()
def clip_coefficients(
    grads: list[torch.Tensor], max_norm: float, kernel: bool = False
) -> torch.Tensor | None:
    """``clip_grad_norm_``'s coefficient for each replica of stacked gradients (M, ...): its total
    2-norm over all its gradients (in fp32 whatever their dtype), ``max_norm`` over it where it
    exceeds it, else 1; (M,) fp32, or None where no parameter got a gradient (all frozen). The
    optimizer scales the gradients by it (:meth:`ReplicaAdamW.step`'s ``max_norm``).

    A few operations whatever the model. With ``kernel`` (the optimizer's Triton step: CUDA) and
    contiguous gradients, each replica's sum of squares in one Triton launch per gradient dtype
    (:func:`~lowcomm.kernels.triton_adamw.sumsq_replicas`); else every replica's slice of every
    gradient in one multi-tensor norm, as torch's foreach clip does (400 views for the reference
    GPT's 100 gradients and 4 replicas, made on the host each step). Eager on purpose, also under
    ``--compile``: Inductor compiles a reduction kernel per slice, 427 kernels for those 400
    slices (counted on CPU), each a launch."""
    if not grads:
        return None
    if kernel and all(g.is_contiguous() for g in grads):
        from ..kernels.triton_adamw import sumsq_replicas

        total = sumsq_replicas(grads).sqrt()
    else:
        M = grads[0].shape[0]
        norms = torch.stack(foreach_norm_fp32([g[m] for g in grads for m in range(M)])).view(len(grads), M)
        total = norms.norm(dim=0)
    return (max_norm / (total + 1e-6)).clamp(max=1.0)
