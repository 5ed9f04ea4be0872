"""Moving bytes between replicas: codecs, the quantized mean all-reduce, replica groups."""

from .codecs import CODECS, DEFAULT_BLOCK, Codec, NonFiniteError, get_codec
from .distributed import DistributedGroup, LinkEmulator
from .group import CollectiveError, LocalGroup, ReduceStats, ReplicaGroup, Work
from .reduce import REDUCE_METHODS, shard_bounds, wire_bytes

__all__ = [
    "CODECS",
    "DEFAULT_BLOCK",
    "REDUCE_METHODS",
    "Codec",
    "CollectiveError",
    "DistributedGroup",
    "LinkEmulator",
    "LocalGroup",
    "NonFiniteError",
    "ReduceStats",
    "ReplicaGroup",
    "Work",
    "get_codec",
    "shard_bounds",
    "wire_bytes",
]
