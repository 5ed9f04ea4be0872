"""The algorithm: outer optimizers, the fragment schedule and the DiLoCo wrapper (no sockets)."""

from .config import DiLoCoConfig
from .diloco import DiLoCo, RoundStats, finish_replicas, step_replicas
from .fragments import build_fragments, find_block_lists, find_blocks
from .outer import NesterovState, apply_update, nesterov_init, nesterov_update
from .replica_adamw import ReplicaAdamW
from .schedule import PATTERNS, fragment_offsets, is_send_step, partition_blocks, sends_at, validate_schedule

__all__ = [
    "PATTERNS",
    "DiLoCo",
    "DiLoCoConfig",
    "NesterovState",
    "ReplicaAdamW",
    "RoundStats",
    "apply_update",
    "build_fragments",
    "find_block_lists",
    "find_blocks",
    "finish_replicas",
    "fragment_offsets",
    "is_send_step",
    "nesterov_init",
    "nesterov_update",
    "partition_blocks",
    "sends_at",
    "step_replicas",
    "validate_schedule",
]
