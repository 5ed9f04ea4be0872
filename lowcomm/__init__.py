"""lowcomm: distributed low-communication training (DiLoCo, Streaming DiLoCo) for PyTorch."""

from typing import TYPE_CHECKING

from ._lazy import lazy_names
from ._version import __version__

# each name is imported from its module when it is first read (lowcomm/_lazy.py): `import lowcomm`
# loads no torch, and `lowcomm launch` starts its processes without it
__getattr__, __dir__, __all__ = lazy_names(
    __name__,
    {
        ".comm": ("CODECS", "DistributedGroup", "LocalGroup", "ReplicaGroup", "get_codec"),
        ".optim": ("DiLoCo", "DiLoCoConfig", "finish_replicas", "step_replicas"),
        ".runtime.trainer.topology": ("Topology", "init_from_torchrun"),
    },
)
__all__ += ["__version__"]

if TYPE_CHECKING:  # the same names, for type checkers and editors ("X as X": re-exported)
    from .comm import CODECS as CODECS
    from .comm import DistributedGroup as DistributedGroup
    from .comm import LocalGroup as LocalGroup
    from .comm import ReplicaGroup as ReplicaGroup
    from .comm import get_codec as get_codec
    from .optim import DiLoCo as DiLoCo
    from .optim import DiLoCoConfig as DiLoCoConfig
    from .optim import finish_replicas as finish_replicas
    from .optim import step_replicas as step_replicas
    from .runtime.trainer.topology import Topology as Topology
    from .runtime.trainer.topology import init_from_torchrun as init_from_torchrun
