"""What every benchmark's JSON records about where and from what it ran."""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import getpass
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

__all__ = [
    "ROUND_FIELDS",
    "commit",
    "inductor_kernels",
    "launch_command",
    "machine",
    "peak_memory_probe",
    "probe_args",
    "replacing",
    "round_times",
    "stamp",
    "steady_tokens_per_second",
    "steady_wait_fractions",
    "window_ms_per_step",
    "write_probe",
    "write_result",
]


def commit() -> str:
    """The checkout's short commit (``unknown`` outside a git checkout)."""
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


def launch_command(replicas: int, *command: str, procs_per_replica: int = 1) -> list[str]:
    """``lowcomm launch`` of ``command`` (its words) on this machine, from this interpreter."""
    head = [sys.executable, "-m", "lowcomm", "launch", "--replicas", str(replicas)]
    return [*head, "--procs-per-replica", str(procs_per_replica), "--", *command]


def machine() -> str:
    """The GPU's name, or the CPU's architecture and core count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores (no GPU)"


#: what a probe of :func:`peak_memory_probe` starts with: ``hwm_mb()``, the process's resident
#: high-water mark (``VmHWM``), ``rss_mb()``, and ``reset_peak()``, which sets the mark to now
PEAK_PRELUDE = """
import re
def _status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
def hwm_mb():
    return _status("VmHWM")
def rss_mb():
    return _status("VmRSS")
def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
"""


def probe_args(doc: str) -> argparse.Namespace:
    """The memory probes' command line: the model (``--layers`` Linear layers of ``--width``
    squared, fp32) and ``--json``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--width", type=int, default=2048, help="each layer's width (default 2048)")
    ap.add_argument("--layers", type=int, default=24, help="layers (default 24: 100.7M parameters)")
    ap.add_argument("--json", default=None, help="write the results here")
    return ap.parse_args()


def write_probe(benchmark: str, args: argparse.Namespace, row: dict) -> None:
    """A memory probe's result, stamped, with its model's size, to ``--json``."""
    write_result(
        {**stamp(benchmark), "width": args.width, "layers": args.layers, **row}, args.json, echo=False
    )


