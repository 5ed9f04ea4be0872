"""Processes and records: the reference trainer, run records and the CLI."""

from .config import MODES, TrainConfig, load_config_file
from .metrics import SUMMARY_KEYS, RunRecorder, atomic_write_json, read_jsonl
from .trainer import build_inner_optimizer, build_model, evaluate, train

__all__ = [
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
    "train",
]
