"""Processes and records: the reference trainer, elastic workers, fault injection, run records, CLI."""

from .agent import ElasticGroup, ResyncRequired, WorkerAgent, job_state, load_job_state
from .config import MODES, TrainConfig, load_config_file
from .faults import FaultInjector, FaultPlan
from .metrics import SUMMARY_KEYS, RunRecorder, atomic_write_json, read_jsonl
from .trainer import build_inner_optimizer, build_model, evaluate, train

__all__ = [
    "MODES",
    "SUMMARY_KEYS",
    "ElasticGroup",
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
    "load_job_state",
    "load_config_file",
    "read_jsonl",
    "train",
]
