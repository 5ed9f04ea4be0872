"""Version shims and optional dependencies, one place each."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI (a dependency there)
    import tomli as tomllib

__all__ = [
    "tomllib",
    "MissingExtra",
    "require",
    "pyplot",
    "EXTRAS",
    "listen_fd_store_kwargs",
    "foreach_norm_fp32",
    "autocast_dtype",
    "dtensor_type",
    "dcp_group_coordinator",
    "compiles_layer_backward",
    "mend_triton_interpreter",
    "major_minor",
]

#: the extra that installs each optional module: ``pip install 'lowcomm[extra]'``
EXTRAS = {
    "zmq": "elastic",
    "msgpack": "elastic",
    "scipy": "scaling",
    "matplotlib": "scaling",
}


class MissingExtra(ImportError):
    """An optional dependency of the feature in use is not installed; the message names the extra."""


def require(module: str, feature: str) -> ModuleType:
    """``import module``, or MissingExtra naming ``feature`` and the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        if e.name is None or e.name.split(".")[0] != top:
            raise  # the module exists but something it imports is broken: not a missing extra
        extra = EXTRAS.get(top)
        how = f"pip install 'lowcomm[{extra}]'" if extra else f"pip install {top}"
        raise MissingExtra(f"{feature} needs {top}, which is not installed: {how}") from None


def pyplot(feature: str) -> ModuleType:
    """``matplotlib.pyplot`` drawing to files (the Agg backend: no display needed)."""
    require("matplotlib", feature).use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def listen_fd_store_kwargs() -> dict:
    """What ``torch.distributed.TCPStore`` needs besides ``master_listen_fd`` to serve on a socket
    it is handed: before torch 2.8 only the legacy backend could (the libuv one, the default since
    2.4, refused with "does not support initialization with an listen fd"; pytorch#150215)."""
    import torch

    return {} if torch.__version__ >= "2.8" else {"use_libuv": False}


def foreach_norm_fp32(tensors: list) -> list:
    """Each tensor's 2-norm, in fp32 whatever its dtype, in the order given: one multi-tensor
    operation per (device, dtype) among them. Grouped because torch's CUDA ``_foreach_norm`` takes
    its one-kernel path only where every tensor of the list shares device and dtype; a list that
    mixes bf16 and fp32 (matrices' low-precision copies' gradients beside fp32 biases') falls back
    to a norm kernel per tensor (593 launches a step for the reference GPT's 4 replicas, measured
    on an H200). fp32 tensors go without ``dtype`` (the call torch has always had); for others,
    a torch whose ``_foreach_norm`` takes no ``dtype`` gets fp32 copies."""
    import torch

    groups: dict = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    out: list = [None] * len(tensors)
    for (_, dtype), idx in groups.items():
        ts = [tensors[i] for i in idx]
        if dtype == torch.float32:
            norms = torch._foreach_norm(ts)
        else:
            try:
                norms = torch._foreach_norm(ts, 2, dtype=torch.float32)
            except TypeError:
                norms = torch._foreach_norm([t.float() for t in ts])
        for i, n in zip(idx, norms):
            out[i] = n
    return out


def autocast_dtype(device_type: str):
    """The dtype autocast computes in on this CUDA or CPU device now (None: autocast is off, or
    another device type, e.g. meta, which torch.autocast refuses). A fixed list, not
    ``torch.amp.is_autocast_available``: torch.compile cannot trace that before torch 2.13."""
    import torch

    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


