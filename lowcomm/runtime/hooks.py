"""The points where the runtime lets faults in: one small Protocol, a no-op by default.

The trainer loop, the elastic worker agent and the elastic group take a ``FaultHooks`` in their
constructors and call it at named points; nothing reaches into them from outside.
:class:`lowcomm.runtime.faults.FaultInjector` implements it from a fault plan; every other run
gets :data:`NO_FAULTS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, Any, Protocol

import torch

__all__ = ["FaultHooks", "NoFaults", "NO_FAULTS", "Opener"]

#: how a checkpoint file is opened for writing: ``opener(path, mode)`` (``open`` by default)
Opener = Callable[[str, str], IO[bytes]]


class FaultHooks(Protocol):
    """Hook points, in the order a worker meets them."""

    def before_step(self, step: int) -> None:
        """Before inner step ``step`` (1-based) starts: kill, hang, delay, partition, slow link."""

    def after_step(self, step: int) -> None:
        """After inner step ``step`` and its records."""

    def before_collective(self, rnd: int, buffer: torch.Tensor) -> None:
        """Round ``rnd`` is about to run on ``buffer`` (this worker's pseudo-gradient; may be changed)."""

    def collective_action(self, rnd: int) -> str | None:
        """As round ``rnd``'s reduce starts: ``"drop"`` (this contribution never arrives),
        ``"corrupt"`` (the payload is damaged on its way out) or None."""

    def corrupt(self, payload: torch.Tensor) -> None:
        """Damage an outgoing uint8 payload in place."""

    def between_phases(self, rnd: int) -> None:
        """Between the two exchanges of round ``rnd`` (a kill or hang here is a death mid-round)."""

    def during_transfer(self, role: str) -> None:
        """A state transfer starts; ``role`` is "donor" or "joiner". May raise OSError."""

    def checkpoint_opener(self, step: int) -> Opener | None:
        """The opener for the checkpoint written at ``step`` (one that fails part way), or None."""

    def partitioned_from(self, what: str) -> bool:
        """True while this worker cannot reach ``what`` ("peers" or "coordinator")."""

    def link(self, default: Any) -> Any:
        """The link emulation (a LinkEmulator or None) a round runs under; ``default`` otherwise."""


class NoFaults:
    """The hooks of a run without a fault plan: every point does nothing."""

    def before_step(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def before_collective(self, rnd: int, buffer: torch.Tensor) -> None:
        pass

    def collective_action(self, rnd: int) -> str | None:
        return None

    def corrupt(self, payload: torch.Tensor) -> None:
        pass

    def between_phases(self, rnd: int) -> None:
        pass

    def during_transfer(self, role: str) -> None:
        pass

    def checkpoint_opener(self, step: int) -> Opener | None:
        return None

    def partitioned_from(self, what: str) -> bool:
        return False

    def link(self, default: Any) -> Any:
        return default


NO_FAULTS: FaultHooks = NoFaults()
