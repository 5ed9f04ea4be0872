"""``--profile A:B``: torch.profiler over steps A+1 to B of a run.

What a torchtitan user reaches for when a run is slower than it should be: the steps' operators
and kernels, as a Chrome trace (open it in https://ui.perfetto.dev or chrome://tracing) and as a
table of the operators by their own time on the device (the GPU's kernels on CUDA, the CPU's
time elsewhere), written next to the run's records:

    run_dir/profile-steps<A+1>-<B>[-rank<R>].json   the trace
    run_dir/profile-steps<A+1>-<B>[-rank<R>].txt    the table (top 40 rows)

and an event ``profile`` in events.jsonl naming them. The table's second line (and the event)
says how long a profiled step took on the wall and how much of it the device was busy with the
operators' own work (on CUDA the kernels' time, as the table's "Self CUDA time total"): a step
much longer than its kernels means the GPU waited for the host. The profiled steps run slower
(the profiler records every operator), so a run's tokens/s counts them: choose steps outside the
window being measured, after the first steps' compilation.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from ..._checks import refuse
from ..files import private_open

__all__ = ["StepProfiler", "parse_profile_steps"]

log = logging.getLogger(__name__)

TABLE_ROWS = 40


def parse_profile_steps(spec: str, steps: int) -> tuple[int, int] | None:
    """``"A:B"`` -> (A + 1, B), the first and last step profiled; ``""`` -> None (off).

    Raises:
        ValueError: not two whole numbers 0 <= A < B <= ``steps``, one line naming the value.
    """
    if spec == "":
        return None
    head, sep, tail = str(spec).partition(":")
    try:
        a, b = int(head), int(tail)
    except ValueError:
        a = b = -1
    if not (sep and 0 <= a < b <= steps):
        allowed = f"'' (off) or 'A:B', whole steps 0 <= A < B <= steps ({steps}), to profile steps A+1 to B"
        raise refuse("profile", spec, allowed)
    return a + 1, b


class StepProfiler:
    """Starts torch.profiler before step ``first`` and stops it after step ``last`` (or when the
    run ends first), then writes the trace and the table to ``stem`` + ".json" / ".txt"."""

    def __init__(self, first: int, last: int, stem: Path, device: torch.device):
        self.first, self.last, self.stem, self.device = first, last, stem, device
        self.prof: torch.profiler.profile | None = None
        self.seen = 0  # the last step run under the profiler
        self.done = False
        self.t0 = 0.0  # when the profiled steps began (the device idle)

    def before(self, step: int) -> None:
        """``step`` (1-based) is about to run."""
        if self.prof is None and not self.done and self.first <= step <= self.last:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.start()
            _synchronize(self.device)  # the steps' wall time starts with nothing queued before them
            self.t0 = time.perf_counter()

    def after(self, step: int) -> dict | None:
        """``step`` ran; what :meth:`stop` returns once it is the last one profiled, else None."""
        if self.prof is None:
            return None
        self.seen = step
        return self.stop() if step >= self.last else None

    def stop(self) -> dict | None:
        """Stop (if running) and write the files; the ``profile`` event's fields, None if nothing
        was profiled."""
        if self.prof is None:
            return None
        prof, self.prof, self.done = self.prof, None, True
        _synchronize(self.device)
        steps = max(self.seen - self.first + 1, 1)
        wall_ms = (time.perf_counter() - self.t0) * 1e3 / steps
        prof.stop()
        trace, table = self.stem.with_suffix(".json"), self.stem.with_suffix(".txt")
        prof.export_chrome_trace(str(trace))
        os.chmod(trace, 0o600)  # owner-only, as the run's other records
        on = "device" if self.device.type == "cuda" else "cpu"
        events = prof.key_averages()
        busy_ms = _busy_us(events, self.device) / 1e3 / steps
        with private_open(table, "w") as f:
            f.write(f"steps {self.first}-{self.seen} on {self.device}, operators by their own {on} time\n")
            f.write(
                f"{wall_ms:.2f} ms a step on the wall, {busy_ms:.2f} ms of the operators' own {on} time "
                f"({100 * busy_ms / max(wall_ms, 1e-9):.0f}%)\n"
            )
            f.write(_table(events, self.device))
        log.info("profiled steps %d-%d: %s, %s", self.first, self.seen, trace, table)
        return {
            "steps": [self.first, self.seen],
            "trace": str(trace),
            "table": str(table),
            "wall_ms_per_step": wall_ms,
            "busy_ms_per_step": busy_ms,
        }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _busy_us(events, device: torch.device) -> float:
    """Microseconds of the operators' own time: on CUDA the kernels' (the events on the device,
    as the table's "Self CUDA time total" sums them), else the CPU operators' self time."""
    if device.type != "cuda":
        return float(sum(e.self_cpu_time_total for e in events))
    from torch.autograd import DeviceType

    total = 0.0
    for e in events:
        if getattr(e, "device_type", None) == DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
            total += getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
    return total


def _table(events, device: torch.device) -> str:
    """The key averages by self time on ``device``: torch >= 2.4 names the GPU's column
    ``device``, older ones ``cuda``."""
    if device.type != "cuda":
        return events.table(sort_by="self_cpu_time_total", row_limit=TABLE_ROWS)
    try:
        return events.table(sort_by="self_device_time_total", row_limit=TABLE_ROWS)
    except (AttributeError, KeyError):
        return events.table(sort_by="self_cuda_time_total", row_limit=TABLE_ROWS)
