"""Reports: report.md, fits.json and PNG plots from records and their :class:`Analysis`.

Plots only read results: loss vs N per curve with the fitted power laws (log-log), loss vs M per N
(the loss-vs-replicas curves, DP as a dashed line), and the joint fit's log residuals.

A report is written again over the files an earlier report wrote; a file of those names that a
report did not write (a user's own report.md in the runs folder) is refused and left as it is
(:func:`check_outputs`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .._compat import pyplot
from .analyze import Analysis, fit_records, gap_trend, loss_table, percent_vs_dp
from .records import Record

__all__ = [
    "write_report",
    "check_outputs",
    "REPORT_FILES",
    "plot_loss_vs_n",
    "plot_loss_vs_m",
    "plot_residuals",
    "qualitative_findings",
]

#: what a report writes into its folder (``lowcomm scaling fit`` writes fits.json alone)
REPORT_FILES = ("report.md", "fits.json", "loss_vs_N.png", "loss_vs_M.png", "residuals.png")
_FITS_KEYS = ("per_curve", "joint", "hparams", "skipped")
_REPORT_LINE = "## Final eval loss (best run per cell"


def _written_by_a_report(path: Path) -> bool:
    """Whether ``path`` (one of REPORT_FILES) holds what a report writes there: its table's heading,
    the fits' keys, or a PNG that matplotlib made."""
    try:
        if path.suffix == ".png":
            with open(path, "rb") as f:
                head = f.read(4096)
            return head.startswith(b"\x89PNG") and b"Matplotlib" in head
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    if path.name == "report.md":
        return _REPORT_LINE in text
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    return isinstance(obj, dict) and all(k in obj for k in _FITS_KEYS)


def check_outputs(out: str | Path, names: tuple[str, ...] = REPORT_FILES) -> None:
    """Refuse (ValueError naming the files) an ``out`` holding any of ``names`` that a report or a
    fit did not write: writing there would replace a user's file. Nothing is written."""
    foreign = [n for n in names if (Path(out) / n).exists() and not _written_by_a_report(Path(out) / n)]
    if foreign:
        raise ValueError(
            f"out={str(out)!r} holds {', '.join(foreign)} not written by a lowcomm report, which this one "
            "would replace: give another --out"
        )


def _plt():
    return pyplot("plotting a scaling report")


def _finish(fig, ax, path: Path, xlabel: str, title: str, legend: dict) -> None:
    """Labels, grid, legend and a PNG: the part every plot shares."""
    plt = _plt()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ax.get_ylabel() or "final eval loss (nats/token)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # (an empty plot: matplotlib warns of an empty legend)
        ax.legend(**legend)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _color(key: str, keys: list[str]):
    plt = _plt()
    return "black" if key == "dp" else plt.cm.viridis(keys.index(key) / max(len(keys) - 1, 1))


def plot_loss_vs_n(records: list[Record], analysis: Analysis, path: Path) -> None:
    plt = _plt()
    sizes, keys, best = loss_table(records)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    grid = np.geomspace(min(sizes), max(sizes), 50)
    for k in keys:
        pts = sorted((n, best[(k, n)].loss) for n in sizes if (k, n) in best)
        c = _color(k, keys)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color=c, label=k)
        f = analysis.per_curve.get(k)
        if f is not None:
            ax.plot(
                grid,
                f.predict(grid),
                "--" if k == "dp" else "-",
                color=c,
                lw=1,
                label=f"  fit: {f.params['A']:.3g}·N^{f.params['alpha']:.3f}",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
    _finish(
        fig,
        ax,
        path,
        "non-embedding parameters N",
        "Loss vs model size, per replica count",
        {"fontsize": 7, "ncol": 2},
    )


def plot_loss_vs_m(records: list[Record], analysis: Analysis, path: Path) -> None:
    plt = _plt()
    sizes, keys, best = loss_table(records)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for i, n in enumerate(sizes):
        c = plt.cm.plasma(i / max(len(sizes) - 1, 1))
        pts = _diloco_by_m(keys, best, n)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=c, label=f"N={n:,}")
        if ("dp", n) in best:
            ax.axhline(best[("dp", n)].loss, color=c, ls="--", lw=0.8)
        joint = analysis.joint.get("joint")
        if joint is not None and pts:
            ms = np.array([p[0] for p in pts], float)
            ax.plot(ms, joint.predict(np.full_like(ms, n), ms), ":", color=c, lw=1)
    ax.set_xscale("log", base=2)
    _finish(
        fig,
        ax,
        path,
        "replicas M",
        "DiLoCo's loss vs replicas (dashed: DP at the same N; dotted: joint fit)",
        {"fontsize": 7},
    )


