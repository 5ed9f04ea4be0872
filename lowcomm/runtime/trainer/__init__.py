"""The trainer: configuration sections, the one loop and its syncs, static jobs, run records."""

from .build import Replicas, build_inner_optimizer, build_model, evaluate, lr_lambda
from .config import (
    FLAT,
    MODES,
    DataConfig,
    ElasticConfig,
    LinkConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    load_config_file,
)
from .launch import launch
from .loop import Trainer, train
from .records import SUMMARY_KEYS, NullRecorder, RunRecorder, atomic_write_json, read_jsonl, write_summary
from .sync import DataParallel, DiLoCoSync, Sync
from .topology import Topology, init_from_torchrun, is_distributed_env

__all__ = [
    "FLAT",
    "MODES",
    "SUMMARY_KEYS",
    "DataConfig",
    "DataParallel",
    "DiLoCoSync",
    "ElasticConfig",
    "LinkConfig",
    "ModelConfig",
    "NullRecorder",
    "OptimConfig",
    "Replicas",
    "RunConfig",
    "RunRecorder",
    "Sync",
    "Topology",
    "TrainConfig",
    "Trainer",
    "atomic_write_json",
    "build_inner_optimizer",
    "build_model",
    "evaluate",
    "init_from_torchrun",
    "is_distributed_env",
    "launch",
    "load_config_file",
    "lr_lambda",
    "read_jsonl",
    "train",
    "write_summary",
]
