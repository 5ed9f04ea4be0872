"""The one error a setting out of range raises, everywhere in lowcomm, and the checks of a value's kind
it is refused by."""

import math
import os
from typing import Any

__all__ = [
    "env_int",
    "host_available_bytes",
    "human_bytes",
    "is_int",
    "is_number",
    "named_ranks",
    "newest_common_step",
    "one_line",
    "refuse",
    "threads_env",
]


def refuse(name: str, value: Any, allowed: str) -> ValueError:
    """``name=value is not allowed: allowed`` — the setting, the value and what is allowed."""
    return ValueError(f"{name}={value!r} is not allowed: {allowed}")


def one_line(e: BaseException | str, limit: int = 300) -> str:
    """An error's text on one line, at most ``limit`` characters (torch's and gloo's errors span
    lines and pages), for a message that quotes it."""
    return " ".join(str(e).split())[:limit]


def named_ranks(ranks) -> str:
    """``[1]`` -> "rank 1", ``[1, 3]`` -> "ranks 1, 3" (processes named in a message)."""
    ranks = list(ranks)
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def newest_common_step(steps: list[list[int]], who: str, *, skip_empty: bool = False) -> int:
    """The newest step that every one of ``steps`` holds (one list of checkpoint steps for each
    process or replica, ``who``, in rank order); with ``skip_empty``, every one that holds any
    (the others take another's checkpoint of it).

    Raises:
        ValueError: no step is in all of them, naming each one's steps.
    """
    held = [s for s in steps if s] if skip_empty else steps
    common = set(held[0]).intersection(*held[1:]) if held else set()
    if not common:
        detail = ", ".join(f"{who} {r} {sorted(s) or 'none'}" for r, s in enumerate(steps))
        raise ValueError(f"no step has a checkpoint on every {who} ({detail})")
    return max(common)


def is_int(v: Any, lo: int | None = None) -> bool:
    """``v`` is an int (a bool is not one), at least ``lo`` when given."""
    return isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)


def is_number(v: Any) -> bool:
    """``v`` is a finite int or float (a bool is not one)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def env_int(name: str, default: int | None = None) -> int:
    """An integer from the environment (a launcher's RANK, WORLD_SIZE, ...): ``default`` where it is
    unset. Raises RuntimeError where it is unset without a default (a job not started by a
    launcher), ValueError where it is not an integer, each naming the variable."""
    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise RuntimeError(
                f"environment variable {name} is not set: start the job with torchrun or lowcomm launch"
            )
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer") from None


def host_available_bytes() -> int | None:
    """The host memory available to a new allocation (Linux's MemAvailable), or None where the
    platform does not say."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def threads_env(procs: int) -> dict[str, str]:
    """``OMP_NUM_THREADS`` for each of ``procs`` processes that share this machine's cores (those
    this process may run on): its cores divided among them, at least one, where the user has not
    set the variable. Each process's torch would otherwise start a thread per core: two elastic
    workers of a tiny model on 2 cores ran 300 steps in 9.9 s instead of 0.8 s, their thread pools
    spinning against each other. (torchrun sets 1 for more than one process a node.)"""
    if procs <= 1 or os.environ.get("OMP_NUM_THREADS"):
        return {}
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # (no sched_getaffinity: not Linux)
        cores = os.cpu_count() or 1
    return {"OMP_NUM_THREADS": str(max(1, cores // procs))}


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB' (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"
