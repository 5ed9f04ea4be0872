"""``lowcomm chaos --static``: a launched (static) job under a fault plan, beside a fault-free one.

    lowcomm chaos --static --plan plan.toml --replicas 2 --max-restarts 3 --out runs/chaos -- \\
        --steps 400 --checkpoint-every 20

Both runs are ``lowcomm launch --replicas M -- lowcomm train FLAGS --resume auto`` with the same
flags and seeds, in ``--out``'s ``reference/`` and ``chaos/``; the chaos run gets the plan
($LOWCOMM_FAULTS: kill, preempt, hang, delay, checkpoint-fail, aimed at ranks) and
``--max-restarts``. Each process writes to ``logs/attempt<N>/rank<R>.log`` of its run, and its
launcher to ``launcher.log``, with every process's lines copied in behind its rank. A static job
survives a fault by starting again, whole, from the newest checkpoint every process holds, and
resumes bit for bit, so the report holds
it to the strictest test there is: the job under faults must end on the fault-free run's global
parameters (their sha256) and loss. ``report.json`` has the faults injected (each: id, kind, rank,
step), the restarts (each: the attempt, the step it resumed from, the step the job had reached, the
steps redone), ``finished``, ``bit_identical``, ``data_lost`` (0 when the chaos run finished on the
reference's bits, else 1), both final losses and both walls; ``report.md`` and ``loss.png`` (both
eval-loss curves, each fault marked at its step; without matplotlib the report says so).

Nothing of an earlier run is replaced: an ``--out`` whose ``reference/`` or ``chaos/`` holds files
is refused in one line (``--resume auto`` would continue from its checkpoints).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..._checks import is_int, is_number, refuse
from ..errors import ExitCode
from ..files import read_jsonl
from ..forkserver import check_procs, check_start
from .plan import ENDING_KINDS, FaultPlan
from .report import check_out, eval_curve, plot, why_no_plot

__all__ = ["run_static_chaos"]

log = logging.getLogger(__name__)

#: flags the runner sets itself in both runs
_OWN_FLAGS = ("--run-dir", "--resume", "--overwrite", "--coordinator")


def run_static_chaos(
    plan: FaultPlan,
    replicas: int,
    out: str | Path,
    flags: list[str],
    max_restarts: int = 3,
    procs_per_replica: int = 1,
    timeout: float = 1800.0,
    start: str = "exec",
) -> dict:
    """Run the fault-free and the faulted job one after the other; write and return the report.
    ``start``: how the launcher starts the processes, restarts included (``lowcomm launch
    --start``: "exec" or "forkserver").

    Raises:
        ValueError: a bad count or timeout, a flag the runner sets itself, a plan a static job
            cannot serve, an ``out`` holding an earlier run (one line each, before any process).
    """
    from ..cli import train_config_from_flags

    check_procs(replicas, procs_per_replica)
    if not is_int(max_restarts, 0):
        raise refuse("max_restarts", max_restarts, "an int >= 0")
    if not (is_number(timeout) and timeout > 0):
        raise refuse("timeout", timeout, "a finite number of seconds > 0")
    check_start(start)
    own = [f for f in flags if f.split("=")[0] in _OWN_FLAGS]
    if own:
        raise ValueError(
            f"lowcomm chaos --static sets {list(_OWN_FLAGS)} itself; remove {own} from the flags"
        )
    cfg = train_config_from_flags(flags)  # a bad flag: argparse's usage line
    world = replicas * procs_per_replica
    plan = plan.check_static(world, procs_per_replica, cfg.run.steps)
    out = Path(out)
    check_out(out)
    if not cfg.elastic.checkpoint_every and any(f.kind in ENDING_KINDS for f in plan.faults):
        log.warning("no --checkpoint-every: a job restarted after a kill or preempt starts again from step 0")
    no_plot = why_no_plot()
    if no_plot:
        log.warning("%s; the report will be written without loss.png", no_plot)
    base = [sys.executable, "-m", "lowcomm", "launch", "--replicas", str(replicas)]
    base += ["--procs-per-replica", str(procs_per_replica), "--start", start]
    train = ["--", sys.executable, "-m", "lowcomm", "train", *flags, "--resume", "auto", "--quiet"]
    t0 = time.time()
    ref_code = _launch([*base, *train, "--run-dir", str(out / "reference")], out / "reference", {}, timeout)
    ref_wall, t1 = time.time() - t0, time.time()
    env = {"LOWCOMM_FAULTS": json.dumps(plan.to_dict())}
    cmd = [*base, "--max-restarts", str(max_restarts), *train, "--run-dir", str(out / "chaos")]
    chaos_code = _launch(cmd, out / "chaos", env, timeout)
    chaos_wall = time.time() - t1
    report = _report(out, plan, replicas, procs_per_replica, flags, max_restarts, ref_code, chaos_code)
    report.update(
        reference_wall_s=ref_wall, chaos_wall_s=chaos_wall, loss_plot=None if no_plot else "loss.png"
    )
    if no_plot:
        report["loss_plot_missing"] = no_plot
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if not no_plot:
        plot(
            out / "loss.png",
            {"fault-free": eval_curve(out / "reference"), "under faults": eval_curve(out / "chaos")},
            [(f["step"], f["kind"]) for f in report["faults"] if f.get("step") is not None],
            f"static job: {len(report['faults'])} faults, {len(report['restarts'])} restart(s), "
            f"bit-identical: {report['bit_identical']}",
        )
    _markdown(out / "report.md", report)
    return report


def _launch(cmd: list[str], run_dir: Path, env: dict, timeout: float) -> int:
    """One launched job to its end (its launcher's output in run_dir/launcher.log, its processes'
    in run_dir/logs/attempt<N>/rank<R>.log, copied into launcher.log too); past ``timeout`` it is
    terminated (the launcher stops its processes) and its code is returned."""
    run_dir.mkdir(parents=True, exist_ok=True)
    at = cmd.index("--")
    cmd = [*cmd[:at], "--log-dir", str(run_dir / "logs"), "--tee", *cmd[at:]]
    with open(run_dir / "launcher.log", "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, **env})
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.error("the job in %s ran past %.0f s: stopping it", run_dir, timeout)
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait()


def _faults(run_dir: Path) -> list[dict]:
    """The faults every process injected (faults[-rank<R>].jsonl), in the order they fired."""
    out = []
    for path in sorted(run_dir.glob("faults*.jsonl")):
        rank = path.stem.partition("-rank")[2] or "0"
        for e in read_jsonl(path):
            out.append({"id": e.get("id"), "kind": e.get("fault"), "rank": int(rank), "step": e.get("step"),
                        "wall": e.get("wall")})  # fmt: skip
    return sorted(out, key=lambda f: f["wall"] or 0)


def _restarts(events: list[dict], faults: list[dict]) -> list[dict]:
    """Each restart (the trainer's "restart" event): the step it resumed from, the furthest step
    the job had shown before it (rank 0's records, every rank's faults) and the steps redone."""
    out = []
    shown = [
        (e["wall"], e["step"]) for e in events if isinstance(e.get("step"), int) and e["kind"] != "restart"
    ]
    shown += [(f["wall"], f["step"]) for f in faults if isinstance(f.get("step"), int) and f.get("wall")]
    for e in (e for e in events if e["kind"] == "restart"):
        reached = max((s for w, s in shown if w < e["wall"]), default=e["step"])
        out.append({"attempt": e["attempt"], "resumed_at": e["step"], "reached": reached,
                    "steps_redone": max(reached - e["step"], 0)})  # fmt: skip
    return out


def _summary(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _report(out: Path, plan, replicas, procs_per_replica, flags, max_restarts, ref_code, chaos_code) -> dict:
    ref, chaos = _summary(out / "reference"), _summary(out / "chaos")
    faults = _faults(out / "chaos")
    events = read_jsonl(out / "chaos" / "events.jsonl") if (out / "chaos" / "events.jsonl").exists() else []
    restarts = _restarts(events, faults)
    finished = chaos_code == ExitCode.OK and chaos is not None
    same = finished and ref is not None and chaos["global_params_sha256"] == ref["global_params_sha256"]
    ref_loss = ref["final_eval_loss"] if ref else None
    chaos_loss = chaos["final_eval_loss"] if chaos else None
    return {
        "static": True,
        "replicas": replicas,
        "procs_per_replica": procs_per_replica,
        "max_restarts": max_restarts,
        "flags": flags,
        "plan": plan.to_dict(),
        "faults": [{k: v for k, v in f.items() if k != "wall"} for f in faults],
        "faults_injected": len(faults),
        "faults_planned": len(plan.faults),
        "restarts": restarts,
        "steps_redone": sum(r["steps_redone"] for r in restarts),
        "reference_exit_code": ref_code,
        "chaos_exit_code": chaos_code,
        "finished": finished,
        "bit_identical": same,
        "data_lost": 0 if same else 1,
        "reference_final_loss": ref_loss,
        "chaos_final_loss": chaos_loss,
        "final_loss_delta": chaos_loss - ref_loss
        if ref_loss is not None and chaos_loss is not None
        else None,
    }


def _markdown(path: Path, r: dict) -> None:
    def s(v):
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    verdict = (
        "ended on the fault-free run's global parameters, bit for bit"
        if r["bit_identical"]
        else ("finished on other global parameters than the fault-free run"
              if r["finished"] else f"did not finish (launcher exit code {r['chaos_exit_code']})")
    )  # fmt: skip
    lines = [
        "# Static job under faults: survival report",
        "",
        f"{r['replicas']} replica(s) x {r['procs_per_replica']} process(es), up to {r['max_restarts']} "
        f"restart(s); {r['faults_injected']} of {r['faults_planned']} planned faults injected, "
        f"{len(r['restarts'])} restart(s), {r['steps_redone']} step(s) redone. The job under faults "
        f"{verdict}: **data lost: {r['data_lost']}**. Final eval loss {s(r['chaos_final_loss'])} vs "
        f"{s(r['reference_final_loss'])} fault-free; wall {s(r['chaos_wall_s'])} s vs "
        f"{s(r['reference_wall_s'])} s.",
        "",
        "| # | kind | rank | step |",
        "|---|------|------|------|",
        *(f"| {f['id']} | {f['kind']} | {f['rank']} | {s(f['step'])} |" for f in r["faults"]),
        "",
        "| restart | resumed at step | job had reached | steps redone |",
        "|---------|-----------------|-----------------|--------------|",
        *(
            f"| {x['attempt']} | {x['resumed_at']} | {x['reached']} | {x['steps_redone']} |"
            for x in r["restarts"]
        ),
        "",
    ]
    if r.get("loss_plot"):
        lines += [f"![loss curves]({r['loss_plot']})", ""]
    else:
        lines += [f"No loss plot: {r.get('loss_plot_missing', 'not drawn')}.", ""]
    path.write_text("\n".join(lines))
