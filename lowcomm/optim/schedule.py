"""The Streaming DiLoCo schedule and fragment patterns, as pure functions of integers.

Steps are counted from 1: ``step`` is the number of inner steps completed so far. Fragment ``p``
(0-based, of ``P``) has offset ``t_p = floor(p·H/P)``; it sends its pseudo-gradient at steps
``t_p + H, t_p + 2H, ...`` and applies the averaged result ``τ`` steps after each send.
With ``P <= H`` the offsets are distinct, so at most one fragment sends per step.

References:
    Douillard et al., "Streaming DiLoCo with overlapping communication" (2025), section 2.2.
"""

from __future__ import annotations

from .._checks import is_int, refuse

__all__ = [
    "PATTERNS",
    "fragment_offsets",
    "sends_at",
    "is_send_step",
    "partition_blocks",
    "validate_schedule",
]

PATTERNS = ("strided", "sequential")


def validate_schedule(sync_every: int, num_fragments: int, overlap: int) -> None:
    """Raise ValueError naming the bad value unless ``H >= 1``, ``1 <= P <= H``, ``0 <= τ``, ``τ·P < H``."""
    if not is_int(sync_every) or sync_every < 1:
        raise refuse("sync_every", sync_every, "an int >= 1")
    if not is_int(num_fragments) or not 1 <= num_fragments <= sync_every:
        raise refuse("fragments", num_fragments, f"an int in [1, sync_every={sync_every}]")
    if not is_int(overlap) or overlap < 0 or overlap * num_fragments >= sync_every:
        raise refuse(
            "overlap",
            overlap,
            f"an int >= 0 and below sync_every/fragments = {sync_every}/{num_fragments} "
            f"= {sync_every / num_fragments:g}",
        )


def fragment_offsets(sync_every: int, num_fragments: int) -> list[int]:
    """``t_p = floor(p·H/P)`` for each fragment."""
    return [p * sync_every // num_fragments for p in range(num_fragments)]


def is_send_step(step: int, fragment: int, sync_every: int, num_fragments: int) -> bool:
    """Whether ``fragment`` sends after ``step`` inner steps."""
    t = fragment * sync_every // num_fragments
    return step >= t + sync_every and (step - t) % sync_every == 0


def sends_at(step: int, sync_every: int, num_fragments: int) -> list[int]:
    """Fragments that send after ``step`` inner steps (at most one when ``P <= H``)."""
    return [p for p in range(num_fragments) if is_send_step(step, p, sync_every, num_fragments)]


def partition_blocks(num_blocks: int, num_groups: int, pattern: str = "strided") -> list[list[int]]:
    """Assign block indices to ``num_groups`` groups.

    ``strided``: block ℓ goes to group ℓ mod G. ``sequential``: consecutive runs, the first groups
    one block longer when the count does not divide.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"unknown fragment pattern {pattern!r}; allowed: {list(PATTERNS)}")
    if not 1 <= num_groups <= max(num_blocks, 1):
        raise ValueError(f"cannot split {num_blocks} blocks into {num_groups} fragments")
    if pattern == "strided":
        return [list(range(g, num_blocks, num_groups)) for g in range(num_groups)]
    q, r = divmod(num_blocks, num_groups)
    out, start = [], 0
    for g in range(num_groups):
        n = q + (1 if g < r else 0)
        out.append(list(range(start, start + n)))
        start += n
    return out
