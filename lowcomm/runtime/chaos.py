"""``lowcomm chaos``: a local elastic job under a fault plan, beside a fault-free reference run.

    lowcomm chaos --plan plan.toml --replicas 4 --out runs/chaos -- --steps 400 --sync-every 20

Both runs use the same workers (w0..w{M-1}), configuration and seeds. The runner injects the
coordinator's faults itself (kill, then restart with a grace period) and restarts every worker
killed by a ``kill`` fault with ``restart`` true (it rejoins as a joiner). It writes, in ``--out``:
``report.json`` (a ``faults`` list, top-level ``data_lost`` and ``final_loss_delta``),
``report.md`` and ``loss.png`` (both loss curves, faults marked); the runs are under
``reference/`` and ``chaos/``.

Per fault: when it was injected, when a survivor detected it (a round given up, a contribution
excluded, a member lost) and when the job recovered (the next completed round after it; for a
lasting fault such as a partition or a slow link, the faulted worker's first round after it
ended), rounds redone and contributions excluded. ``data_lost`` counts finished workers whose
global parameters differ from the others' plus workers that never finished: it must be 0.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from .faults import FaultPlan
from .localjob import LocalJob

__all__ = ["run_chaos"]

log = logging.getLogger(__name__)


def _run(
    folder: Path, names: list[str], flags: list[str], plan: FaultPlan | None, timeout: float
) -> LocalJob:
    job = LocalJob(folder, flags, ["--min-workers", str(len(names))])
    try:
        return _drive(job, names, plan, timeout)
    except BaseException:
        job.close()
        raise


def _drive(job: LocalJob, names: list[str], plan: FaultPlan | None, timeout: float) -> LocalJob:
    """Start the job, inject the coordinator's faults, restart killed workers, wait for the end."""
    job.start_coordinator()
    spec = plan.to_dict() if plan is not None else None
    for w in names:
        job.start_worker(w, spec)
    t0 = None  # a coordinator fault's at_time counts from when every worker registered, like a worker's
    coord_faults = sorted(
        (f for f in (plan.faults if plan else []) if f.kind == "coordinator-kill"),
        key=lambda f: f.at_time or 0,
    )
    restartable = {f.id: f for f in (plan.faults if plan else []) if f.kind == "kill" and f.restart}
    job.runner_events = []
    done: dict[str, int] = {}
    end = time.time() + timeout
    while len(done) < len(names) and time.time() < end:
        if t0 is None and coord_faults:
            st = job.status()
            t0 = time.time() if st is not None and len(st["members"]) >= len(names) else None
        for f in list(coord_faults) if t0 is not None else ():
            if time.time() - t0 >= (f.at_time or 0):
                coord_faults.remove(f)
                job.runner_events.append(
                    {
                        "kind": "fault",
                        "wall": time.time(),
                        "id": f.id,
                        "fault": f.kind,
                        "worker": "coordinator",
                    }
                )
                job.coord.kill()
                job.coord.wait(10)
                job.start_coordinator(["--grace", "3"])
                job.runner_events.append({"kind": "recovered", "wall": time.time(), "id": f.id})
        for w in names:
            p = job.workers[w]
            if w in done or p.poll() is None:
                continue
            fired = {e["id"] for e in job.events(w, "fault")}
            if p.returncode == -9 and fired & set(restartable):
                log.warning("chaos: restarting %s after its kill fault", w)
                env = {"LOWCOMM_RESTARTED": "1", "LOWCOMM_FAULTS_DONE": ",".join(map(str, sorted(fired)))}
                job.start_worker(w, spec, env=env)
                for i in fired & set(restartable):
                    restartable.pop(i)
            else:
                done[w] = p.returncode
        time.sleep(0.2)
    job.codes = done
    return job


def _final_loss(job: LocalJob, names: list[str]) -> float | None:
    for w in names:
        try:
            return job.summary(w)["final_eval_loss"]
        except (FileNotFoundError, KeyError):
            continue
    return None


def _curve(job: LocalJob, w: str) -> list[tuple[int, float]]:
    path = job.tmp / "runs" / w / "eval.jsonl"
    if not path.exists():
        return []
    return [
        (e["step"], e["loss"])
        for e in map(json.loads, path.read_text().splitlines())
        if e.get("loss") is not None
    ]


