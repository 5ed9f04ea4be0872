"""lowcomm: distributed low-communication training (DiLoCo, Streaming DiLoCo) for PyTorch."""

from ._version import __version__
from .comm import CODECS, DistributedGroup, LocalGroup, ReplicaGroup, get_codec
from .optim import DiLoCo, DiLoCoConfig, finish_replicas, step_replicas
from .runtime.trainer.topology import Topology, init_from_torchrun

__all__ = [
    "CODECS",
    "DiLoCo",
    "DiLoCoConfig",
    "DistributedGroup",
    "LocalGroup",
    "ReplicaGroup",
    "Topology",
    "__version__",
    "finish_replicas",
    "get_codec",
    "init_from_torchrun",
    "step_replicas",
]
