"""The ``lowcomm`` command line.

    lowcomm train [--config FILE] [--replicas 4 --sync-every 50 --fragments 4 --codec e3m0 ...]
    lowcomm demo  [--steps 400] [--out runs/demo]

Every ``TrainConfig`` field is a flag (``model_dim`` -> ``--model-dim``); flags override the config
file, which overrides the defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import typing
from pathlib import Path

from .._checks import env_int, one_line, refuse
from .._compat import MissingExtra
from .._version import __version__
from .errors import ConfigurationRejected, CoordinatorError, ExitCode, JobFinished, KeyRejected, Stopped
from .files import check_folder
from .forkserver import START_METHODS
from .trainer.records import human_bytes

if typing.TYPE_CHECKING:
    from .trainer.config import TrainConfig

# The configuration's flags are made from its classes, whose modules load torch (two seconds a
# process): they are imported where a command needs them, so the commands that train nothing
# (launch, which only starts the processes that do; status; keys) start without torch.

__all__ = [
    "main",
    "build_parser",
    "config_from_args",
    "demo_configs",
    "demo_plot",
    "format_comparison",
    "train_config_from_flags",
    "worker_config_from_flags",
]


def _field_docs(cls: type) -> dict[str, str]:
    """Each field's line from a dataclass docstring's ``Attributes:`` section (continuations joined)."""
    docs: dict[str, str] = {}
    text = (cls.__doc__ or "").split("Attributes:", 1)[-1]
    current = None
    for line in text.splitlines():
        stripped = line.strip()
        head, sep, rest = stripped.partition(": ")
        names = [n.strip() for n in head.split(",")]
        if (
            sep
            and all(n.isidentifier() for n in names)
            and line.startswith(" " * 8)
            and not line.startswith(" " * 9)
        ):
            for n in names:
                docs[n] = rest
            current = names
        elif stripped and current:
            for n in current:
                docs[n] += " " + stripped
    return docs


def _choices() -> dict[str, tuple]:
    """The allowed values of the flags that have a fixed set."""
    from ..comm import CODECS
    from ..comm.reduce import REDUCE_METHODS
    from ..kernels.linear import FAST_ACCUM_MODES, PRECISIONS
    from ..optim.config import INITS
    from ..optim.schedule import PATTERNS
    from .trainer.config import DTYPES, MODES, REPLICA_BATCHING
    from .trainer.metrics import METRICS

    return {
        "mode": MODES,
        "precision": PRECISIONS,
        "fast_accum": FAST_ACCUM_MODES,
        "codec": tuple(CODECS),
        "pattern": PATTERNS,
        "reduce": REDUCE_METHODS,
        "dtype": DTYPES,
        "replica_batching": REPLICA_BATCHING,
        "metrics": METRICS,
        "init": INITS,
    }


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per configuration field (``model_dim`` -> ``--model-dim``), with its documented
    meaning, choices and default."""
    from .trainer.config import FLAT, SECTIONS, TrainConfig

    choices, defaults = _choices(), TrainConfig()
    for sec, cls in SECTIONS.items():
        docs, hints = _field_docs(cls), typing.get_type_hints(cls)
        group = p.add_argument_group(f"[{sec}]", (cls.__doc__ or "").strip().splitlines()[0])
        for f in dataclasses.fields(cls):
            name = next(n for n, where in FLAT.items() if where == (sec, f.name))
            flag = "--" + name.replace("_", "-")
            default = getattr(getattr(defaults, sec), f.name)
            helptext = f"{docs.get(f.name, '')} (default: {default!r})".strip()
            kinds = typing.get_args(hints[f.name]) or (hints[f.name],)
            if bool in kinds:
                group.add_argument(
                    flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=helptext
                )
                continue
            kind = int if int in kinds else float if float in kinds else str
            group.add_argument(
                flag, dest=name, type=kind, default=None, choices=choices.get(name), help=helptext
            )


