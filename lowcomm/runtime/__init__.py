"""Processes: the trainer loop, static and elastic jobs, fault injection, run records, the CLI.

    runtime/trainer/     configuration, the one training loop and its syncs (DP, DiLoCo, elastic),
                       static multi-process topology and launcher, run records
    runtime/elastic/   the coordinator (rules and server), its protocol, the worker agent, the
                       elastic group, state transfers and checkpoints (needs pyzmq)
    runtime/faults/    fault plans, the injector, ``lowcomm chaos`` and its survival report
    runtime/hooks.py   the fault hooks Protocol the loop and the elastic runtime call
    runtime/errors.py  typed errors and exit codes
    runtime/cli.py     every command

The elastic names below are imported on first use, so ``import lowcomm.runtime`` needs no pyzmq.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import ExitCode
from .hooks import NO_FAULTS, FaultHooks
from .trainer import (
    MODES,
    SUMMARY_KEYS,
    RunRecorder,
    TrainConfig,
    atomic_write_json,
    build_inner_optimizer,
    build_model,
    evaluate,
    load_config_file,
    read_jsonl,
    train,
)

_LAZY = {
    "ElasticGroup": ".elastic",
    "ResyncRequired": ".elastic",
    "WorkerAgent": ".elastic",
    "Coordinator": ".elastic",
    "job_state": ".elastic",
    "load_job_state": ".elastic",
    "FaultInjector": ".faults",
    "FaultPlan": ".faults",
}

__all__ = [
    "MODES",
    "NO_FAULTS",
    "SUMMARY_KEYS",
    "Coordinator",
    "ElasticGroup",
    "ExitCode",
    "FaultHooks",
    "FaultInjector",
    "FaultPlan",
    "ResyncRequired",
    "RunRecorder",
    "TrainConfig",
    "WorkerAgent",
    "atomic_write_json",
    "build_inner_optimizer",
    "build_model",
    "evaluate",
    "job_state",
    "load_config_file",
    "load_job_state",
    "read_jsonl",
    "train",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
