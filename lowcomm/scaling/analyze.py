"""From records to tables and fits: best run per (method, N, M), every law the data allows.

``fit_records`` never raises for a law the data cannot support; it lists it under ``skipped`` with
the reason, so one report can say what was fitted and what was not. Each method (DP, DiLoCo, and
each variant: Streaming DiLoCo, a quantizing codec) has curves of its own; the joint laws in N
and M are fitted to the study's DiLoCo runs (one fragment, fp32 rounds) alone.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from .fit import FitResult, best_per_point, fit
from .records import Record

__all__ = ["Analysis", "best_records", "loss_table", "fit_records", "best_hparam_points"]

log = logging.getLogger(__name__)


#: runs of one cell whose tokens per parameter differ by more than this factor are of two budgets
#: (a sweep rounds each run's steps, so one budget's runs differ by a few percent at most)
BUDGET_SPREAD = 1.25


def best_records(records: list[Record]) -> list[Record]:
    """The lowest-loss record per (method, N, M): the study fits tuned runs only.

    Raises:
        ValueError: the records are of two corpora or context lengths (their losses measure
            different things), or a cell holds runs of different token budgets (D/N): its lowest
            loss would be the longer-trained run's, not the best-tuned one's.
    """
    for name, what in (("corpus", "corpora"), ("seq_len", "context lengths")):
        first: dict = {}  # value -> a record of it
        for r in records:
            if getattr(r, name) is not None:
                first.setdefault(getattr(r, name), r)
        if len(first) > 1:
            shown = ", ".join(f"{v!r} ({r.path})" for v, r in list(first.items())[:3])
            raise ValueError(
                f"the records are of {len(first)} {what}: {shown}; their losses measure different "
                f"things: fit or report each {name}'s runs apart"
            )
    cells: dict[tuple[str, int], list[Record]] = defaultdict(list)
    for r in records:
        cells[(r.key, r.N)].append(r)
    for (key, n), rs in sorted(cells.items()):
        lo, hi = min(rs, key=_budget), max(rs, key=_budget)
        if _budget(hi) > BUDGET_SPREAD * _budget(lo):
            raise ValueError(
                f"the cell {key} at N={n:,} holds runs of different token budgets (D/N {_budget(lo):.3g} in "
                f"{lo.path}, {_budget(hi):.3g} in {hi.path}): its lowest loss would be the longer-trained "
                "run's; fit or report each budget's runs apart"
            )
    return best_per_point(records, key=lambda r: (r.key, r.N), value=lambda r: r.loss)


def _budget(r: Record) -> float:
    """Tokens per non-embedding parameter."""
    return r.tokens / r.N


def loss_table(records: list[Record]) -> tuple[list[int], list[str], dict[tuple[str, int], Record]]:
    """Sizes (ascending), curve keys ("dp" first, then DiLoCo by M, then each variant by M) and the
    best record per cell."""
    best = {(r.key, r.N): r for r in best_records(records)}
    sizes = sorted({r.N for r in records})
    order = {r.key: (r.method != "dp", r.method != "diloco", r.method, r.M) for r in records}
    return sizes, sorted(order, key=order.__getitem__), best


def best_hparam_points(records: list[Record], name: str) -> dict[str, list[tuple[int, float]]]:
    """For each curve, (N, value of hyperparameter ``name`` in the best run at that N)."""
    groups: dict[tuple[str, int], list[Record]] = defaultdict(list)
    for r in records:
        if getattr(r, name) is not None:
            groups[(r.key, r.N)].append(r)
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for (key, n), rs in sorted(groups.items()):
        if len({getattr(r, name) for r in rs}) > 1:  # only where the hyperparameter was actually varied
            out[key].append((n, float(getattr(min(rs, key=lambda r: r.loss), name))))
    return dict(out)


@dataclass
class Analysis:
    """Every fit made from a set of records, and what could not be fitted and why."""

    per_curve: dict[str, FitResult] = field(default_factory=dict)
    joint: dict[str, FitResult] = field(default_factory=dict)
    hparams: dict[str, dict[str, FitResult]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "per_curve": {k: v.to_dict() for k, v in self.per_curve.items()},
            "joint": {k: v.to_dict() for k, v in self.joint.items()},
            "hparams": {h: {k: v.to_dict() for k, v in d.items()} for h, d in self.hparams.items()},
            "skipped": [list(s) for s in self.skipped],
        }


def fit_records(
    records: list[Record], *, n_boot: int = 200, seed: int = 0, starts: int = 32, progress: bool = False
) -> Analysis:
    """Fit the per-curve power laws, the joint laws over DiLoCo runs, and the hyperparameter laws
    (``progress``: a bar of the fits, each with its bootstrap: 10,000 resamples take minutes)."""
    from tqdm.auto import tqdm

    a = Analysis()
    best = best_records(records)
    by_key: dict[str, list[Record]] = defaultdict(list)
    for r in best:
        by_key[r.key].append(r)
    hparams = {h: best_hparam_points(records, h) for h in ("lr", "batch_size", "outer_lr")}
    total = len(by_key) + 3 + sum(len(pts) for pts in hparams.values())
    with tqdm(
        total=total, desc="fits", unit="fit", dynamic_ncols=True, leave=False, disable=not progress
    ) as bar:
        for key, rs in sorted(by_key.items()):
            try:
                a.per_curve[key] = fit(
                    "power_law", [r.N for r in rs], [r.loss for r in rs], label=key, n_boot=n_boot, seed=seed
                )
            except ValueError as e:
                a.skipped.append((f"power_law {key}", str(e)))
            bar.update(1)
        dil = [r for r in best if r.method == "diloco"]
        for form in ("joint", "joint_irreducible", "exp_irreducible"):
            try:
                a.joint[form] = fit(
                    form,
                    [r.N for r in dil],
                    [r.loss for r in dil],
                    [r.M for r in dil],
                    label="all DiLoCo",
                    n_boot=n_boot if form == "joint" else max(n_boot // 4, 10),
                    seed=seed,
                    starts=starts,
                )
            except ValueError as e:
                a.skipped.append((f"{form}", str(e)))
            bar.update(1)
        for h, pts in hparams.items():
            for key, nv in pts.items():
                try:
                    res = fit(
                        "power_law",
                        [n for n, _ in nv],
                        [v for _, v in nv],
                        label=key,
                        n_boot=n_boot,
                        seed=seed,
                    )
                    a.hparams.setdefault(h, {})[key] = res
                except ValueError as e:
                    a.skipped.append((f"best {h} {key}", str(e)))
                bar.update(1)
    for what, why in a.skipped:  # (returned in a.skipped: the CLI and the report show them)
        log.info("not fitted: %s (%s)", what, why)
    return a


def percent_vs_dp(records: list[Record]) -> dict[tuple[str, int], float]:
    """(curve, N) -> 100·(L / L_dp − 1) where a DP baseline exists at that N."""
    sizes, keys, best = loss_table(records)
    out = {}
    for n in sizes:
        dp = best.get(("dp", n))
        for k in keys:
            r = best.get((k, n))
            if dp is not None and r is not None:
                out[(k, n)] = 100.0 * (r.loss / dp.loss - 1.0)
    return out


def gap_trend(records: list[Record]) -> dict[str, float]:
    """Per curve but DP's, the slope of (% gap to DP) against log N (negative: the gap shrinks with N)."""
    pct = percent_vs_dp(records)
    out = {}
    for key in {k for k, _ in pct if k != "dp"}:
        pts = sorted((n, v) for (k, n), v in pct.items() if k == key)
        if len(pts) >= 2:
            slope, _ = np.polyfit([math.log(n) for n, _ in pts], [v for _, v in pts], 1)
            out[key] = float(slope)
    return out