def plot_residuals(records: list[Record], analysis: Analysis, path: Path) -> None:
    plt = _plt()
    sizes, keys, best = loss_table(records)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for form, marker in (("joint", "o"), ("joint_irreducible", "s"), ("exp_irreducible", "^")):
        f = analysis.joint.get(form)
        if f is None:
            continue
        rs = [r for r in best.values() if r.method == "diloco"]
        res = [np.log(r.loss) - np.log(float(f.predict([r.N], [r.M])[0])) for r in rs]
        ax.plot([r.N for r in rs], res, marker, ls="none", alpha=0.7, label=form)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_ylabel("log L − log L̂")
    _finish(
        fig,
        ax,
        path,
        "non-embedding parameters N",
        "Residuals of the joint fits (DiLoCo runs)",
        {"fontsize": 8},
    )


def _diloco_by_m(keys: list[str], best: dict, n: int) -> list[tuple[int, float]]:
    """(M, loss) of the study's DiLoCo (not a variant's) at size ``n``, by M."""
    cells = [best[(k, n)] for k in keys if (k, n) in best]
    return sorted((r.M, r.loss) for r in cells if r.method == "diloco")


def qualitative_findings(records: list[Record]) -> list[tuple[str, bool | None, str]]:
    """The scaling-law study's qualitative findings, checked on these records' DiLoCo (one fragment,
    fp32 rounds; a variant's runs are not the study's): (claim, holds?, evidence)."""
    sizes, keys, best = loss_table(records)
    out = []
    pairs = [
        (n, best[("diloco M=1", n)].loss, best[("dp", n)].loss)
        for n in sizes
        if ("diloco M=1", n) in best and ("dp", n) in best
    ]
    if pairs:
        ok = all(a <= b for _, a, b in pairs)
        out.append(
            (
                "DiLoCo M=1 at or below DP at every N",
                ok,
                "; ".join(f"N={n:,}: {a:.4f} vs {b:.4f}" for n, a, b in pairs),
            )
        )
    else:
        out.append(("DiLoCo M=1 at or below DP at every N", None, "needs M=1 and DP runs at the same N"))
    rising = []
    for n in sizes:
        pts = _diloco_by_m(keys, best, n)
        if len(pts) >= 2:
            rising.append((n, all(b[1] >= a[1] for a, b in zip(pts, pts[1:])), pts))
    if rising:
        out.append(
            (
                "loss rises with M at fixed N",
                all(r for _, r, _ in rising),
                "; ".join(f"N={n:,}: " + ", ".join(f"M={m}:{l:.4f}" for m, l in pts) for n, _, pts in rising),
            )
        )
    trend = gap_trend(records)
    gt = {k: v for k, v in trend.items() if k.startswith("diloco M=") and k != "diloco M=1"}
    if gt:
        out.append(
            (
                "the gap to DP shrinks as N grows (M > 1)",
                all(v < 0 for v in gt.values()),
                "; ".join(f"{k}: {v:+.2f} %-points per e-fold of N" for k, v in sorted(gt.items())),
            )
        )
    else:
        out.append(
            ("the gap to DP shrinks as N grows (M > 1)", None, "needs DP and M > 1 at two sizes or more")
        )
    return out


def _fmt_interval(res, name: str) -> str:
    iv = res.intervals.get(name)
    return f"{res.params[name]:.4g} [{iv[0]:.4g}, {iv[1]:.4g}]" if iv else f"{res.params[name]:.4g}"


