"""The survival report of ``lowcomm chaos``: per fault, when it was injected, detected and
recovered from, and what it cost; plus a plot of both runs' loss curves and a markdown table.

Detection is judged by the fault's kind, from the events the workers recorded (see
:func:`evidence`); a fault's watch ends when the same worker's next fault is injected.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..._compat import MissingExtra, pyplot
from ..files import timeline

__all__ = ["check_out", "evidence", "fault_entry", "fault_entries", "eval_curve", "plot", "markdown"]


def check_out(out: Path) -> None:
    """Refuse (ValueError, one line) an ``out`` whose ``reference/`` or ``chaos/`` holds files: an
    earlier chaos run's, which a new one would not replace (its workers would be refused their
    run directories, and its report written over the earlier one, every worker's data 'lost')."""
    for run in ("reference", "chaos"):
        if (out / run).is_dir() and any((out / run).iterdir()):
            raise ValueError(
                f"--out {out} holds an earlier run ({run}/): choose another --out or remove it (nothing was "
                "replaced)"
            )


# which events show that a fault of each kind was noticed (see _evidence)
# the coordinator declares the worker lost (or gone: a preempted worker leaves), a round is redone
_LOST_KINDS = ("kill", "preempt", "hang", "partition")
_RESYNC_KINDS = ("hang", "delay", "partition", "drop-round")  # the worker is left out and resyncs


def evidence(inj: dict, others: list[dict], own: list[dict]) -> list[dict]:
    """The events that show the job noticed fault ``inj``, judged by its kind: a survivor learning
    the worker was lost or redoing a round it was part of (kill, hang, partition), naming it
    missing from a round (drop-round, partition), excluding its contribution (corrupt, nan), the
    worker itself being sent to resynchronize (a straggler's delay, ...) or seeing its checkpoint
    write fail, the workers re-registering (coordinator-kill). A slow link costs time only:
    nothing shows it."""
    w, kind = inj["worker"], inj["fault"]
    found = []
    for e in others:
        k, what = e["kind"], e.get("what")
        if kind == "coordinator-kill":
            hit = k == "membership" and what == "re-registered"
        elif k == "membership" and what == "lost":
            hit = kind in _LOST_KINDS and e.get("worker") == w
        elif k == "round_redone":
            hit = w in e.get("suspects", ()) or (kind in _LOST_KINDS and w in e.get("members", ()))
        elif k == "excluded":
            hit = kind in ("corrupt", "nan") and w in e["contributions"]
        else:
            hit = False
        if hit:
            found.append(e)
    for e in own:
        if (kind in _RESYNC_KINDS and e["kind"] == "membership" and e.get("what") == "resync") or (
            kind == "checkpoint-fail" and e["kind"] == "checkpoint" and e.get("what") == "failed"
        ):
            found.append(e)
    return found


def fault_entry(inj: dict, events: dict[str, list[dict]], t0: float, until: float) -> dict:
    """One fault of the report: when it was injected, detected (by evidence seen before ``until``,
    when the same worker's next fault was injected) and recovered from, and its cost."""
    t, w = inj["wall"], inj["worker"]
    others = [e for v, evs in events.items() if v != w for e in evs if e["wall"] >= t]
    own = [e for e in events.get(w, []) if e["wall"] >= t]
    found = evidence(inj, [e for e in others if e["wall"] < until], [e for e in own if e["wall"] < until])
    detected = min((e["wall"] for e in found), default=None)
    since = t if detected is None else detected  # recovered: the first round completed after detection
    ends = inj.get("ends_at")
    if ends is None:
        pool = others + own
    else:  # a lasting fault (partition, slow link, ...): once its own worker completes a round after it
        pool, since = own, max(since, ends)
    recovered = min((e["wall"] for e in pool if e["kind"] == "round" and e["wall"] >= since), default=None)
    redone = {e["round"] for e in found if e["kind"] == "round_redone" and e["wall"] <= (recovered or t)}
    excluded = {  # one entry per round, however many survivors logged it
        e["round"]: {"round": e["round"], "worker": w, "reason": e["contributions"][w]}
        for e in found
        if e["kind"] == "excluded" and e["round"] == inj.get("round")
    }
    return {
        "id": inj["id"],
        "kind": inj["fault"],
        "worker": w,
        "injected_at_s": t - t0,
        "lasted_s": ends - t if ends is not None else None,
        "detected_after_s": detected - t if detected is not None else None,
        "recovered_after_s": recovered - t if recovered is not None else None,
        "rounds_redone": len(redone),
        "contributions_excluded": list(excluded.values()),
    }