@functools.cache
def dtensor_type() -> type | None:
    """torch's ``DTensor`` class (FSDP2's and tensor parallelism's parameters), or None on a torch
    built without distributed support. Public as ``torch.distributed.tensor`` since torch 2.5;
    torch 2.4 has it in ``torch.distributed._tensor``."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


@functools.cache
def dcp_group_coordinator() -> None:
    """Let ``torch.distributed.checkpoint`` save and load within a group whose first process is not
    the job's rank 0, on a torch older than 2.8. Its wrapper of the group's collectives compares
    the group's rank 0 with this process's rank in the group to pick the coordinator (right), then
    hands that same number to ``gather_object``, ``scatter_object_list`` and
    ``broadcast_object_list``, which read it as a rank in the job (wrong): every replica but the
    one holding rank 0 failed ("gather_list must NOT be specified on non-destination ranks").
    torch 2.7 mapped the gather's and the scatter's to the job's rank (pytorch#147675), 2.8 the
    broadcast's (pytorch#155912). Here, once per process, the wrapper's constructor keeps its
    choice of coordinator and then stores the job's rank of it, the only other use of the number.
    torch 2.4's ``load`` also gathered the state's keys into a list as long as the whole job,
    not the group, and failed on the places left empty (fixed in 2.5, pytorch#135045): its
    gather of the keys is replaced by one sized by the group. torch 2.8 and newer are left as
    they are."""
    import torch

    if torch.__version__ >= "2.8":
        return
    import torch.distributed as dist
    from torch.distributed.checkpoint import state_dict_loader, utils

    made = utils._DistWrapper.__init__

    def __init__(self, group, use_dist, coordinator_rank):
        made(self, group, use_dist, coordinator_rank)
        if use_dist and group is not None:
            self.coordinator_rank = dist.get_global_rank(group, coordinator_rank)

    utils._DistWrapper.__init__ = __init__
    if torch.__version__ < "2.5":

        def all_gather_keys(local_dict, group=None):
            keys = [None] * dist.get_world_size(group)
            dist.all_gather_object(keys, list(local_dict), group=group)
            return sorted({k for part in keys for k in part})

        state_dict_loader._all_gather_keys = all_gather_keys


def compiles_layer_backward() -> bool:
    """Whether torch.compile can trace the low-precision layers' backward, a custom
    ``autograd.Function`` that reads ``Tensor.stride()``, ``is_cuda`` and ``is_contiguous()``
    (layout and device checks before each GEMM): from torch 2.7. Before, the compiler refuses
    those in a backward it traces ahead (under 2.6: "Illegal getattr invocation stride in strict
    mode"): a fullgraph compile fails, any other runs each layer outside the graph, as in eager
    mode."""
    import torch

    return torch.__version__ >= "2.7"


def major_minor(version: str) -> tuple[int, int]:
    """A package's ``"3.6.0"`` or ``"3.6.0+git1a2b"`` as ``(3, 6)``."""
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


@functools.cache
def mend_triton_interpreter() -> bool:
    """Let Triton's interpreter (``TRITON_INTERPRET=1``: kernels run on CPU tensors, as the test
    suite runs them) run a loop bounded by a kernel argument under numpy 2.4 or newer. Before
    triton 3.7 the interpreter turns such a bound into a Python ``int`` with ``int()`` of a
    one-element array, which numpy 2.4 refuses ("only 0-dimensional arrays can be converted to
    Python scalars": triton-lang/triton#9171, fixed in 3.7 by taking the element first); the
    kernels' loops over ``K`` and over a row's columns failed so under torch 2.11 (triton 3.6);
    torch 2.8's triton 3.4 and 2.10's 3.6 convert alike. Here, once per process and only then,
    the interpreter's patch of ``tl.tensor`` is followed by a conversion that takes the element,
    as 3.7's does. Returns whether it mended the interpreter (False: a triton or numpy that needs
    nothing, or no interpreter)."""
    import numpy as np

    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return False
    fixed = major_minor(triton.__version__) >= (3, 7)
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if fixed or np.lib.NumpyVersion(np.__version__) < "2.4.0" or patch is None:
        return False

    def _patch_lang_tensor(tensor, *args, **kwargs):  # (triton 3.6 passes a scope that undoes it)
        patch(tensor, *args, **kwargs)
        tensor.__index__ = lambda self: int(self.handle.data.reshape(-1)[0])

    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True