def build_parser(train_flags: bool = True) -> argparse.ArgumentParser:
    """Every command's parser; ``train_flags=False`` leaves ``train``'s configuration flags out
    (they load torch), for a command line that runs another command."""
    p = argparse.ArgumentParser(
        prog="lowcomm", description="Low-communication distributed training for PyTorch."
    )
    p.add_argument("--version", action="version", version=f"lowcomm {__version__}")
    levels = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
    p.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=levels,
        help="logging level (default: WARNING)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train replicas of the reference model (DiLoCo, Streaming DiLoCo or DP)")
    t.add_argument("--config", help="TOML or JSON file with the same keys as the flags")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    if train_flags:
        _add_config_flags(t)

    la = sub.add_parser(
        "launch",
        help="start a multi-process job on this machine (loopback), like torchrun --standalone",
        description="Runs REPLICAS x PROCS_PER_REPLICA copies of COMMAND with RANK, WORLD_SIZE, LOCAL_RANK, "
        "MASTER_ADDR=127.0.0.1, MASTER_PORT and LOWCOMM_PROCS_PER_REPLICA set, and OMP_NUM_THREADS (the "
        "machine's cores divided among the processes) unless it is set. Example: "
        "lowcomm launch --replicas 4 -- lowcomm train --steps 200",
    )
    la.add_argument("--replicas", type=int, required=True, help="replicas M (processes: M x k)")
    la.add_argument(
        "--procs-per-replica", type=int, default=1, help="processes per replica k (inner DDP; default 1)"
    )
    la.add_argument("--port", type=int, default=None, help="rendezvous port (default: a free one)")
    la.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="start a failed job again, all of it, up to N times, as torchrun does (default 0); with "
        "lowcomm train --checkpoint-every K --resume auto it continues from its checkpoints",
    )
    la.add_argument(
        "--start",
        choices=START_METHODS,
        default="exec",
        help="exec: each process a new one of COMMAND (default); forkserver: each a fork of a server "
        "that imported torch once (COMMAND this interpreter's Python: python SCRIPT, python -m MODULE, "
        "lowcomm train): seconds of imports a process fewer (tested on CPU only)",
    )
    la.add_argument(
        "--preload",
        action="append",
        default=[],
        metavar="MODULE",
        help="--start forkserver: a module the server imports too (e.g. lightning.pytorch); repeatable",
    )
    la.add_argument(
        "--log-dir",
        default=None,
        metavar="DIR",
        help="each process's output (stdout and stderr) to DIR/attempt<N>/rank<R>.log instead of this "
        "terminal; a failed rank's last lines are shown (default: the terminal, as torchrun)",
    )
    la.add_argument(
        "--tee",
        action="store_true",
        help="with --log-dir: each line of the logs to this terminal too, behind its rank ([rank 1]: ...)",
    )
    la.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")

    sc = sub.add_parser("scaling", help="scaling-law sweeps, fits and reports")
    ssub = sc.add_subparsers(dest="scaling_command", required=True)
    sw = ssub.add_parser("sweep", help="run a grid of reference-model runs with a DP baseline (resumable)")
    sw.add_argument(
        "--sizes", required=True, help="comma list of presets (d32l2, d64l4, ...) or counts (100k)"
    )
    sw.add_argument("--replicas", default="1,2,4,8", help="comma list of M (default 1,2,4,8)")
    sw.add_argument(
        "--baseline",
        default="dp",
        choices=["dp", "none"],
        help="also train each size with DP (dp) or not (none)",
    )
    sw.add_argument("--sync-every", default="30", help="comma list of H (default 30)")
    sw.add_argument("--outer-lr", default="0.7", help="comma list of outer learning rates")
    sw.add_argument("--lr", default="0.002", help="comma list of inner learning rates")
    sw.add_argument(
        "--tokens-per-param", type=float, default=20.0, help="training tokens per parameter (default 20)"
    )
    sw.add_argument(
        "--global-batch", type=int, default=32, help="sequences per step, split over replicas (default 32)"
    )
    sw.add_argument(
        "--keep-per-replica-batch",
        action="store_true",
        help="every replica gets the global batch (tokens then grow with M)",
    )
    sw.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    sw.add_argument(
        "--corpus",
        default="stdlib",
        help="stdlib (the embedded default), a directory of text files or a .bin token file",
    )
    sw.add_argument("--seed", type=int, default=0, help="seed of every run (default 0)")
    sw.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    sw.add_argument("--out", required=True, help="sweep folder (rerun to resume: finished runs are kept)")
    sw.add_argument("--quiet", action="store_true", help="no progress bars")
    for name, helptext in (
        ("fit", "fit scaling laws to run records; writes fits.json"),
        ("report", "write report.md, fits.json and plots"),
    ):
        f = ssub.add_parser(name, help=helptext)
        f.add_argument("runs", nargs="+", help="run directories, sweep folders or summary.json files")
        f.add_argument("--out", default=None, help="output folder (default: the first RUNS folder)")
        f.add_argument("--bootstrap", type=int, default=200, help="resamples, 0-10000 (default 200)")
        f.add_argument("--title", default="Scaling report", help="title of the report and plots")
        f.add_argument("--quiet", action="store_true", help="no progress bar of the fits")

    co = sub.add_parser("coordinator", help="serve a job's membership (ZeroMQ, HMAC-signed msgpack)")
    co.add_argument(
        "--bind",
        default="tcp://0.0.0.0:29400",
        help="tcp://host:port to serve on (default tcp://0.0.0.0:29400)",
    )
    co.add_argument(
        "--job", default="lowcomm", help="job name, printable without spaces; workers must name the same"
    )
    co.add_argument(
        "--key",
        default=None,
        help="job key as @file (a hex key here shows in the process list); default $LOWCOMM_KEY_FILE "
        "or $LOWCOMM_KEY",
    )
    co.add_argument(
        "--deadline-floor", type=float, default=2.0, help="min seconds of silence before a worker is dead"
    )
    co.add_argument("--deadline-ceiling", type=float, default=30.0, help="max seconds of silence")
    co.add_argument("--min-workers", type=int, default=1, help="the first round waits for this many workers")
    co.add_argument(
        "--grace",
        type=float,
        default=0.0,
        help="seconds after start with no quorum while workers re-register (~3 for a restarted coordinator)",
    )
    co.add_argument(
        "--round-deadline-floor", type=float, default=10.0, help="min seconds a round waits for stragglers"
    )
    co.add_argument("--round-deadline-ceiling", type=float, default=120.0, help="max seconds a round waits")
    co.add_argument(
        "--store-host", default=None, help="address workers use for the TCPStore (default: bind host)"
    )
    co.add_argument(
        "--max-senders",
        type=int,
        default=100_000,
        help="distinct senders remembered within the replay window; new ones past it are refused "
        "(default 100000)",
    )
    st = sub.add_parser("status", help="members, epoch and round of a job")
    st.add_argument("endpoint", help="tcp://host:port of the coordinator")
    st.add_argument(
        "--key",
        default=None,
        help="job key as @file (a hex key here shows in the process list); default $LOWCOMM_KEY_FILE "
        "or $LOWCOMM_KEY",
    )
    st.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each reply (default 5)")
    st.add_argument(
        "--json",
        action="store_true",
        help="one JSON object instead of the table (job, epoch, round, finished, members), for scripts",
    )
    sub.add_parser("keys", help="print a new job key (hex): export LOWCOMM_KEY=...")

    ch = sub.add_parser(
        "chaos",
        help="run a local elastic job under a fault plan beside a fault-free one; write a survival report",
        description="Example: lowcomm chaos --plan plan.toml --replicas 4 --out runs/chaos -- --steps 400",
    )
    ch.add_argument("--plan", default=None, help="fault plan (.toml or .json)")
    ch.add_argument("--fault", action="append", default=[], help="a fault as key=value,... (repeatable)")
    ch.add_argument("--seed", type=int, default=0, help="seed of --fault faults")
    ch.add_argument("--replicas", type=int, default=4, help="workers of each run (default 4)")
    ch.add_argument(
        "--out",
        default="runs/chaos",
        help="folder of both runs, the report and its plot (default runs/chaos)",
    )
    ch.add_argument("--timeout", type=float, default=1800.0, help="seconds each of the two runs may take")
    ch.add_argument("--quiet", action="store_true", help="no progress bars")
    ch.add_argument(
        "--static",
        action="store_true",
        help="a static job instead (lowcomm launch, restarted whole from its checkpoints): give "
        "--checkpoint-every in the train flags; the report holds it to the fault-free run's bits",
    )
    ch.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        help="--static: times the launcher restarts the job (default 3)",
    )
    ch.add_argument(
        "--procs-per-replica", type=int, default=1, help="--static: processes per replica (default 1)"
    )
    ch.add_argument(
        "--start",
        choices=START_METHODS,
        default="exec",
        help="how the processes start, restarts included: exec, each a new one (default); forkserver, "
        "each forked from a server that imported torch once (as lowcomm launch --start forkserver)",
    )
    ch.add_argument("train_flags", nargs=argparse.REMAINDER, help="-- lowcomm train flags of every worker")

    d = sub.add_parser("demo", help="DP vs DiLoCo vs Streaming DiLoCo on the reference model, side by side")
    d.add_argument("--steps", type=int, default=400, help="inner steps per run (default: 400)")
    d.add_argument("--replicas", type=int, default=4, help="replicas (default: 4)")
    d.add_argument(
        "--out",
        default="runs/demo",
        help="parent folder of the three run directories and loss.png (a demo's are replaced on each run; "
        "a folder holding other runs is refused)",
    )
    d.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads per run (default: 2, one per core of a small machine)",
    )
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    # after the command too (`lowcomm train ... --log-level INFO`, as users write it): set there, it
    # wins; not set, the one before the command stands
    for command in (*sub.choices.values(), *ssub.choices.values()):
        command.add_argument(
            "--log-level", default=argparse.SUPPRESS, type=str.upper, choices=levels, help="logging level"
        )
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The configuration file's values (if any), overridden by the flags given."""
    from .trainer.config import FLAT, TrainConfig, load_config_file

    given = TrainConfig.flat_from_dict(load_config_file(args.config)) if getattr(args, "config", None) else {}
    flags = {name: getattr(args, name) for name in FLAT if getattr(args, name, None) is not None}
    return TrainConfig.from_flat(**{**given, **flags})  # checked as a whole: the flags may make it valid


