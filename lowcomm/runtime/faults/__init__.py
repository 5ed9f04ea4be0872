"""Fault injection: plans, the injector that fires them at the runtime's hook points, and
``lowcomm chaos`` with its survival report."""

from .injector import FaultInjector, failing_opener
from .plan import HOOKS, KINDS, Fault, FaultPlan, InjectedFault

__all__ = ["HOOKS", "KINDS", "Fault", "FaultInjector", "FaultPlan", "InjectedFault", "failing_opener"]