def write_report(
    records: list[Record],
    out_dir: str | Path,
    *,
    analysis: Analysis | None = None,
    rejected: list[tuple[str, str]] = (),
    title: str = "Scaling report",
    notes: str = "",
    n_boot: int = 200,
    progress: bool = False,
) -> Path:
    """Write report.md, fits.json and the plots into ``out_dir``; returns the report's path
    (``progress``: a bar of the fits, when ``analysis`` is not given)."""
    if not records:
        raise ValueError("no usable records to report on")
    _plt()  # a missing matplotlib is named now, not after the fits' bootstrap, and nothing is written
    out = Path(out_dir)
    check_outputs(out)
    analysis = analysis or fit_records(records, n_boot=n_boot, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fits.json").write_text(json.dumps(analysis.to_dict(), indent=2) + "\n")
    plot_loss_vs_n(records, analysis, out / "loss_vs_N.png")
    plot_loss_vs_m(records, analysis, out / "loss_vs_M.png")
    if analysis.joint:
        plot_residuals(records, analysis, out / "residuals.png")
    else:  # no joint fit, no residuals: an earlier report's plot (check_outputs vouched) would mislead
        (out / "residuals.png").unlink(missing_ok=True)
    sizes, keys, best = loss_table(records)
    pct = percent_vs_dp(records)
    lines = [f"# {title}", ""]
    if notes:
        lines += [notes, ""]
    lines += [f"{len(records)} runs, {len(sizes)} model sizes, curves: {', '.join(keys)}.", ""]
    if rejected:
        lines += ["Left out:", ""] + [f"- `{p}`: {why}" for p, why in rejected] + [""]
    lines += [
        "## Final eval loss (best run per cell; % vs DP in parentheses)",
        "",
        "| N (non-embedding) | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for n in sizes:
        cells = []
        for k in keys:
            r = best.get((k, n))
            cells.append(
                ""
                if r is None
                else f"{r.loss:.4f}" + (f" ({pct[(k, n)]:+.2f}%)" if (k, n) in pct and k != "dp" else "")
            )
        lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "![loss vs N](loss_vs_N.png)",
        "",
        "![loss vs M](loss_vs_M.png)",
        "",
        "## Fitted laws",
        "",
    ]
    rows = []
    for k, f in analysis.per_curve.items():
        rows.append(
            f"| L = A·N^α | {k} | A={_fmt_interval(f, 'A')}, α={_fmt_interval(f, 'alpha')} | {f.n_points} | "
            f"{f.rmse_log:.4f} | {'' if f.heldout_residual is None else f'{f.heldout_residual:.4f}'} |"
        )
    names = {
        "joint": "L = A·N^α·M^β",
        "joint_irreducible": "L = A·N^α·M^β + C",
        "exp_irreducible": "L = A·N^(α+β·M) + C",
    }
    for form, f in analysis.joint.items():
        params = ", ".join(f"{p}={_fmt_interval(f, p)}" for p in f.params)
        rows.append(
            f"| {names[form]} | {f.label} | {params} | {f.n_points} | {f.rmse_log:.4f} | "
            f"{'' if f.heldout_residual is None else f'{f.heldout_residual:.4f}'} |"
        )
    for h, d in analysis.hparams.items():
        for k, f in d.items():
            rows.append(
                f"| best {h} = A·N^α | {k} | A={_fmt_interval(f, 'A')}, α={_fmt_interval(f, 'alpha')} | "
                f"{f.n_points} | {f.rmse_log:.4f} | |"
            )
    if rows:
        lines += [
            "95% bootstrap intervals in brackets; held-out = mean |log y − log ŷ| at the largest N when "
            "fitted without it. The joint laws are fitted to DiLoCo's runs (one fragment, fp32 rounds), not "
            "to a variant's (Streaming DiLoCo, a quantizing codec), which has curves of its own.",
            "",
            "| law | curve | parameters | points | RMSE(log) | held-out |",
            "|---|---|---|---|---|---|",
        ] + rows
    else:
        lines.append("No law was fitted.")
    if analysis.skipped:
        lines += ["", "Not fitted:", ""] + [f"- {w}: {why}" for w, why in analysis.skipped]
    if analysis.joint:
        lines += ["", "![residuals](residuals.png)"]
    lines += [
        "",
        "## The scaling-law study's qualitative findings at this scale",
        "",
    ]
    for claim, holds, evidence in qualitative_findings(records):
        verdict = {True: "holds", False: "does not hold", None: "not testable"}[holds]
        lines.append(f"- **{claim}**: {verdict}. {evidence}")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
