"""Job membership as pure functions of members, heartbeats and a monotonic clock.

The coordinator's sockets only feed these functions; every change of the member set starts a new
epoch (a new torch.distributed group for the survivors). A member is dead when it has been silent
longer than its deadline, which adapts to how often it actually heartbeats:

    deadline = clamp(factor x observed heartbeat interval, floor, ceiling)

with floor 2 s, ceiling 30 s and factor 5 by default (a worker heartbeating every 0.5 s is declared
dead after 2.5 s of silence), so nobody has to tune it; the three numbers are the only settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..._checks import refuse

__all__ = [
    "check_deadline",
    "Deadline",
    "Member",
    "Membership",
    "register",
    "heartbeat",
    "leave",
    "expire",
    "ranks",
    "set_synced",
]


def check_deadline(name: str, floor: float, ceiling: float, factor: float) -> None:
    """Refuse (ValueError naming ``name``'s floor and ceiling, as the coordinator's flags do) a
    deadline that is not 0 < floor <= ceiling, both finite (an infinite one never declares a
    death), or a factor below 1."""
    if not 0 < floor <= ceiling < math.inf:
        raise ValueError(
            f"{name}_floor={floor!r} and {name}_ceiling={ceiling!r} are not allowed: "
            "0 < floor <= ceiling, both finite seconds"
        )
    if not 1 <= factor < math.inf:
        raise refuse(f"{name}_factor", factor, "a finite number >= 1")


@dataclass(frozen=True)
class Deadline:
    """How long a member may stay silent: clamp(factor x interval, floor, ceiling) seconds."""

    floor: float = 2.0
    ceiling: float = 30.0
    factor: float = 5.0

    def __post_init__(self) -> None:
        check_deadline("deadline", self.floor, self.ceiling, self.factor)

    def seconds(self, interval: float | None) -> float:
        if interval is None:
            return self.ceiling
        return min(max(self.factor * interval, self.floor), self.ceiling)


@dataclass(frozen=True)
class Member:
    worker_id: str
    addr: str
    joined: float
    last_seen: float
    step: int = 0
    round: int = -1
    interval: float | None = None  # smoothed heartbeat interval
    incarnation: str = ""  # changes when the worker process restarts under the same id
    synced: bool = True  # holds the job's current global state (a joiner is not synced until transfer)


@dataclass(frozen=True)
class Membership:
    """The members by id, in join order (a new mapping on every change; never mutated)."""

    epoch: int = 0
    index: dict[str, Member] = field(default_factory=dict)

    def get(self, worker_id: str) -> Member | None:
        return self.index.get(worker_id)

    @property
    def members(self) -> tuple[Member, ...]:
        return tuple(self.index.values())

    @property
    def ids(self) -> list[str]:
        return list(self.index)


def register(
    ms: Membership,
    worker_id: str,
    addr: str,
    step: int,
    now: float,
    *,
    incarnation: str = "",
    synced: bool = True,
    round: int = -1,
) -> Membership:
    """Add a worker (a new epoch), or refresh one that is already a member (same epoch).

    A member that registers again with another ``incarnation`` is a restarted process: the old
    one is gone, so it is replaced and the epoch changes.
    """
    old = ms.get(worker_id)
    if old is not None and old.incarnation == incarnation:
        new = replace(old, addr=addr, step=step, last_seen=now, synced=synced, round=round)
        return _put(ms, new)
    if old is not None:
        ms = leave(ms, worker_id)
    member = Member(
        worker_id,
        addr,
        joined=now,
        last_seen=now,
        step=step,
        incarnation=incarnation,
        synced=synced,
        round=round,
    )
    return Membership(ms.epoch + 1, {**ms.index, worker_id: member})


def heartbeat(ms: Membership, worker_id: str, step: int, round: int, now: float) -> Membership:
    """Record a heartbeat; raises KeyError for a worker that is not a member."""
    old = ms.get(worker_id)
    if old is None:
        raise KeyError(worker_id)
    gap = now - old.last_seen
    interval = gap if old.interval is None else 0.8 * old.interval + 0.2 * gap
    new = replace(old, last_seen=now, step=step, round=round, interval=interval)
    return _put(ms, new)


def set_synced(ms: Membership, worker_id: str, synced: bool, round: int | None = None) -> Membership:
    """Mark a member as holding (or no longer holding) the job's state; same epoch."""
    old = ms.get(worker_id)
    if old is None:
        raise KeyError(worker_id)
    return _put(ms, replace(old, synced=synced, round=old.round if round is None else round))


def _put(ms: Membership, new: Member) -> Membership:
    return replace(ms, index={**ms.index, new.worker_id: new})  # a C-speed copy: cheap at 1000s of members


def leave(ms: Membership, worker_id: str) -> Membership:
    """Remove a worker that said goodbye (a new epoch if it was a member)."""
    if ms.get(worker_id) is None:
        return ms
    return Membership(ms.epoch + 1, {k: m for k, m in ms.index.items() if k != worker_id})


def expire(ms: Membership, now: float, deadline: Deadline) -> tuple[Membership, list[str]]:
    """Drop members silent past their deadline; returns the new membership and the dead ids."""
    dead = [m.worker_id for m in ms.members if now - m.last_seen > deadline.seconds(m.interval)]
    if not dead:
        return ms, []
    return Membership(ms.epoch + 1, {k: m for k, m in ms.index.items() if k not in dead}), dead


def ranks(ms: Membership) -> dict[str, int]:
    """Rank of each member in this epoch: by worker id, so that a round's reduction order (and
    therefore its bits) does not depend on the order in which workers joined. Computed once per
    membership (a membership is never changed, only replaced)."""
    cached = ms.__dict__.get("_ranks")
    if cached is None:
        cached = {wid: r for r, wid in enumerate(sorted(ms.index))}
        object.__setattr__(ms, "_ranks", cached)
    return cached
