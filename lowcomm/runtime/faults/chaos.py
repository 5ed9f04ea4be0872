"""``lowcomm chaos``: a local elastic job under a fault plan, beside a fault-free reference run.

    lowcomm chaos --plan plan.toml --replicas 4 --out runs/chaos -- --steps 400 --sync-every 20

Both runs use the same workers (w0..w{M-1}), configuration and seeds. The runner injects the
coordinator's faults itself (kill, then restart with a grace period) and restarts every worker
ended by a ``kill`` or ``preempt`` fault with ``restart`` true (it rejoins as a joiner). It writes,
in ``--out``: ``report.json`` (a ``faults`` list, top-level ``data_lost`` and ``final_loss_delta``),
``report.md`` and ``loss.png`` (both loss curves, faults marked; without matplotlib, the
``[scaling]`` extra, the report says so and is written without it, a warning before the runs);
the runs are under ``reference/`` and ``chaos/``.

Per fault: when it was injected, when a survivor detected it (a round given up, a contribution
excluded, a member lost) and when the job recovered (the next completed round after it; for a
lasting fault such as a partition or a slow link, the faulted worker's first round after it
ended), rounds redone and contributions excluded (:mod:`lowcomm.runtime.faults.report`).
``data_lost`` counts finished workers whose global parameters differ from the others' plus
workers that never finished: it must be 0.

Nothing of an earlier run is replaced: an ``--out`` whose ``reference/`` or ``chaos/`` holds files
is refused in one line, as ``--static`` does.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..._checks import is_number, refuse
from ..elastic.localjob import LocalJob
from ..errors import ExitCode
from ..forkserver import check_procs, check_start
from .plan import ENDING_KINDS, FaultPlan
from .report import check_out, eval_curve, fault_entries, markdown, plot, why_no_plot

__all__ = ["run_chaos", "JobRun"]

log = logging.getLogger(__name__)


@dataclass
class JobRun:
    """One local job run to its end: its processes' folder, how each worker exited, and what the
    runner itself did (the coordinator's faults)."""

    job: LocalJob
    names: list[str]
    codes: dict[str, int] = field(default_factory=dict)
    runner_events: list[dict] = field(default_factory=list)
    wall_s: float = 0.0  # from the coordinator's start to the last worker's exit
    faults_read: dict = field(default_factory=dict)  # event log -> (bytes read, faults in them)

    def events(self) -> dict[str, list[dict]]:
        """Each worker's events (workers that never wrote any are left out)."""
        return {w: self.job.events(w) for w in self.names if (self.job.run_dir(w) / "events.jsonl").exists()}

    def finished(self) -> dict[str, dict]:
        """The summaries of the workers that ended with exit code 0."""
        return {w: self.job.summary(w) for w, c in self.codes.items() if c == ExitCode.OK}

    def curve(self) -> list[tuple[int, float]]:
        """The first worker's eval-loss curve (every worker evaluates the same global parameters)."""
        for w in self.names:
            if pts := eval_curve(self.job.run_dir(w)):
                return pts
        return []

    def final_loss(self, names: list[str]) -> float | None:
        for w in names:
            try:
                return self.job.summary(w)["final_eval_loss"]
            except (FileNotFoundError, KeyError):
                continue
        return None


def _run(
    folder: Path,
    names: list[str],
    flags: list[str],
    plan: FaultPlan | None,
    timeout: float,
    observer=None,
    bar=None,
    start: str = "exec",
) -> JobRun:
    """Start the job, inject the coordinator's faults, restart killed workers, wait for the end."""
    job = LocalJob(folder, flags, ["--min-workers", str(len(names))], start=start, workers=len(names))
    run = JobRun(job, names)
    t0 = time.time()
    try:
        _drive(run, plan, timeout, observer, bar)
        run.wall_s = time.time() - t0
        if bar is not None:
            _show(bar, run)
            if run.codes and all(c == ExitCode.OK for c in run.codes.values()):
                bar.n = bar.total  # every worker reached the last step: every round is done
                bar.refresh()
    finally:  # the coordinator (and any worker past the timeout) does not outlive the runner
        job.close()
        if bar is not None:
            bar.close()
    return run


def _bar(name: str, rounds: int):
    """A run's progress bar over its rounds (None: no bar)."""
    if not rounds:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=rounds, desc=name, unit="round", dynamic_ncols=True, leave=True)