def train_config_from_flags(flags: list[str]) -> TrainConfig:
    """The configuration ``lowcomm train FLAGS`` would run: ValueError names a bad value, and
    argparse ends the process with its usage line on an unknown flag or one of the wrong type, as
    ``lowcomm train`` would."""
    return config_from_args(build_parser().parse_args(["train", *flags]))


def worker_config_from_flags(flags: list[str]) -> TrainConfig:
    """The configuration an elastic worker started as ``lowcomm train --coordinator ... FLAGS``
    would run (a stand-in coordinator), refused as :func:`train_config_from_flags` refuses."""
    return train_config_from_flags([*flags, "--coordinator", "tcp://127.0.0.1:1"])


def demo_configs(
    steps: int = 400, replicas: int = 4, out: str = "runs/demo", threads: int = 2
) -> dict[str, TrainConfig]:
    """The three runs of ``lowcomm demo``: equal tokens, a model small enough for 2 CPU cores."""
    from .trainer.config import TrainConfig

    base = TrainConfig.from_flat(
        replicas=replicas,
        steps=steps,
        model_dim=64,
        layers=4,
        heads=4,
        seq_len=64,
        batch_size=8,
        lr=2e-3,
        warmup=min(40, steps // 4),
        sync_every=50,
        eval_every=0,
        eval_batches=16,
        threads=threads,
        overwrite=True,  # the demo's own folders, replaced on every run (documented in its --help)
    )
    return {
        "dp": base.replace(mode="dp", run_dir=f"{out}/dp"),
        "diloco": base.replace(mode="diloco", fragments=1, overlap=0, codec="fp32", run_dir=f"{out}/diloco"),
        "streaming": base.replace(
            mode="diloco", fragments=4, overlap=1, codec="e3m0", alpha=0.5, run_dir=f"{out}/streaming"
        ),
    }


def _table(rows: list[tuple[str, ...]], rule: bool = False) -> list[str]:
    """Left-aligned columns two spaces apart; ``rule`` underlines the header row."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def format_comparison(summaries: dict[str, dict]) -> str:
    """A plain-text table of runs: eval loss, loss vs DP, wire bytes, reduction vs DP, wall time."""
    dp = summaries.get("dp")
    rows = [("run", "setting", "eval loss", "vs DP", "sent/replica", "less than DP", "wall")]
    for name, s in summaries.items():
        setting = (
            "fp32 grads every step"
            if s["mode"] == "dp"
            else (f"H={s['sync_every']} P={s['fragments']} tau={s['overlap']} {s['codec']}")
        )
        vs = f"{100 * (s['final_eval_loss'] / dp['final_eval_loss'] - 1):+.2f}%" if dp else "-"
        red = (
            f"{dp['bytes_sent_per_replica'] / s['bytes_sent_per_replica']:.0f}x"
            if dp and s["bytes_sent_per_replica"]
            else "-"
        )
        rows.append(
            (
                name,
                setting,
                f"{s['final_eval_loss']:.4f}",
                vs,
                human_bytes(s["bytes_sent_per_replica"]),
                red,
                f"{s['wall_seconds']:.1f}s",
            )
        )
    return "\n".join(_table(rows, rule=True))


def _control_plane(args: argparse.Namespace) -> int:
    from .elastic.protocol import load_key, new_key

    if args.command == "keys":
        print(new_key())
        return 0
    if args.key and not args.key.startswith("@"):
        logging.getLogger("lowcomm").warning(
            "--key puts the job key in the process list where other users can read it; "
            "prefer --key @FILE or LOWCOMM_KEY_FILE"
        )
    # the command's own modules first: a missing extra (pyzmq) is named before a missing key
    if args.command == "coordinator":
        from .elastic import Coordinator, Deadline, RoundDeadline
    else:
        from .elastic import CoordinatorClient
    if args.command == "status" and not 0 < args.timeout < math.inf:
        raise refuse("timeout", args.timeout, "a finite number of seconds > 0")
    key = load_key(args.key)
    if args.command == "coordinator":
        coord = Coordinator(
            args.bind,
            args.job,
            key,
            Deadline(args.deadline_floor, args.deadline_ceiling),
            store_host=args.store_host,
            min_workers=args.min_workers,
            grace=args.grace,
            round_deadline=RoundDeadline(args.round_deadline_floor, args.round_deadline_ceiling),
            max_senders=args.max_senders,
        )
        print(f"coordinator of job {args.job!r} on {coord.endpoint}", flush=True)
        try:
            coord.serve()
        except KeyboardInterrupt:
            pass
        return 0
    client = CoordinatorClient(args.endpoint, key, sender=f"status-{os.getpid()}", timeout_s=args.timeout)
    members: list[dict] = []
    try:  # the members come in pages that each fit a message
        while True:
            r = client.request("status", {"offset": len(members)}).body
            members += r["members"]
            if not r["members"] or len(members) >= r["total"]:
                break
    except (CoordinatorError, KeyRejected) as e:
        print(f"lowcomm: error: {e}", file=sys.stderr)
        return ExitCode.USAGE if isinstance(e, KeyRejected) else ExitCode.FAILED
    finally:
        client.close()
    if args.json:  # (round -1: none completed yet; finished null: a coordinator that does not say)
        fields = ("job", "epoch", "round")
        print(json.dumps({**{k: r[k] for k in fields}, "finished": r.get("finished"), "members": members}))
        return 0
    # (round -1: none completed yet)
    rnd = f"round {r['round']}" if r["round"] >= 0 else "no round yet"
    done = ", finished (its workers reached the last step and left)" if r.get("finished") else ""
    print(f"job {r['job']}: epoch {r['epoch']}, {rnd}, {len(members)} member(s){done}")
    rows = [("rank", "worker", "address", "step", "round", "synced", "last heartbeat")]
    rows += [
        (
            str(m["rank"]),
            m["worker_id"],
            m["addr"],
            str(m["step"]),
            str(m["round"]) if m["round"] >= 0 else "-",
            "yes" if m.get("synced", True) else "no",
            f"{m['last_seen_s']:.1f}s ago",
        )
        for m in members
    ]
    print("\n".join(_table(rows)))
    return 0


def _csv(text: str, kind=float) -> tuple:
    try:
        return tuple(kind(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of {kind.__name__} values") from None


def _scaling(args: argparse.Namespace) -> int:
    from ..scaling import SweepSpec, fit_records, load_records, run_sweep, write_report
    from ..scaling.report import REPORT_FILES, check_outputs
    from .files import check_folder

    if args.scaling_command == "sweep":
        check_folder("out", args.out)
        spec = SweepSpec(
            sizes=_csv(args.sizes, str),
            replicas=_csv(args.replicas, int),
            baseline=None if args.baseline == "none" else "dp",
            sync_every=_csv(args.sync_every, int),
            outer_lrs=_csv(args.outer_lr),
            lrs=_csv(args.lr),
            tokens_per_param=args.tokens_per_param,
            global_batch=args.global_batch,
            keep_per_replica_batch=args.keep_per_replica_batch,
            seq_len=args.seq_len,
            corpus=args.corpus,
            seed=args.seed,
            threads=args.threads,
            out=args.out,
        )
        res = run_sweep(spec, progress=not args.quiet)
        print(
            f"sweep {args.out}: {res['runs']} runs, {res['done']} run now, {res['skipped']} already done, "
            f"{len(res['failed'])} failed, {res['wall_seconds']:.0f}s"
        )
        for name, err in res["failed"]:
            print(f"  failed: {name}: {err}")
        return 1 if res["failed"] else 0
    if not 0 <= args.bootstrap <= MAX_BOOTSTRAP:  # 1e20 ran for ever, with no sign of progress
        raise ValueError(
            f"bootstrap={args.bootstrap} is not allowed: an int in [0, {MAX_BOOTSTRAP}] (0: no intervals)"
        )
    out = Path(args.out or (args.runs[0] if Path(args.runs[0]).is_dir() else Path(args.runs[0]).parent))
    check_folder("out", out)
    check_outputs(out, ("fits.json",) if args.scaling_command == "fit" else REPORT_FILES)
    records, rejected = load_records(args.runs)
    for path, why in rejected:
        print(f"left out {path}: {why}", file=sys.stderr)
    if not records:
        raise ValueError(f"no usable summary.json records under {args.runs}")
    if args.scaling_command == "fit":
        analysis = fit_records(records, n_boot=args.bootstrap, progress=not args.quiet)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fits.json").write_text(json.dumps(analysis.to_dict(), indent=2) + "\n")
        print(_format_fits(analysis))
        print(f"fits in {(out / 'fits.json').resolve()}")
    else:
        path = write_report(
            records, out, rejected=rejected, title=args.title, n_boot=args.bootstrap, progress=not args.quiet
        )
        print(f"report in {path.resolve()}")
    return 0


def _format_fits(analysis) -> str:
    rows = [("law", "curve", "parameters", "points", "held-out |log err|")]
    for k, f in analysis.per_curve.items():
        rows.append(
            (
                "A·N^α",
                k,
                f"A={f.params['A']:.4g} α={f.params['alpha']:.4f}",
                str(f.n_points),
                "" if f.heldout_residual is None else f"{f.heldout_residual:.4f}",
            )
        )
    for form, f in analysis.joint.items():
        rows.append(
            (
                form,
                f.label,
                " ".join(f"{p}={v:.4g}" for p, v in f.params.items()),
                str(f.n_points),
                "" if f.heldout_residual is None else f"{f.heldout_residual:.4f}",
            )
        )
    for h, d in analysis.hparams.items():
        for k, f in d.items():
            rows.append(
                (f"best {h}", k, f"A={f.params['A']:.4g} α={f.params['alpha']:.4f}", str(f.n_points), "")
            )
    lines = _table(rows)
    for what, why in analysis.skipped:
        lines.append(f"not fitted: {what}: {why}")
    return "\n".join(lines)


#: the [elastic] settings of an elastic worker alone (checkpoint_every and resume serve any run)
_WORKER_ONLY = (
    "worker_id",
    "advertise_addr",
    "transfer_inner_state",
    "heartbeat",
    "coordinator_timeout",
    "max_retries",
)


def _warn_unused_flags(args: argparse.Namespace, cfg: TrainConfig) -> None:
    """--mode dp with DiLoCo's flags (--codec int4, say), or an elastic worker's flags without
    --coordinator (--max-retries 3): the run would not use them, and its config.json would still
    show them (the first rank says so)."""
    from .trainer.config import FLAT

    def given(wanted) -> str:
        names = [n for n, (sec, f) in FLAT.items() if wanted(sec, f) and getattr(args, n, None) is not None]
        return ", ".join("--" + n.replace("_", "-") for n in names)

    if os.environ.get("RANK", "0") != "0":
        return
    diloco = given(lambda sec, f: sec == "diloco")
    if cfg.run.mode == "dp" and diloco:
        logging.getLogger("lowcomm").warning(
            "%s: DiLoCo's settings, not used by --mode dp (a fp32 gradient mean every step)", diloco
        )
    worker = given(lambda sec, f: sec == "elastic" and f in _WORKER_ONLY)
    if not cfg.elastic.enabled and worker:
        logging.getLogger("lowcomm").warning(
            "%s: an elastic worker's settings, not used without --coordinator", worker
        )
    # --replicas counts the replicas one process simulates: a launched job has one a process (or
    # a procs_per_replica group), an elastic worker is one; a given count that differs is not used
    if getattr(args, "replicas", None) is not None:
        if cfg.elastic.enabled:
            where = "an elastic worker is one replica of its job"
        elif os.environ.get("WORLD_SIZE"):
            k = cfg.run.job_procs_per_replica()
            world = env_int("WORLD_SIZE")
            job = world // k
            where = None
            if job != cfg.run.replicas:
                where = f"the job has {job} ({world} processes, {k} a replica)"
        else:
            where = None
        if where:
            logging.getLogger("lowcomm").warning("--replicas %d not used: %s", cfg.run.replicas, where)


def _train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if not cfg.elastic.enabled:  # a task of `srun lowcomm train`: a process of the job, as under torchrun
        from ..comm.slurm import adopt_srun_env

        adopt_srun_env()
    _warn_unused_flags(args, cfg)
    with _stop_on_sigterm() as stop:
        return _run_train(cfg, not args.quiet, stop)


def _run_train(cfg: TrainConfig, progress: bool, stop: threading.Event) -> int:
    from ..comm import CollectiveError
    from .trainer import train

    if not cfg.elastic.enabled:
        try:
            s = train(cfg, progress=progress, stop=stop)
        except KeyboardInterrupt:
            _interrupted(cfg)
        except Stopped as e:
            _terminated(cfg, e)
        except (ValueError, FileNotFoundError) as e:
            if not _process_group_alive():
                raise  # main() reports it
            # a refusal under launch/torchrun (say, replicas configured apart): the peers refuse
            # too and tear their groups down at the same time, which can abort a process exiting
            # through the interpreter's shutdown (gloo), so leave at once with the refusal's code
            print(f"lowcomm: error: {e}", file=sys.stderr, flush=True)
            _leave_now(ExitCode.USAGE)
        except CollectiveError as e:  # a peer died, hung or was cut off: one line, not a traceback
            # (the records are closed; a gloo thread may still wait on the peer: leave at once)
            if stop.is_set():  # (after a SIGTERM: its peer had gone, the launcher stopping a failed job)
                _terminated(cfg, e)
            print(f"lowcomm: rank {os.environ.get('RANK', '0')}: {e}", file=sys.stderr, flush=True)
            _leave_now(ExitCode.FAILED)
        if env_int("RANK", 0) == 0:
            print(format_comparison({cfg.run.mode: s}))
            print(f"records in {Path(cfg.run.run_dir).resolve()}")
        if _process_group_alive():  # a finished job: every peer is past its last collective
            import torch.distributed as dist

            dist.destroy_process_group()
            # gloo's threads can still hold work when the interpreter shuts down, which aborts
            # the process now and then ("terminate called without an active exception", seen
            # under load): every record is written and closed, so leave without that shutdown
            _leave_now(ExitCode.OK)
        return ExitCode.OK
    try:
        s = train(cfg, progress=progress, stop=stop)
    except KeyboardInterrupt:
        _interrupted(cfg)
    except Stopped as e:
        _terminated(cfg, e)
    except JobFinished as e:
        print(f"lowcomm: {e}", file=sys.stderr, flush=True)
        _leave_now(ExitCode.JOB_FINISHED)
    except (KeyRejected, ConfigurationRejected, ValueError, FileNotFoundError) as e:  # its own input
        print(f"lowcomm: error: {e}", file=sys.stderr, flush=True)
        return ExitCode.USAGE
    except (CoordinatorError, CollectiveError) as e:  # (a round it failed --max-retries times)
        if stop.is_set():
            _terminated(cfg, e)
        print(f"lowcomm: {e}", file=sys.stderr, flush=True)
        _leave_now(ExitCode.FAILED)
    print(
        f"worker {s['worker_id']}: eval loss {s['final_eval_loss']:.4f}, {s['rounds']} rounds "
        f"({s['rounds_redone']} redone), global params {s['global_params_sha256'][:16]}"
    )
    print(f"records in {Path(cfg.run.run_dir).resolve()}", flush=True)
    # a collective given up on a dead peer leaves a gloo thread behind that would abort the
    # interpreter's shutdown; the records are closed, so leave at once
    _leave_now(ExitCode.OK)


def _interrupted(cfg) -> None:
    """Ctrl-C during training: one line, not a traceback, and the exit code 130. The records written
    so far stay (they are appended as the run goes; an unfinished run has no summary.json)."""
    if env_int("RANK", 0) == 0:
        run_dir = Path(cfg.run.run_dir).resolve()
        again = (
            "; the same command with --resume auto continues from its last checkpoint"
            if any(run_dir.glob("checkpoint*.lcs"))
            else ""
        )
        print(f"\nlowcomm: interrupted; the records so far are in {run_dir}{again}", file=sys.stderr)
    _leave_now(ExitCode.INTERRUPTED)  # (under launch/torchrun a gloo thread may still hold work)


#: how long a SIGTERM'd ``lowcomm train`` waits for the step under way to end (and its checkpoint
#: to be written) before it leaves without them: a collective can wait on a peer that is gone
#: (``lowcomm launch`` gives its processes 30 s after a SIGTERM before it kills them)
STOP_WAIT_S = 20.0


@contextlib.contextmanager
def _stop_on_sigterm(wait_s: float = STOP_WAIT_S):
    """Within it, SIGTERM (a scheduler stopping or preempting the job) sets the event it yields:
    the run stops at the end of its step (:class:`Stopped`). A Python signal handler runs only
    when the main thread is between bytecodes, not while it waits in a collective, so the signal
    is taken by a thread woken through ``signal.set_wakeup_fd``: it sets the event and, if the
    run has not ended ``wait_s`` later, leaves with exit code 143. More SIGTERMs (a scheduler's
    and then a launcher's) change nothing. Outside the main thread (an embedding caller's
    thread) SIGTERM keeps its handling and the event is never set."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    woken, wakeup = socket.socketpair()
    wakeup.setblocking(False)
    ended = threading.Event()

    def watch() -> None:
        while True:
            signals = woken.recv(64)  # (every signal with a Python handler writes its number)
            if not signals:  # the run ended
                return
            if signal.SIGTERM in signals:
                break
        stop.set()
        logging.getLogger("lowcomm").warning("SIGTERM: stopping at the end of the step under way")
        if ended.wait(wait_s):
            return
        print(
            f"lowcomm: terminated (SIGTERM): the step under way did not end within {wait_s:.0f} s; "
            "leaving without a checkpoint",
            file=sys.stderr,
            flush=True,
        )
        _leave_now(ExitCode.TERMINATED)

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)  # (the thread acts on it)
    previous_fd = signal.set_wakeup_fd(wakeup.fileno(), warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, name="lowcomm-sigterm", daemon=True)
    watcher.start()
    try:
        yield stop
    finally:
        ended.set()
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGTERM, previous)
        wakeup.close()
        watcher.join()
        woken.close()


