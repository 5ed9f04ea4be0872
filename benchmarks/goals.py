"""Each GPU goal of the GPU-training and FP8 issues, read off a GPU check's JSON. Prints a table.

    python benchmarks/goals.py OUT_DIR            # the folder of `bash benchmarks/gpu_check.sh OUT_DIR`
    python benchmarks/goals.py --throughput T.json --kernels K.json --json goals.json

For every goal: the figure the check measured (the worst over the shapes or sizes the goal names),
the goal, and a verdict: ``met``, ``short``, or ``not measured`` where the check did not get to
it (a section that timed out, a run that failed: its error is named). Nothing here is measured:
it reads ``throughput.json`` (``benchmarks/gpu_throughput.py``) and ``kernels.json``
(``benchmarks/kernels.py``), so a bounded GPU slot's figures reach BENCHMARKS.md's table of the
goals as they were measured, with no arithmetic done by hand.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

#: the shapes (M, K, N) the FP8 issue names for its GEMM goals with the quantize included
ISSUE_GEMMS = ((16384, 4096, 14336), (8192, 8192, 8192))


def _row(goal: str, target: str, values: dict, meets, source: str, note: str = "") -> dict:
    """One goal: ``values`` {where: figure or None}; ``meets(figure) -> bool``. The verdict takes
    every place the goal names: short if one is short, not measured if one is missing."""
    missing = [w for w, v in values.items() if v is None]
    if not values or len(missing) == len(values):
        verdict = "not measured"
    elif any(not meets(v) for v in values.values() if v is not None):
        verdict = "short"
    else:
        verdict = "not measured" if missing else "met"
    return {
        "goal": goal,
        "target": target,
        "values": values,
        "verdict": verdict,
        "source": source,
        "note": note,
    }


def _ratio(a, b):
    return a / b if a is not None and b else None


def _shape(shape) -> str:
    """A GEMM's or a layer's shape as the table names it: ``16384x4096x14336``."""
    return "x".join(map(str, shape))


def training_goals(t: dict) -> list[dict]:
    """The GPU-training issue's goals from gpu_throughput.py's JSON."""
    rows = {r["size"]: r for r in t.get("rows", [])}
    sizes = ("small", "large")

    def x_plain(run: str) -> dict:
        return {s: rows.get(s, {}).get(run, {}).get("x_plain") for s in sizes}

    out = [
        _row(
            f"{label} tokens/s vs the plain compiled bf16 loop",
            f"≥ {x}x",
            x_plain(run),
            lambda v, x=x: v >= x,
            "throughput",
        )
        for run, label, x in (
            ("diloco", "DiLoCo", 0.9),
            ("streaming", "Streaming (P=4, τ=1, e3m0)", 0.9),
            ("dp", "DP", 0.85),
        )
    ]
    out.append(
        _row(
            "DiLoCo MFU at d=1024, 12 layers, T=1024",
            "≥ 35%",
            {"large": rows.get("large", {}).get("diloco", {}).get("mfu")},
            lambda v: v >= 0.35,
            "throughput",
        )
    )
    one = {s: rows.get(s, {}).get("streaming", {}).get("wait_fraction") for s in sizes if s in rows}
    out.append(
        _row(
            "Streaming τ=1: the steps' wait for rounds, one process",
            "< 1%",
            one,
            lambda v: v < 0.01,
            "throughput",
        )
    )
    two = _part(t, "two_process")
    # (a window without rounds measures nothing)
    steady = two.get("wait_fraction_steady") if two.get("steady_rounds") else None
    out.append(
        _row(
            "Streaming τ=1: the steps' wait, two processes, after each fragment's first round",
            "< 1%",
            {two.get("size", "large"): steady},
            lambda v: v < 0.01,
            "throughput",
            note=_two_process_note(two),
        )
    )
    loss = _part(t, "loss_check")
    out.append(
        _row(
            "bf16 final loss vs fp32 (reference model)",
            "within 1%",
            {"reference": loss.get("bf16_over_fp32")},
            lambda v: abs(v - 1) <= 0.01,
            "throughput",
        )
    )
    return out


def _two_process_note(two: dict) -> str:
    if "error" in two:
        lines = two["error"].strip().splitlines()
        return f"the run failed: {lines[-1][:200] if lines else '?'}"
    if two.get("wait_fraction") is None:
        return ""
    note = f"whole run {100 * two['wait_fraction']:.2f}%"
    if two.get("steady_rounds") is not None:
        note += f"; {two['steady_rounds']} rounds from step {two.get('steady_from')}"
    return note


def kernel_goals(k: dict) -> list[dict]:
    """The FP8 issue's goals from kernels.py's JSON."""
    speed = {tuple(r["shape"]): r for r in _part(k, "speed").get("rows", [])}

    def gemm(*keys: str, shapes=ISSUE_GEMMS) -> dict:  # the best of ``keys`` over bf16, per shape
        out = {}
        for shape in shapes:
            r = speed.get(tuple(shape), {})
            ratios = [_ratio(r.get(key), r.get("bf16_tflops")) for key in keys]
            out[_shape(shape)] = max((v for v in ratios if v is not None), default=None)
        return out

    every = tuple(speed) or ISSUE_GEMMS
    out = [
        _row(
            "fp8 rowwise GEMM, its quantize included (fast accumulation counted)",
            "≥ 1.3x bf16",
            gemm("fp8_rowwise_tflops", "fp8_rowwise_fast_accum_tflops"),
            lambda v: v >= 1.3,
            "kernels",
        ),
        _row(
            "mxfp8_fast GEMM, its quantize included (W in 1x128 or 128x128 tiles)",
            "≥ 1.2x bf16",
            gemm("mxfp8_fast_tflops", "mxfp8_fast_w128x128_tflops"),
            lambda v: v >= 1.2,
            "kernels",
        ),
        _row(
            "exact MX GEMM, pre-quantized (the dequant backend or the Triton GEMM)",
            "≥ 0.8x bf16",
            gemm("mx_exact_dequant_tflops", "mx_exact_triton_tflops", shapes=every),
            lambda v: v >= 0.8,
            "kernels",
        ),
        _row(
            "MX dual quantize, share of a copy's bandwidth",
            "≥ 80%",
            {_shape(s): _ratio(speed[s].get("dual_quantize_TBps"), speed[s].get("copy_TBps")) for s in speed},
            lambda v: v >= 0.8,
            "kernels",
        ),
    ]
    lin = _part(k, "linear")
    shape = _shape(lin.get("shape", ())) or "linear"
    for recipe, target in (("fp8_rowwise", 1.3), ("mxfp8_fast", 1.15)):
        out.append(
            _row(
                f"one Linear forward + backward, eager, {recipe}",
                f"≥ {target}x bf16",
                {shape: lin.get(f"{recipe}_x_bf16")},
                lambda v, t=target: v >= t,
                "kernels",
                note=lin.get(f"{recipe}_error", ""),
            )
        )
    out.append(_training_row(k))
    return out


def _training_row(k: dict) -> dict:
    """The low-precision training runs (eager and compiled) against their own bf16: met where one
    runs ≥ 1.15x bf16's tokens/s with its final loss within 1% of bf16's. Shows the fastest run,
    and the fastest within 1% where that is another."""
    runs, errors = [], []
    for part in ("training", "training_compiled"):
        for name, run in _part(k, part).items():
            if not isinstance(run, dict) or name == "bf16":
                continue
            label = f"{name} ({'compiled' if part == 'training_compiled' else 'eager'})"
            if "error" in run:
                errors.append(f"{label}: {run['error'][:120]}")
            elif (
                run.get("tokens_per_second_x_bf16") is not None and run.get("loss_ratio_vs_bf16") is not None
            ):
                runs.append((run["tokens_per_second_x_bf16"], run["loss_ratio_vs_bf16"], label))
    runs.sort(reverse=True)
    close = [r for r in runs if abs(r[1] - 1) <= 0.01]
    shown = list(dict.fromkeys([*runs[:1], *close[:1]]))
    row = _row(
        "training d=1024, 12 layers, T=1024 in a low-precision recipe, final loss within 1% of bf16's",
        "≥ 1.15x bf16",
        {label: x for x, _, label in shown},
        lambda v: v >= 1.15,
        "kernels",
        note="; ".join([*(f"{label} loss {loss:.3f}x bf16's" for _, loss, label in shown), *errors]),
    )
    if runs:  # (a run fast enough counts only with its loss within 1%)
        row["verdict"] = "met" if close and close[0][0] >= 1.15 else "short"
    return row


def table(rows: list[dict]) -> str:
    """The goals as a markdown table (a note's line breaks and bars made cell text)."""
    lines = ["| goal | target | measured | verdict |", "|---|---|---|---|"]
    for r in rows:
        shown = ", ".join(f"{w}: {_fmt(r['target'], v)}" for w, v in r["values"].items()) or "-"
        if r["note"]:
            shown += f" ({' '.join(r['note'].split()).replace('|', '/')})"
        lines.append(f"| {r['goal']} | {r['target']} | {shown} | {r['verdict']} |")
    return "\n".join(lines)


def _fmt(target: str, v) -> str:
    """A figure as its goal states it: a share (the target a percentage bound) or a ratio."""
    if v is None:
        return "not measured"
    if target.endswith("failed"):
        return f"{v} failed"
    return f"{100 * v:.2f}%" if target[0] in "≥<" and target.endswith("%") else f"{v:.4g}x"


def tests_goals(base: Path | None) -> list[dict]:
    """The FP8 issue's "every kernel test passes on an H100/H200", and the GPU trainer's tests,
    from the pytest output the check keeps (``tests.txt``: one session per shard; ``train_tests.txt``):
    met where every session ended with nothing failed, not measured where one has no summary (a
    time-out) or the file is missing."""
    out = []
    for name, goal in (("tests.txt", "kernel test on the GPU"), ("train_tests.txt", "GPU trainer test")):
        path = base / name if base else None
        text = path.read_text(errors="replace") if path and path.exists() else ""
        sessions = text.count("test session starts")
        summaries = re.findall(r"^=+ (.*?) in [0-9.]+s.* =+$", text, re.M)
        counts = collections.Counter()
        for line in summaries:
            for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped)", line):
                counts[what.rstrip("s") if what.startswith("error") else what] += int(n)
        bad = counts["failed"] + counts["error"]
        value = None if not sessions or len(summaries) < sessions else bad
        row = _row(f"every {goal} passes", "0 failed", {name: value}, lambda v: v == 0, "tests")
        row["note"] = ", ".join(f"{n} {w}" for w, n in sorted(counts.items()))
        if sessions > len(summaries):
            row["note"] += (
                f"{'; ' if row['note'] else ''}{sessions - len(summaries)} of {sessions} sessions unfinished"
            )
        out.append(row)
    return out


