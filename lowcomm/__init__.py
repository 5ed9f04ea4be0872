"""lowcomm: distributed low-communication training (DiLoCo, Streaming DiLoCo) for PyTorch."""

from ._version import __version__
from .comm import CODECS, DistributedGroup, LocalGroup, ReplicaGroup, get_codec
from .optim import DiLoCo, DiLoCoConfig, finish_replicas, step_replicas

#: names served on first use (PEP 562): the trainer package, which they live in, is not loaded by
#: ``import lowcomm``
_LAZY = {name: "lowcomm.runtime.trainer.topology" for name in ("Topology", "init_from_torchrun")}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lowcomm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


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