def _terminated(cfg, e: Exception) -> None:
    """A run stopped by SIGTERM (``e`` a :class:`Stopped`, or the error of a collective whose peer
    had gone: a launcher stops the others of a job one of whose processes failed): one line, and
    the exit code 143."""
    rank = env_int("RANK", 0)
    if not isinstance(e, Stopped):
        what = f"a collective failed on the way ({one_line(e, 200)})"
    elif cfg.elastic.enabled:
        what = f"left the job at the end of step {e.step}; the others go on without this worker"
        what += f" (its checkpoint is {e.checkpoint})" if e.checkpoint else ""
    elif e.checkpoint:
        what = f"{e}; the same command with --resume auto continues from it"
    elif cfg.elastic.checkpoint_every:  # (the job's processes did not stop together: e.apart)
        what = f"{e}; no checkpoint of this step: the same command with --resume auto continues from "
        what += "the last step every process of the job checkpointed"
    else:
        run_dir = Path(cfg.run.run_dir).resolve()
        what = f"{e}; the records so far are in {run_dir} (no checkpoint: --checkpoint-every K writes one)"
    if rank == 0 or not isinstance(e, Stopped) or e.apart:  # (rank 0 speaks for a job stopped together)
        who = f" rank {rank}:" if rank else ""
        print(f"lowcomm:{who} terminated (SIGTERM): {what}", file=sys.stderr, flush=True)
    _leave_now(ExitCode.TERMINATED)


