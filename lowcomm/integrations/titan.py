"""A torchtitan-style ``[diloco]`` table in a job's TOML file builds the wrapper.

    [diloco]
    sync_every = 100
    fragments = [["layers.0", "layers.1"], ["layers.2", "layers.3"], ["tok_embeddings", "norm", "output"]]
    overlap = 1
    codec = "e3m0"

``fragments`` is a count or a list of fragments, each a list of module (or parameter) FQNs; every
other key is a :class:`~lowcomm.optim.DiLoCoConfig` field. Other tables of the file are left to
their owners.

A job file written for torchtitan with torchft (its ``[fault_tolerance]`` table, no
``[diloco]`` table) is read too, its semi-sync keys taken for what they mean:

    [fault_tolerance]
    semi_sync_method = "diloco"        # or "local_sgd": parameter averaging (outer_lr 1, no momentum)
    sync_steps = 100                   # sync_every
    num_fragments = 4                  # fragments, split lowcomm's way (pattern "strided")
    # module_fqns_per_model_fragment = [["tok_embeddings", "layers.0"], ...]: explicit, it wins
    fragment_sync_delay = 1            # overlap
    fragment_update_alpha = 0.5        # alpha
    should_quantize = true             # codec "fp8_e4m3" (torchft's quantized all-reduce sends fp8)

Its keys for torchft's own runtime (``enable``, ``replica_id``, ``group_size``,
``min_replica_size``, ``process_group``, ``process_group_timeout_ms``) have no meaning here: the
replicas come from lowcomm's launcher and group; they are left alone, and said so in the log.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from torch import nn

from .._configfile import read_config_file
from ..comm import ReplicaGroup
from ..optim import DiLoCo, DiLoCoConfig

__all__ = ["diloco_config_from_toml", "diloco_from_toml"]

log = logging.getLogger(__name__)

#: torchtitan's [fault_tolerance] semi-sync keys -> DiLoCoConfig fields
_FT_KEYS = {
    "sync_steps": "sync_every",
    "num_fragments": "fragments",
    "module_fqns_per_model_fragment": "fragments",
    "fragment_sync_delay": "overlap",
    "fragment_update_alpha": "alpha",
}
#: the [fault_tolerance] keys of torchft's own runtime (quorum, replica ids, its process group)
_FT_RUNTIME = (
    "enable",
    "replica_id",
    "group_size",
    "min_replica_size",
    "process_group",
    "process_group_timeout_ms",
)
#: semi_sync_method -> the outer step it means
_FT_METHODS = {"diloco": {}, "local_sgd": {"outer_lr": 1.0, "outer_momentum": 0.0}}


def diloco_config_from_toml(source: str | Path | dict[str, Any]) -> DiLoCoConfig:
    """The ``[diloco]`` table of a TOML file (or of an already-parsed dict) as a DiLoCoConfig.

    Raises:
        ValueError: no ``[diloco]`` table, an unknown key (named, with the allowed ones), or a
            value out of range.
    """
    data = source if isinstance(source, dict) else read_config_file(source)
    table, ft = data.get("diloco"), data.get("fault_tolerance")
    semi_sync = isinstance(ft, dict) and ft.get("semi_sync_method") is not None
    if not isinstance(table, dict):
        if semi_sync:
            return _from_fault_tolerance(ft)
        raise ValueError(
            f"{source if not isinstance(source, dict) else 'the config'} has no [diloco] table "
            "(nor a [fault_tolerance] table with a semi_sync_method)"
        )
    if semi_sync:  # (a job file kept for torchft's runs as well: its settings may differ)
        log.warning(
            "[diloco] configures DiLoCo; [fault_tolerance]'s semi_sync_method=%r and its semi-sync keys "
            "are not used",
            ft["semi_sync_method"],
        )
    allowed = {f.name for f in dataclasses.fields(DiLoCoConfig)}
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in [diloco]; allowed: {sorted(allowed)}")
    return DiLoCoConfig(**table)


def _from_fault_tolerance(ft: dict[str, Any]) -> DiLoCoConfig:
    """torchtitan's ``[fault_tolerance]`` table (torchft's semi-sync settings) as a DiLoCoConfig."""
    method = ft["semi_sync_method"]
    if not isinstance(method, str) or method.lower() not in _FT_METHODS:
        raise ValueError(
            f"semi_sync_method={method!r} in [fault_tolerance] is not allowed: one of {sorted(_FT_METHODS)}"
        )
    known = {"semi_sync_method", "should_quantize", *_FT_KEYS, *_FT_RUNTIME}
    unknown = sorted(set(ft) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in [fault_tolerance]; allowed: {sorted(known)}")
    fields: dict[str, Any] = dict(_FT_METHODS[method.lower()])
    for key, field in _FT_KEYS.items():
        if key in ft and not (key == "module_fqns_per_model_fragment" and not ft[key]):  # ([] : unset)
            fields[field] = ft[key]
    quantize = ft.get("should_quantize", False)
    if not isinstance(quantize, bool):  # ("false", a string, would be true)
        raise ValueError(f"should_quantize={quantize!r} in [fault_tolerance] is not allowed: true or false")
    if quantize:
        fields["codec"] = "fp8_e4m3"
    ignored = sorted(k for k in _FT_RUNTIME if k in ft)
    if ignored:
        log.info("[fault_tolerance]: %s are torchft's runtime settings, not used by lowcomm", ignored)
    try:
        return DiLoCoConfig(**fields)
    except ValueError as e:  # named by lowcomm's field: say which key of the table it was
        read = ", ".join(f"{k} as {v}" for k, v in _FT_KEYS.items() if k in ft)
        raise ValueError(f"[fault_tolerance] ({read}): {e}") from None


def diloco_from_toml(
    model: nn.Module, inner_optimizer, group: ReplicaGroup, source: str | Path | dict[str, Any]
) -> DiLoCo:
    """A DiLoCo wrapper configured by the ``[diloco]`` table of ``source``."""
    return DiLoCo(model, inner_optimizer, group, diloco_config_from_toml(source))
