"""What every benchmark's JSON records about where and from what it ran."""

from __future__ import annotations

import os
import platform
import subprocess
import time

import torch

__all__ = ["commit", "machine", "stamp"]


def commit() -> str:
    """The checkout's short commit (``unknown`` outside a git checkout)."""
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


def machine() -> str:
    """The GPU's name, or the CPU's architecture and core count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores (no GPU)"


def stamp(benchmark: str) -> dict:
    """The header of a benchmark's JSON: name, date, machine, commit, versions."""
    return {
        "benchmark": benchmark,
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "commit": commit(),
        "torch": torch.__version__,
    }