def _leave_now(code: int) -> None:
    """Exit with ``code`` after flushing logs and output, skipping the interpreter's shutdown."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _process_group_alive() -> bool:
    """Whether this process is in a torch.distributed job (launch/torchrun) whose group is open."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def _chaos(args: argparse.Namespace) -> int:
    from .faults import FaultPlan
    from .files import check_folder

    check_folder("out", args.out)
    plan = FaultPlan.load(args.plan) if args.plan else FaultPlan(args.seed, [])
    if args.fault:  # flags add to the plan's faults (ids are renumbered)
        faults = [*plan.faults, *FaultPlan.from_flags(args.fault, args.seed).faults]
        entries = [{k: v for k, v in f.to_dict().items() if k != "id"} for f in faults]
        plan = FaultPlan.from_dict({"seed": plan.seed, "faults": entries})
    flags = args.train_flags[1:] if args.train_flags[:1] == ["--"] else args.train_flags
    if args.static:
        from .faults.static_chaos import run_static_chaos

        r = run_static_chaos(
            plan,
            args.replicas,
            args.out,
            flags,
            args.max_restarts,
            args.procs_per_replica,
            args.timeout,
            start=args.start,
        )
        print(
            f"{r['faults_injected']} faults injected, {len(r['restarts'])} restart(s), "
            f"{r['steps_redone']} step(s) redone, bit-identical to the fault-free run: {r['bit_identical']}, "
            f"data lost {r['data_lost']}; report in {Path(args.out).resolve()}/report.md"
        )
        return ExitCode.OK if r["data_lost"] == 0 else ExitCode.FAILED
    from .elastic.protocol import new_key
    from .faults.chaos import run_chaos

    os.environ.setdefault("LOWCOMM_KEY", new_key())
    r = run_chaos(
        plan, args.replicas, args.out, flags, args.timeout, progress=not args.quiet, start=args.start
    )
    print(
        f"{r['faults_injected']} faults injected, data lost {r['data_lost']}, final loss delta "
        f"{r['final_loss_delta']}; report in {Path(args.out).resolve()}/report.md"
    )
    return ExitCode.OK if r["data_lost"] == 0 else ExitCode.FAILED


