"""Version shims and optional dependencies, one place each."""

from __future__ import annotations

import importlib
from types import ModuleType

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI (a dependency there)
    import tomli as tomllib

__all__ = ["tomllib", "MissingExtra", "require", "pyplot", "EXTRAS", "listen_fd_store_kwargs"]

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
