"""Moving bytes between replicas: codecs, the quantized mean all-reduce, replica groups."""

from .._lazy import lazy_names

# imported on first use (lowcomm/_lazy.py): comm.net, which the launcher takes its port from, needs
# no torch
__getattr__, __dir__, __all__ = lazy_names(
    __name__,
    {
        ".codecs": ("CODECS", "DEFAULT_BLOCK", "Codec", "NonFiniteError", "get_codec"),
        ".distributed": ("DistributedGroup", "LinkEmulator"),
        ".group": ("CollectiveError", "LocalGroup", "ReduceStats", "ReplicaGroup", "Work"),
        ".reduce": ("REDUCE_METHODS", "shard_bounds", "wire_bytes"),
    },
)
