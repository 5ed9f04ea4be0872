"""lowcomm: distributed low-communication training (DiLoCo, Streaming DiLoCo) for PyTorch."""

from ._version import __version__
from .comm import CODECS, LocalGroup, ReplicaGroup, get_codec
from .optim import DiLoCo, finish_replicas, step_replicas

__all__ = [
    "CODECS",
    "DiLoCo",
    "LocalGroup",
    "ReplicaGroup",
    "__version__",
    "finish_replicas",
    "get_codec",
    "step_replicas",
]