def run_chaos(
    plan: FaultPlan, replicas: int, out: str | Path, flags: list[str], timeout: float = 1800.0
) -> dict:
    """Run the reference and the chaos job; write and return the report."""
    out = Path(out)
    names = [f"w{i}" for i in range(replicas)]
    steps = next((int(flags[i + 1]) for i, f in enumerate(flags[:-1]) if f == "--steps"), 600)
    plan = plan.check(names, steps=steps)  # refuses a bad plan before anything starts
    ref = chaos = None
    try:
        ref = _run(out / "reference", names, flags, None, timeout)
        chaos = _run(out / "chaos", names, flags, plan, timeout)
    finally:  # the coordinators (and any worker past the timeout) do not outlive the runner
        for job in (ref, chaos):
            if job is not None:
                job.close()
    events = {w: chaos.events(w) for w in names if (chaos.tmp / "runs" / w / "events.jsonl").exists()}
    injected = [e for w in events for e in events[w] if e["kind"] == "fault"] + [
        e for e in chaos.runner_events if e["kind"] == "fault"
    ]
    t0 = chaos_t0(chaos, events)
    injected.sort(key=lambda e: e["wall"])
    faults = []
    for i, inj in enumerate(injected):
        # what the job noticed is the latest fault's of that worker: a kill ends a delay's watch
        until = min((e["wall"] for e in injected[i + 1 :] if e["worker"] == inj["worker"]), default=math.inf)
        faults.append(_fault_entry(inj, events, t0, until))
    finished = {w: chaos.summary(w) for w, c in chaos.codes.items() if c == 0}
    digests = [s["global_params_sha256"] for s in finished.values()]
    majority = max(set(digests), key=digests.count) if digests else None
    late = [
        w for w, c in chaos.codes.items() if c == 3
    ]  # restarted after the job's last step: nothing to join
    unfinished = [
        w for w in names if w not in finished and w not in late and not _never_restarted_kill(plan, w)
    ]
    data_lost = sum(d != majority for d in digests) + len(unfinished)
    ref_loss, chaos_loss = _final_loss(ref, names), _final_loss(chaos, list(finished) or names)
    report = {
        "replicas": replicas,
        "flags": flags,
        "plan": plan.to_dict(),
        "faults": faults,
        "faults_injected": len(faults),
        "faults_planned": len(plan.faults),
        "workers_finished": sorted(finished),
        "workers_late": late,
        "data_lost": data_lost,
        "reference_final_loss": ref_loss,
        "chaos_final_loss": chaos_loss,
        "final_loss_delta": (chaos_loss - ref_loss)
        if ref_loss is not None and chaos_loss is not None
        else None,
        "reference_wall_s": max((ref.summary(w)["wall_seconds"] for w in names), default=None),
        "chaos_wall_s": max((s["wall_seconds"] for s in finished.values()), default=None),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(out, ref, chaos, names, report, t0)
    _markdown(out, report)
    return report


# which events show that a fault of each kind was noticed (see _evidence)
_LOST_KINDS = ("kill", "hang", "partition")  # the coordinator declares the worker lost, a round is redone
_RESYNC_KINDS = ("hang", "delay", "partition", "drop-round")  # the worker is left out and resyncs


def _evidence(inj: dict, others: list[dict], own: list[dict]) -> list[dict]:
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


def _fault_entry(inj: dict, events: dict[str, list[dict]], t0: float, until: float) -> dict:
    """One fault of the report: when it was injected, detected (by evidence seen before ``until``,
    when the same worker's next fault was injected) and recovered from, and its cost."""
    t, w = inj["wall"], inj["worker"]
    others = [e for v, evs in events.items() if v != w for e in evs if e["wall"] >= t]
    own = [e for e in events.get(w, []) if e["wall"] >= t]
    evidence = _evidence(inj, [e for e in others if e["wall"] < until], [e for e in own if e["wall"] < until])
    detected = min((e["wall"] for e in evidence), default=None)
    since = t if detected is None else detected  # recovered: the first round completed after detection
    ends = inj.get("ends_at")
    if ends is None:
        pool = others + own
    else:  # a lasting fault (partition, slow link, ...): once its own worker completes a round after it
        pool, since = own, max(since, ends)
    recovered = min((e["wall"] for e in pool if e["kind"] == "round" and e["wall"] >= since), default=None)
    redone = {e["round"] for e in evidence if e["kind"] == "round_redone" and e["wall"] <= (recovered or t)}
    excluded = {  # one entry per round, however many survivors logged it
        e["round"]: {"round": e["round"], "worker": w, "reason": e["contributions"][w]}
        for e in evidence
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


def chaos_t0(job: LocalJob, events: dict) -> float:
    return min((e["wall"] for evs in events.values() for e in evs), default=time.time())


def _never_restarted_kill(plan: FaultPlan, w: str) -> bool:
    return any(f.kind == "kill" and not f.restart and f.target == f"worker:{w}" for f in plan.faults)


def _plot(out: Path, ref: LocalJob, chaos: LocalJob, names: list[str], report: dict, t0: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for job, label, style in ((ref, "fault-free", "-"), (chaos, "under faults", "--")):
        pts = next((c for c in (_curve(job, w) for w in names) if c), [])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    steps = {}
    for w in names:
        for e in chaos.events(w) if (chaos.tmp / "runs" / w / "events.jsonl").exists() else []:
            if e["kind"] == "step":
                steps[e["wall"]] = e["step"]
    walls = sorted(steps)
    for f in report["faults"]:
        t = f["injected_at_s"] + t0
        near = min(walls, key=lambda x: abs(x - t)) if walls else None
        if near is not None:
            ax.axvline(steps[near], color="red", alpha=0.3)
            ax.text(steps[near], ax.get_ylim()[1], f["kind"], rotation=90, va="top", fontsize=7, color="red")
    ax.set_xlabel("inner step")
    ax.set_ylabel("eval loss (global parameters)")
    ax.set_title(f"chaos run: {report['faults_injected']} faults, data lost {report['data_lost']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)


def _markdown(out: Path, r: dict) -> None:
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
    lines += ["", "![loss curves](loss.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
