"""A torchtitan-style ``[diloco]`` table in a job's TOML file builds the wrapper.

    [diloco]
    sync_every = 100
    fragments = [["layers.0", "layers.1"], ["layers.2", "layers.3"], ["tok_embeddings", "norm", "output"]]
    overlap = 1
    codec = "e3m0"

``fragments`` is a count or a list of fragments, each a list of module (or parameter) FQNs; every
other key is a :class:`~lowcomm.optim.DiLoCoConfig` field. Other tables of the file are left to
their owners.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from .._compat import tomllib
from ..comm import ReplicaGroup
from ..optim import DiLoCo, DiLoCoConfig

__all__ = ["diloco_config_from_toml", "diloco_from_toml"]


def diloco_config_from_toml(source: str | Path | dict[str, Any]) -> DiLoCoConfig:
    """The ``[diloco]`` table of a TOML file (or of an already-parsed dict) as a DiLoCoConfig.

    Raises:
        ValueError: no ``[diloco]`` table, an unknown key (named, with the allowed ones), or a
            value out of range.
    """
    data = source if isinstance(source, dict) else tomllib.loads(Path(source).read_text())
    table = data.get("diloco")
    if not isinstance(table, dict):
        raise ValueError(f"{source if not isinstance(source, dict) else 'the config'} has no [diloco] table")
    allowed = {f.name for f in dataclasses.fields(DiLoCoConfig)}
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in [diloco]; allowed: {sorted(allowed)}")
    return DiLoCoConfig(**table)


def diloco_from_toml(
    model: nn.Module, inner_optimizer, group: ReplicaGroup, source: str | Path | dict[str, Any]
) -> DiLoCo:
    """A DiLoCo wrapper configured by the ``[diloco]`` table of ``source``."""
    return DiLoCo(model, inner_optimizer, group, diloco_config_from_toml(source))
