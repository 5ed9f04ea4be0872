"""The one error a setting out of range raises, everywhere in lowcomm, and the checks of a value's kind
it is refused by."""

import math
import os
from typing import Any

__all__ = ["env_int", "host_available_bytes", "human_bytes", "is_int", "is_number", "one_line", "refuse"]


def refuse(name: str, value: Any, allowed: str) -> ValueError:
    """``name=value is not allowed: allowed`` — the setting, the value and what is allowed."""
    return ValueError(f"{name}={value!r} is not allowed: {allowed}")


def one_line(e: BaseException | str, limit: int = 300) -> str:
    """An error's text on one line, at most ``limit`` characters (torch's and gloo's errors span
    lines and pages), for a message that quotes it."""
    return " ".join(str(e).split())[:limit]


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


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB' (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"