def _show(bar, run: JobRun) -> None:
    """The bar at the job's rounds committed, its members and the faults injected so far."""
    st = run.job.status()
    if st is None:  # the coordinator is down (a fault) or busy: next time
        return
    faults = sum(_count_faults(run, run.job.run_dir(w) / "events.jsonl") for w in run.names)
    faults += sum(e["kind"] == "fault" for e in run.runner_events)
    bar.n = min(max(int(st["round"]), 0), bar.total)  # (round -1: none yet; tqdm drew "-1/2000")
    bar.set_postfix(members=len(st["members"]), faults=faults, finished=len(run.codes), refresh=False)
    bar.refresh()


def _count_faults(run: JobRun, path: Path) -> int:
    """Fault events in a worker's event log, reading only what was appended since the last call
    (the log of a long run holds a record per step: the bar must not reparse it every second)."""
    offset, count = run.faults_read.get(path, (0, 0))
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            new = f.read()
    except FileNotFoundError:
        return count
    whole = new[: new.rfind(b"\n") + 1]  # a line being written is counted once it ends
    count += sum(json.loads(line).get("kind") == "fault" for line in whole.splitlines() if b'"fault"' in line)
    run.faults_read[path] = (offset + len(whole), count)
    return count


def _drive(run: JobRun, plan: FaultPlan | None, timeout: float, observer=None, bar=None) -> None:
    job, names = run.job, run.names
    job.start_coordinator()
    spec = plan.to_dict() if plan is not None else None
    for w in names:
        job.start_worker(w, spec)
    faults = plan.faults if plan else []
    t0 = None  # a coordinator fault's at_time counts from when every worker registered, like a worker's
    coord_faults = sorted((f for f in faults if f.kind == "coordinator-kill"), key=lambda f: f.at_time or 0)
    restartable = {f.id: f for f in faults if f.kind in ENDING_KINDS and f.restart}
    end = time.time() + timeout
    shown = 0.0  # when the bar was last brought up to date (once a second: a status request)
    while len(run.codes) < len(names) and time.time() < end:
        if t0 is None and coord_faults:
            st = job.status()
            t0 = time.time() if st is not None and len(st["members"]) >= len(names) else None
        for f in list(coord_faults) if t0 is not None else ():
            if time.time() - t0 >= (f.at_time or 0):
                coord_faults.remove(f)
                run.runner_events.append(
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
                run.runner_events.append({"kind": "recovered", "wall": time.time(), "id": f.id})
        for w in names:
            p = job.workers[w]
            if w in run.codes or p.poll() is None:
                continue
            fired = {e["id"] for e in job.events(w, "fault")}
            if p.returncode in (-9, ExitCode.TERMINATED) and fired & set(restartable):
                log.warning(
                    "chaos: restarting %s after its %s fault", w, "kill" if p.returncode == -9 else "preempt"
                )
                env = {"LOWCOMM_RESTARTED": "1", "LOWCOMM_FAULTS_DONE": ",".join(map(str, sorted(fired)))}
                job.start_worker(w, spec, env=env)
                for i in fired & set(restartable):
                    restartable.pop(i)
            else:
                run.codes[w] = p.returncode
        if observer is not None:
            observer(run)
        if bar is not None and time.time() >= shown + 1.0:
            _show(bar, run)
            shown = time.time()
        time.sleep(0.2)


def run_chaos(
    plan: FaultPlan,
    replicas: int,
    out: str | Path,
    flags: list[str],
    timeout: float = 1800.0,
    observer=None,
    progress: bool = True,
    start: str = "exec",
) -> dict:
    """Run the reference and the chaos job; write and return the report. ``observer(run)`` is
    called about every 0.2 s while the chaos job runs (a probe of your own: benchmarks/soak.py
    sends rogue workers at the job from it). ``progress``: a bar per run (rounds committed,
    members, faults injected). ``start``: how the coordinator and the workers start, "exec" (each
    a new ``python -m lowcomm``) or "forkserver" (forked from a server that imported torch once,
    restarts included: ``lowcomm.runtime.forkserver``)."""
    from ..cli import worker_config_from_flags

    check_procs(replicas)
    if not (is_number(timeout) and timeout > 0):
        raise refuse("timeout", timeout, "a finite number of seconds > 0")
    check_start(start)
    out = Path(out)
    check_out(out)
    names = [f"w{i}" for i in range(replicas)]
    # the workers' flags and the plan are refused before anything starts (a bad flag made every
    # worker exit 2 in both runs, reported as four workers' data lost)
    cfg = worker_config_from_flags(flags)
    steps = cfg.run.steps
    plan = plan.check(names, steps=steps)
    # a fragment's round every sync_every steps (every fragment's, with the final sync)
    fragments = cfg.diloco.fragments if isinstance(cfg.diloco.fragments, int) else len(cfg.diloco.fragments)
    rounds = fragments * (steps // cfg.diloco.sync_every) if progress else 0
    no_plot = why_no_plot()  # said now, not after both runs: the report is written without loss.png
    if no_plot:
        log.warning("%s; the report will be written without loss.png", no_plot)
    ref = _run(out / "reference", names, flags, None, timeout, bar=_bar("fault-free", rounds), start=start)
    chaos = _run(
        out / "chaos", names, flags, plan, timeout, observer, bar=_bar("under faults", rounds), start=start
    )
    events = chaos.events()
    injected = [e for evs in events.values() for e in evs if e["kind"] == "fault"]
    injected += [e for e in chaos.runner_events if e["kind"] == "fault"]
    t0 = min((e["wall"] for evs in events.values() for e in evs), default=time.time())
    faults = fault_entries(injected, events, t0)
    finished = chaos.finished()
    digests = [s["global_params_sha256"] for s in finished.values()]
    majority = max(set(digests), key=digests.count) if digests else None
    # restarted after the job's last step: there was nothing left to join
    late = [w for w, c in chaos.codes.items() if c == ExitCode.JOB_FINISHED]
    never_back = {f.target for f in plan.faults if f.kind in ENDING_KINDS and not f.restart}
    unfinished = [w for w in names if w not in finished and w not in late and f"worker:{w}" not in never_back]
    data_lost = sum(d != majority for d in digests) + len(unfinished)
    ref_loss, chaos_loss = ref.final_loss(names), chaos.final_loss(list(finished) or names)
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
        # the job's wall, not a worker's (a worker restarted late lived a few seconds)
        "reference_wall_s": ref.wall_s,
        "chaos_wall_s": chaos.wall_s,
        "loss_plot": None if no_plot else "loss.png",
        **({"loss_plot_missing": no_plot} if no_plot else {}),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if not no_plot:
        plot(
            out / "loss.png",
            {"fault-free": ref.curve(), "under faults": chaos.curve()},
            _fault_steps(events, faults, t0),
            f"chaos run: {report['faults_injected']} faults, data lost {report['data_lost']}",
        )
    markdown(out / "report.md", report)
    return report


def _fault_steps(events: dict[str, list[dict]], faults: list[dict], t0: float) -> list[tuple[int, str]]:
    """Each fault at the inner step some worker was at when it was injected."""
    steps = {e["wall"]: e["step"] for evs in events.values() for e in evs if e["kind"] == "step"}
    walls = sorted(steps)
    if not walls:
        return []
    return [(steps[min(walls, key=lambda x: abs(x - (f["injected_at_s"] + t0)))], f["kind"]) for f in faults]
