"""Processes: the trainer loop, static and elastic jobs, fault injection, run records, the CLI.

    runtime/trainer/     configuration, the one training loop and its syncs (DP, DiLoCo, elastic),
                       static multi-process topology and launcher, run records
    runtime/elastic/   the coordinator (rules and server), its protocol, the worker agent, the
                       elastic group, state transfers and checkpoints (needs pyzmq)
    runtime/faults/    fault plans, the injector, ``lowcomm chaos`` and its survival report
    runtime/hooks.py   the fault hooks Protocol the loop and the elastic runtime call
    runtime/errors.py  typed errors and exit codes
    runtime/cli.py     every command

Every name below is imported on first use: ``import lowcomm.runtime`` needs no pyzmq, nor torch.
"""

from __future__ import annotations

from .._lazy import lazy_names

# imported on first use (lowcomm/_lazy.py): the elastic names need pyzmq, and the command line
# (runtime/cli.py) loads torch only for the commands that train
__getattr__, __dir__, __all__ = lazy_names(
    __name__,
    {
        ".errors": ("ExitCode", "Stopped"),
        ".hooks": ("NO_FAULTS", "FaultHooks"),
        ".trainer": (
            "MODES",
            "SUMMARY_KEYS",
            "RunRecorder",
            "TrainConfig",
            "atomic_write_json",
            "build_inner_optimizer",
            "build_model",
            "evaluate",
            "load_config_file",
            "read_jsonl",
            "timeline",
            "train",
        ),
        ".elastic": (
            "ElasticGroup",
            "ResyncRequired",
            "WorkerAgent",
            "Coordinator",
            "job_state",
            "load_job_state",
        ),
        ".faults": ("FaultInjector", "FaultPlan"),
    },
)