#: the most bootstrap resamples ``lowcomm scaling fit/report`` take (about 15 ms each, every fit)
MAX_BOOTSTRAP = 10_000

#: the file that marks a folder as ``lowcomm demo``'s, whose runs a later demo replaces
DEMO_MARK = "demo.json"


def check_demo_out(out: Path, cfgs: dict[str, TrainConfig]) -> None:
    """Refuse an ``out`` that holds runs or a plot lowcomm demo did not write: ``--out runs``
    replaced a run of the user's at runs/dp. Its own it replaces: a folder with ``DEMO_MARK``, or
    (an earlier lowcomm wrote no mark) whose runs are the demo's settings in their folders.

    Raises:
        ValueError: naming the folder and what it holds; nothing is replaced.
    """
    check_folder("out", out)
    if (out / DEMO_MARK).is_file():
        return
    held = [n for n in (*cfgs, "loss.png") if (out / n).exists() and not _empty_folder(out / n)]
    runs = [n for n in held if n in cfgs]
    if held and not (runs and all(_a_demo_run(out / n, cfgs[n]) for n in runs)):
        raise refuse(
            "out",
            str(out),
            f"a folder of lowcomm demo's or a new one: it holds {', '.join(held)}, which no demo wrote "
            f"(no {DEMO_MARK}); nothing was replaced",
        )


