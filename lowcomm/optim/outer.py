"""Outer optimizers as pure ``init`` / ``update`` pairs on flat fp32 buffers.

DiLoCo's outer step treats the averaged pseudo-gradient ``Δ = θ_global − θ_local`` as a gradient
of the global parameters and applies SGD with Nesterov momentum:

    v ← μ·v + Δ                     (momentum trace, dampening 0)
    g ← g − η·(Δ + μ·v)             (Nesterov look-ahead)

This is torch.optim.SGD(nesterov=True, dampening=0, weight_decay=0) step for step, with the same
floating-point operations in the same order, so the two agree bit for bit.

References:
    Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models" (2023),
    Algorithm 1 (OuterOpt = Nesterov, lr 0.7, momentum 0.9).
    Sutskever et al., "On the importance of initialization and momentum in deep learning" (2013).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["NesterovState", "nesterov_init", "nesterov_update", "apply_update"]


class NesterovState(NamedTuple):
    """Momentum buffer of one fragment (same shape as its flat global buffer)."""

    momentum: torch.Tensor


def nesterov_init(params: torch.Tensor) -> NesterovState:
    """Zero momentum shaped like ``params`` (on its device, fp32)."""
    return NesterovState(torch.zeros_like(params, dtype=torch.float32))


def nesterov_update(
    grad: torch.Tensor, state: NesterovState, momentum: float
) -> tuple[torch.Tensor, NesterovState]:
    """One Nesterov step: returns the direction ``d = Δ + μ·v'`` and the new state ``v' = μ·v + Δ``.

    The state is updated in place (its tensor is reused) and returned for clarity. ``momentum = 0``
    returns ``grad`` itself.
    """
    v = state.momentum
    v.mul_(momentum).add_(grad)
    if momentum == 0:
        return grad, state
    return grad.add(v, alpha=momentum), state


def apply_update(params: torch.Tensor, direction: torch.Tensor, lr: float) -> None:
    """``params ← params − lr·direction`` in place."""
    params.add_(direction, alpha=-lr)
