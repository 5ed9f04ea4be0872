"""DiLoCoConfig: every setting of the DiLoCo / Streaming DiLoCo wrapper, checked in one place.

The wrapper takes it whole (``DiLoCo(model, opt, group, config=cfg)``) or its fields as keywords
(``DiLoCo(model, opt, group, sync_every=100, codec="e3m0")``); the trainer's ``[diloco]``
configuration section is this same dataclass.

References:
    Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models" (2023):
        outer Nesterov with η = 0.7, μ = 0.9.
    Douillard et al., "Streaming DiLoCo with overlapping communication" (2025): fragments,
        patterns, overlap τ, merge α, 4-bit E3M0 exchange.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from .._checks import is_int, is_number, refuse
from ..comm import CODECS, Codec
from ..comm.reduce import REDUCE_METHODS
from .schedule import PATTERNS, validate_schedule

__all__ = ["DiLoCoConfig", "INITS"]

INITS = ("broadcast", "check", "none")


@dataclass(frozen=True, kw_only=True)
class DiLoCoConfig:
    """How a replica synchronizes.

    Attributes:
        sync_every: H, inner steps between two syncs of a fragment (>= 1).
        fragments: P (an int), or explicit fragments: lists of parameter names and/or modules.
            With a count P > 1 the parameters outside the repeated blocks (embeddings, head,
            final norm) form the last fragment and the blocks are split over the other P − 1,
            or, where that makes the largest fragment smaller, the blocks are split over all P
            and those parameters join the smallest fragment.
        pattern: how blocks are split into fragments: "strided" (block ℓ to fragment ℓ mod P)
            or "sequential".
        overlap: τ, inner steps a fragment's all-reduce overlaps with (0 = blocking); τ·P < H.
        alpha: merge weight of the local parameters after a round, in [0, 1] (0 = take the
            global ones, 1 = keep the local ones).
        outer_lr: η > 0 of the outer Nesterov step.
        outer_momentum: μ in [0, 1) of the outer Nesterov step.
        codec: wire format of the pseudo-gradients (``lowcomm.comm.CODECS``) or a Codec.
        codec_block: elements per scale of block-scaled codecs (None: the codec's default, 128).
        error_feedback: carry each round's quantization error into the next pseudo-gradient.
        reduce: "two_phase" (re-quantize the mean; the default) or "all_gather" (one quantization).
        outer_device: device of the global copy, the momentum and the error-feedback buffers
            (e.g. "cpu" keeps them off the accelerator, pinned; None: the parameters' device).
        init: how replicas are made to start from the same weights: "broadcast" (replica 0's are
            copied to every replica when the wrapper is built, as DDP does), "check" (replicas
            whose weights differ are refused, by name) or "none" (the caller sees to it). Replicas
            that start apart train apart. Build the wrapper before loading a checkpoint's weights
            into the model (a replica's local weights may differ from the others' in a checkpoint).
        sync_buffers: average the model's floating-point buffers saved with it (BatchNorm's running
            statistics) over the replicas with each round of the fragment holding their module,
            in fp32 whatever the codec, and merge them as the parameters are (``alpha``); without
            it each replica keeps its own and they drift apart. Integer buffers (counters) and
            non-persistent ones are left alone. Models without such buffers send nothing more.
    """

    sync_every: int = 100
    fragments: int | Sequence[Sequence[Any]] = 1
    pattern: str = "strided"
    overlap: int = 0
    alpha: float = 0.0
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    codec: str | Codec = "fp32"
    codec_block: int | None = None
    error_feedback: bool = False
    reduce: str = "two_phase"
    outer_device: str | torch.device | None = None
    init: str = "broadcast"
    sync_buffers: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.codec, Codec) and self.codec not in CODECS:
            raise refuse("codec", self.codec, f"unknown codec; one of {list(CODECS)}")
        if self.codec_block is not None and not is_int(self.codec_block, 1):
            raise refuse("codec_block", self.codec_block, "an int >= 1 (elements per scale)")
        if self.pattern not in PATTERNS:
            raise refuse("pattern", self.pattern, f"a fragment pattern, one of {list(PATTERNS)}")
        if self.reduce not in REDUCE_METHODS:
            raise refuse("reduce", self.reduce, f"a reduce method, one of {list(REDUCE_METHODS)}")
        if not (is_number(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise refuse("alpha", self.alpha, "a number in [0, 1]")
        if not (is_number(self.outer_lr) and self.outer_lr > 0):
            raise refuse("outer_lr", self.outer_lr, "a finite number > 0")
        if not (is_number(self.outer_momentum) and 0.0 <= self.outer_momentum < 1.0):
            raise refuse("outer_momentum", self.outer_momentum, "a number in [0, 1)")
        if self.init not in INITS:
            raise refuse("init", self.init, f"one of {list(INITS)}")
        for flag in ("error_feedback", "sync_buffers"):
            if not isinstance(getattr(self, flag), bool):
                raise refuse(flag, getattr(self, flag), "true or false")
        if self.outer_device is not None:
            try:
                torch.device(self.outer_device)
            except (RuntimeError, TypeError):
                raise refuse(
                    "outer_device", self.outer_device, "a device such as 'cpu' or 'cuda', or unset"
                ) from None
        if isinstance(self.fragments, (bool, str)) or not isinstance(self.fragments, (int, Sequence)):
            raise refuse("fragments", self.fragments, "a count, or lists of parameter names or modules")
        if isinstance(self.fragments, int) and self.fragments < 1:
            raise refuse("fragments", self.fragments, "an int >= 1")
        if not isinstance(self.fragments, int) and not self.fragments:  # (it was named 'fragments=0')
            raise refuse("fragments", self.fragments, "a count >= 1, or one list of names or modules or more")
        for i, frag in enumerate(() if isinstance(self.fragments, int) else self.fragments):
            if not isinstance(frag, (list, tuple)):  # (a name alone would be taken letter by letter)
                raise refuse(
                    f"fragments[{i}]", frag, f"a list of parameter names or modules, such as [{frag!r}]"
                )
        validate_schedule(self.sync_every, self.num_fragments, self.overlap)

    @property
    def num_fragments(self) -> int:
        return self.fragments if isinstance(self.fragments, int) else len(self.fragments)

    def replace(self, **changes: Any) -> DiLoCoConfig:
        """A copy with ``changes``; ValueError names a key that is not a field, with the fields
        (DiLoCo's, the callbacks' and the trainer's keywords come here)."""
        allowed = [f.name for f in fields(self)]
        unknown = sorted(set(changes) - set(allowed))
        if unknown:
            raise ValueError(f"unknown DiLoCo setting(s) {unknown}; allowed: {sorted(allowed)}")
        return replace(self, **changes)