def _empty_folder(p: Path) -> bool:
    return p.is_dir() and not any(p.iterdir())


#: what tells a demo's run from another: the settings the demo sets, as its config.json has them
_DEMO_KEYS = ("mode", "model_dim", "layers", "heads", "seq_len", "batch_size", "eval_every", "eval_batches")


def _a_demo_run(folder: Path, cfg: TrainConfig) -> bool:
    """Whether ``folder`` holds a run of the demo's settings for it (an earlier lowcomm's demo)."""
    try:
        saved = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    want = cfg.flat()
    keys = (*_DEMO_KEYS, "fragments", "overlap", "codec") if cfg.run.mode == "diloco" else _DEMO_KEYS
    return isinstance(saved, dict) and all(saved.get(k) == want[k] for k in keys)


def _demo(args: argparse.Namespace) -> int:
    from .trainer import train

    cfgs = demo_configs(args.steps, args.replicas, args.out, args.threads)
    out = Path(args.out)
    check_demo_out(out, cfgs)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARK).write_text(json.dumps({"written_by": "lowcomm demo", "runs": list(cfgs)}) + "\n")
    summaries = {}
    for name, cfg in cfgs.items():
        print(f"[{name}] {cfg.run.run_dir}", file=sys.stderr, flush=True)
        summaries[name] = train(cfg, progress=not args.quiet)
    print(
        f"\nlowcomm demo: M={args.replicas} replicas, {args.steps} steps each, equal tokens, "
        f"{summaries['dp']['params']:,} parameters\n"
    )
    print(format_comparison(summaries))
    print(f"\nrecords in {Path(args.out).resolve()}/{{dp,diloco,streaming}}")
    try:
        plot = demo_plot(Path(args.out) / "loss.png", {n: c.run.run_dir for n, c in cfgs.items()}, summaries)
        print(f"plot in {plot.resolve()}")
    except MissingExtra as e:  # the table above is the result; the plot is for looking at it
        print(f"no plot: {e}")
    return ExitCode.OK