def fault_entries(injected: list[dict], events: dict[str, list[dict]], t0: float) -> list[dict]:
    """The report's entry of every injected fault (``injected``: the ``fault`` events of the
    workers and of the runner), in injection order."""
    injected = sorted(injected, key=lambda e: e["wall"])
    out = []
    for i, inj in enumerate(injected):
        # what the job noticed is the latest fault's of that worker: a kill ends a delay's watch
        until = min((e["wall"] for e in injected[i + 1 :] if e["worker"] == inj["worker"]), default=math.inf)
        out.append(fault_entry(inj, events, t0, until))
    return out


#: the feature a missing matplotlib is named for
PLOT_FEATURE = "plotting a fault report"


def eval_curve(run_dir: Path) -> list[tuple[int, float]]:
    """A run's (step, eval loss) points as its history stands (none if it has no records): the
    evaluations of steps a resume redid are left out (:func:`~lowcomm.runtime.files.timeline`)."""
    rows = timeline(run_dir) if (run_dir / "events.jsonl").exists() else []
    return [(e["step"], e["loss"]) for e in rows if e["kind"] == "eval" and e.get("loss") is not None]


def why_no_plot() -> str | None:
    """Why loss.png cannot be drawn here (the missing extra, named), or None when it can."""
    try:
        pyplot(PLOT_FEATURE)
    except MissingExtra as e:
        return str(e)
    return None


def plot(
    path: Path,
    curves: dict[str, list[tuple[int, float]]],
    fault_steps: list[tuple[int, str]],
    title: str,
) -> None:
    """Loss curves (label -> (step, eval loss) points) with each fault marked at its step by a
    line in its kind's colour, the kinds in the legend with their counts (a soak's 200 faults
    written as text at the top of the plot were one red smear)."""
    plt = pyplot(PLOT_FEATURE)

    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    for (label, pts), style in zip(curves.items(), ("-", "--", ":")):  # black: no fault's colour
        if pts:
            ax.plot(
                [p[0] for p in pts], [p[1] for p in pts], style, color="black", lw=1.6, label=label, zorder=3
            )
    kinds = sorted({kind for _, kind in fault_steps})
    colors = plt.get_cmap("tab10" if len(kinds) <= 10 else "tab20")
    for i, kind in enumerate(kinds):
        steps = [step for step, k in fault_steps if k == kind]
        for j, step in enumerate(steps):
            ax.axvline(
                step,
                color=colors(i),
                alpha=0.45,
                lw=0.9,
                zorder=1,
                label=f"{kind} ({len(steps)})" if j == 0 else None,
            )
    ax.set_xlabel("inner step")
    ax.set_ylabel("eval loss (global parameters)")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="curves, faults (count)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(path: Path, r: dict) -> None:
    """report.md: the headline numbers and one table row per fault."""

    def s(v):
        return "-" if v is None else f"{v:.2f}"

    lines = [
        "# Chaos run: survival report",
        "",
        f"{r['replicas']} workers; {r['faults_injected']} of {r['faults_planned']} planned faults injected; "
        f"**data lost: {r['data_lost']}**; final eval loss {s(r['chaos_final_loss'])} vs "
        f"{s(r['reference_final_loss'])} fault-free (delta {s(r['final_loss_delta'])}); "
        f"wall {s(r['chaos_wall_s'])} s vs {s(r['reference_wall_s'])} s.",
        "",
        "| # | kind | worker | injected (s) | lasted (s) | detected after (s) | recovered after (s) "
        "| redone | excluded |",
        "|---|------|--------|--------------|------------|--------------------|---------------------"
        "|--------|----------|",
    ]
    for f in r["faults"]:
        lines.append(
            f"| {f['id']} | {f['kind']} | {f['worker']} | {s(f['injected_at_s'])} | {s(f.get('lasted_s'))} "
            f"| {s(f['detected_after_s'])} | "
            f"{s(f['recovered_after_s'])} | {f['rounds_redone']} | {len(f['contributions_excluded'])} |"
        )
    if r.get("loss_plot"):
        lines += ["", f"![loss curves]({r['loss_plot']})", ""]
    else:  # no plot here: the numbers above are the report
        lines += ["", f"No loss plot: {r.get('loss_plot_missing', 'not drawn')}.", ""]
    path.write_text("\n".join(lines))