def peak_memory_probe(probe: str, *args: object) -> dict:
    """Run ``probe`` (Python source, after :data:`PEAK_PRELUDE`) in a fresh process with ``args``
    in ``sys.argv[1:]``; returns the JSON object it prints last. Linux only (``/proc``)."""
    if not sys.platform.startswith("linux"):
        raise SystemExit("the memory probes read /proc/self/status: Linux only")
    done = subprocess.run(
        [sys.executable, "-c", PEAK_PRELUDE + probe, *map(str, args)], capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"a memory probe failed (exit {done.returncode}):\n{done.stderr.strip()}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}


def stamp(benchmark: str) -> dict:
    """The header of a benchmark's JSON: name, date, machine, commit, versions."""
    return {
        "benchmark": benchmark,
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "commit": commit(),
        "torch": torch.__version__,
    }


def write_result(result: dict, path: str | None, *, echo: bool = True) -> None:
    """A benchmark's result as JSON: printed on stdout (``echo``) and, given ``path``, written there
    (its folder made). A benchmark that saves after each part (so a time-out keeps what ran) calls
    it with ``echo=False`` until its end."""
    text = json.dumps(result, indent=2)
    if echo:
        print(text, flush=True)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")


def steady_tokens_per_second(run_dir: str, summary: dict, log_every: int) -> float:
    """Tokens per second of a ``lowcomm train`` run after its first quarter (warm-up, compilation
    and autotuning left out), from its step records.

    The losses are read (a host sync) every ``log_every`` steps: the record of each read's step is
    written right after the device caught up, so its wall time is when that step had finished.
    """
    steps = summary["steps_run"]
    points = _read_points(run_dir, steps, log_every)
    first = next(p for p in points if p[0] >= steps // 4)
    last = points[-1]
    return (last[0] - first[0]) * summary["tokens"] / steps / (last[1] - first[1])


def steady_wait_fractions(run_dir: str, summary: dict, log_every: int) -> dict:
    """The waits for rounds of a ``lowcomm train`` run in its steady part: from the first loss
    read after both the run's first quarter (as :func:`steady_tokens_per_second`) and every
    fragment's first round, to its end. ``wait_fraction_steady`` (the host's, as the summary's
    ``wait_fraction``) and ``device_wait_fraction_steady`` (the GPU's; null where not timed):
    replica 0's rounds applied in that window over its wall time, the end's sync's (``final``)
    left out; ``steady_from`` its first step, ``steady_rounds`` its rounds (both null or 0 where
    the run has no such window). A fragment's first round pays for first use (buffers,
    connections, kernels): a run of 80 steps with H = 50 and P = 4 holds nothing else."""
    none = {"wait_fraction_steady": None, "device_wait_fraction_steady": None, "steady_from": None}
    if summary["wait_fraction"] is None:  # DP: its mean is part of every step, no rounds
        return {**none, "steady_rounds": 0}
    steps = summary["steps_run"]
    rounds = [r for r in _rounds_of_replica_0(run_dir) if not r["final"]]
    firsts: dict = {}
    for r in rounds:
        firsts.setdefault(r["fragment"], r["apply_step"])
    start = max([steps // 4, *firsts.values()])
    points = _read_points(run_dir, steps, log_every)
    first = next((p for p in points if p[0] >= start), None)
    last = points[-1]
    if first is None or last[1] <= first[1]:
        return {**none, "steady_rounds": 0}
    wall = last[1] - first[1]
    rounds = [r for r in rounds if first[0] < r["apply_step"] <= last[0]]
    device = [r["device_wait_s"] for r in rounds]
    timed = bool(device) and all(d is not None for d in device)
    return {
        "wait_fraction_steady": sum(r["wait_s"] for r in rounds) / wall,
        "device_wait_fraction_steady": sum(device) / wall if timed else None,
        "steady_from": first[0],
        "steady_rounds": len(rounds),
    }


def window_ms_per_step(run_dir: str, summary: dict, log_every: int) -> list[list[float]]:
    """``[last step, ms a step]`` for each window of ``log_every`` steps between two loss reads of
    a ``lowcomm train`` run (the first window left out: it holds the compilation): a window
    slower than its neighbours holds something the others do not, such as a DiLoCo round."""
    points = _read_points(run_dir, summary["steps_run"], log_every)
    return [[b[0], 1e3 * (b[1] - a[1]) / (b[0] - a[0])] for a, b in zip(points, points[1:]) if b[0] > a[0]]


#: what :func:`round_times` keeps of each round record, in this order
ROUND_FIELDS = (
    "fragment",
    "send_step",
    "apply_step",
    "send_s",
    "encode_s",
    "comm_s",
    "decode_s",
    "wait_s",
    "outer_s",
    "device_wait_s",
)


def round_times(run_dir: str) -> list[list]:
    """Each round of replica 0 of a ``lowcomm train`` run, from its records: the values of
    :data:`ROUND_FIELDS` (seconds rounded to 0.1 ms; ``device_wait_s``, the GPU's, null where not
    timed), in the order the rounds were applied. Where
    a run's waits come from: one slow round (the first of a fragment, the end's) or every one."""
    return [
        [round(r[f], 4) if f.endswith("_s") and r[f] is not None else r[f] for f in ROUND_FIELDS]
        for r in _rounds_of_replica_0(run_dir)
    ]


def _rounds_of_replica_0(run_dir: str) -> list[dict]:
    """The round records of replica 0 of a ``lowcomm train`` run, in the order they were applied."""
    from lowcomm.runtime import read_jsonl

    events = read_jsonl(Path(run_dir) / "events.jsonl")
    return [e for e in events if e["kind"] == "round" and e["replica"] == 0]


def _read_points(run_dir: str, steps: int, log_every: int) -> list[tuple[int, float]]:
    """(step, wall) of the step records written when the losses were read (every ``log_every``
    steps, and the last)."""
    from lowcomm.runtime import read_jsonl

    return [
        (e["step"], e["wall"])
        for e in read_jsonl(Path(run_dir) / "events.jsonl")
        if e["kind"] == "step" and (e["step"] % log_every == 0 or e["step"] == steps)
    ]


def profile_window(steps: int, count: int) -> tuple[int, int] | None:
    """Steps (A, B] to profile: after the first steps' compilation, before the timed part (the
    loops without the trainer time their last half, a ``lowcomm train`` run its last three
    quarters); None for count 0 or a run too short."""
    if not count:
        return None
    start = max(steps // 8, 1)
    end = min(start + count, max(steps // 4, start + 1), steps)
    return (start, end) if start < end else None  # None: too few steps to profile any


def profile_top(stem: Path, rows: int = 25) -> list[str]:
    """The first rows of a profile's table (its two header lines: the steps, their wall and busy
    time; the column names; the slowest operators)."""
    return stem.with_suffix(".txt").read_text().splitlines()[: rows + 5]


def inductor_kernels(trace: Path, top: int = 3, chars: int = 8000, cache: Path | None = None) -> list[dict]:
    """The slowest kernels torch.compile generated in a profile's Chrome trace (Inductor's Triton
    kernels, named ``triton_*``): each one's name, calls, device µs in all and ``source``, the
    block Inductor's output code holds for it (the graph's nodes it fused, the ATen operators
    they came from, its Triton code; at most ``chars`` characters), read from Inductor's cache
    directory (``cache``, default torch's), "" where not found. What a kernel's truncated name in
    the profile's table cannot say: which tensors it reads and writes, and how it is tiled."""
    events = json.loads(Path(trace).read_text()).get("traceEvents", [])
    total: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") == "kernel" and name.startswith("triton_"):
            total[name] += float(e.get("dur", 0.0))
            calls[name] += 1
    files = _inductor_files(cache)
    read = functools.cache(lambda path: path.read_text(errors="replace"))  # once for all kernels
    return [
        {"name": n, "calls": calls[n], "device_us": us, "source": _inductor_source(n, files, read, chars)}
        for n, us in total.most_common(top)
    ]


def _inductor_files(cache: Path | None) -> list[Path]:
    """Inductor's generated Python files, newest first."""
    if cache is None:
        try:
            from torch._inductor.runtime.cache_dir_utils import cache_dir

            cache = Path(cache_dir())
        except ImportError:  # (older torch) its default place
            default = Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}"
            cache = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", default))
    found = [p for p in Path(cache).rglob("*.py") if p.is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _inductor_source(name: str, files: list[Path], read, chars: int) -> str:
    """``name``'s block in the newest output code that defines it (from the comment naming its
    source nodes to the end of its Triton code), else the newest kernel file defining it."""
    marker, kernel_file = f"{name} = async_compile.triton(", None
    for path in files:
        text = read(path)
        at = text.find(marker)
        if at >= 0:
            start = max(text.rfind("# kernel path:", 0, at), text.rfind("\n\n\n", 0, at), 0)
            end = text.find("'''", text.find("'''", at) + 3)  # its code's closing quotes
            line_end = text.find("\n", end) if end >= 0 else at + chars
            return text[start : line_end if line_end >= 0 else len(text)][:chars].strip()
        if kernel_file is None and f"def {name}(" in text:
            kernel_file = text
    return kernel_file[:chars].strip() if kernel_file else ""


def empty_launches(out: torch.Tensor) -> dict:
    """``{"direct": call, "autotuned": call}``: one launch of an empty Triton kernel (a store of 32
    values into ``out``) through Triton's own launch path, and the same through ``triton.autotune``
    with two candidates and its choice made at the first call (no timing): what a launch, and the
    autotuner's share of one, cost the host."""
    import triton
    from empty_kernel import empty  # a module's own: triton 3.2 looks a kernel's names up there

    from lowcomm.kernels.triton_quantize import autotuned

    configs = [triton.Config({"BLOCK": b}, num_warps=1) for b in (16, 32)]
    tuned = autotuned(empty, configs, [], lambda fn, quantiles=None: [1.0, 1.0, 1.0])
    return {"direct": lambda: empty[(1,)](out, BLOCK=32), "autotuned": lambda: tuned[(1,)](out)}


@contextlib.contextmanager
def replacing(stand_ins: list[tuple]):
    """Each ``(owner, name, value)``: ``owner.name`` is ``value`` inside, its own again after (a
    class's attribute as it was defined: a staticmethod or classmethod stays one)."""
    kept = [
        (owner, name, owner.__dict__.get(name, getattr(owner, name, None))) for owner, name, _ in stand_ins
    ]  # noqa: E501
    try:
        for owner, name, value in stand_ins:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in reversed(kept):
            setattr(owner, name, value)