def demo_plot(path: Path, run_dirs: dict[str, str], summaries: dict[str, dict]) -> Path:
    """The demo's runs side by side: training loss (mean of the replicas, over 20 steps) and the
    bytes each replica has sent, by inner step. Raises MissingExtra without matplotlib."""
    from .._compat import pyplot
    from .trainer.records import timeline

    plt = pyplot("the demo's plot")
    fig, (loss_ax, sent_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, run_dir in run_dirs.items():
        steps = [e for e in timeline(run_dir) if e["kind"] == "step"]
        x, loss = [e["step"] for e in steps], [e["loss"] for e in steps]
        window = [
            sum(loss[max(0, i - 19) : i + 1]) / len(loss[max(0, i - 19) : i + 1]) for i in range(len(loss))
        ]
        s = summaries[name]
        loss_ax.plot(x, window, label=f"{name}: eval {s['final_eval_loss']:.3f}")
        sent = [(e["step"], e["bytes_sent"]) for e in steps if e["bytes_sent"] > 0]
        sent_ax.plot(
            [p[0] for p in sent],
            [p[1] for p in sent],
            label=f"{name}: {human_bytes(s['bytes_sent_per_replica'])}",
        )
    loss_ax.set(xlabel="inner step", ylabel="training loss (replicas' mean, 20-step average)")
    sent_ax.set(xlabel="inner step", ylabel="bytes sent per replica", yscale="log")
    for ax in (loss_ax, sent_ax):
        ax.legend()
        ax.grid(alpha=0.3)
    first = next(iter(summaries.values()))
    fig.suptitle(f"lowcomm demo: M={first['replicas']} replicas, equal tokens ({first['tokens']:,})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


#: the commands: the first of these words on a command line is the one it runs, and only ``train``
#: (or a line that names none, as ``lowcomm --help``) needs the configuration's flags
COMMANDS = ("train", "launch", "scaling", "coordinator", "status", "keys", "chaos", "demo")


class _Terminated(KeyboardInterrupt):
    """SIGTERM to a command with no stop of its own (demo, chaos, scaling, coordinator), raised as
    Ctrl-C's KeyboardInterrupt is, so that the same clean-up runs (a chaos run's coordinator and
    workers stopped, a run's records closed) instead of the process ending where it stood."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


#: the commands whose SIGTERM is taken as an interrupt (train and launch stop in their own way)
TERM_AS_INTERRUPT = ("scaling", "coordinator", "chaos", "demo")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(train_flags=command in ("train", None)).parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    previous = None
    if args.command in TERM_AS_INTERRUPT and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _main(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace) -> int:
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "launch":
            from .trainer.launch import launch

            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            return launch(
                cmd,
                args.replicas,
                args.procs_per_replica,
                port=args.port,
                max_restarts=args.max_restarts,
                start=args.start,
                preload=args.preload,
                log_dir=args.log_dir,
                tee=args.tee,
            )
        if args.command in ("coordinator", "status", "keys"):
            return _control_plane(args)
        if args.command == "chaos":
            return _chaos(args)
        if args.command == "scaling":
            return _scaling(args)
        return _demo(args)
    # bad input (CorruptStateError is a ValueError), or an optional dependency missing
    except (ValueError, FileNotFoundError, MissingExtra) as e:
        print(f"lowcomm: error: {e}", file=sys.stderr)
        return ExitCode.USAGE
    except KeyboardInterrupt as e:  # Ctrl-C (or SIGTERM) in any other command (demo, chaos, scaling)
        again = ""
        if args.command == "scaling" and args.scaling_command == "sweep":
            again = "; the same command continues the sweep (its finished runs are kept)"
        if isinstance(e, _Terminated):
            print(f"\nlowcomm: terminated (SIGTERM){again}", file=sys.stderr)
            return ExitCode.TERMINATED
        print(f"\nlowcomm: interrupted{again}", file=sys.stderr)
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