def _load(path: Path | None, name: str) -> dict:
    """A benchmark's JSON, {} where there is none; a run on a machine without a GPU (a CPU smoke
    run) gives its header only: nothing in it is a GPU figure."""
    if path is None or not path.exists():
        return {}
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"goals.py: {path} is not JSON ({e}); expected {name}.py's output") from None
    if not isinstance(d, dict) or d.get("benchmark") != name:
        raise SystemExit(f"goals.py: {path} is not {name}.py's output (its 'benchmark' field)")
    if "(no GPU)" in d.get("machine", ""):
        return {f: d.get(f) for f in ("benchmark", "machine", "date", "commit", "torch")}
    return d


def _part(d: dict, name: str) -> dict:
    """A part of a benchmark's JSON, {} where it is not a measurement (absent, or a note)."""
    v = d.get(name)
    return v if isinstance(v, dict) else {}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", nargs="?", help="a GPU check's folder (its throughput.json and kernels.json)")
    p.add_argument(
        "--throughput", type=Path, help="gpu_throughput.py's JSON (default: OUT_DIR/throughput.json)"
    )
    p.add_argument("--kernels", type=Path, help="kernels.py's JSON (default: OUT_DIR/kernels.json)")
    p.add_argument("--json", help="also write the goals here")
    args = p.parse_args(argv)
    base = Path(args.out_dir) if args.out_dir else None
    if base is not None and not base.is_dir():
        p.error(
            f"OUT_DIR {str(base)!r} is not a folder: give the folder gpu_check.sh wrote, or "
            "--throughput and --kernels"
        )
    t_path = args.throughput or (base / "throughput.json" if base else None)
    k_path = args.kernels or (base / "kernels.json" if base else None)
    if not (t_path and t_path.exists()) and not (k_path and k_path.exists()):
        p.error(f"found neither {t_path} nor {k_path}: nothing to read")
    t, k = _load(t_path, "gpu_throughput"), _load(k_path, "kernels")
    rows = training_goals(t) + kernel_goals(k) + tests_goals(base)
    sources = {
        name: {f: d.get(f) for f in ("machine", "date", "commit", "torch")}
        for name, d in (("throughput", t), ("kernels", k))
        if d
    }
    print(table(rows))
    for name, s in sources.items():
        print(f"{name}: {s['machine']}, {s['date']}, commit {s['commit']}, torch {s['torch']}")
    out = {"benchmark": "goals", "sources": sources, "goals": rows}
    if args.json:
        write_result(out, args.json, echo=False)
    return out


if __name__ == "__main__":
    main()
