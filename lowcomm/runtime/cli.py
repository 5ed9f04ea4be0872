"""The ``lowcomm`` command line.

    lowcomm train [--config FILE] [--replicas 4 --sync-every 50 --fragments 4 --codec e3m0 ...]
    lowcomm demo  [--steps 400] [--out runs/demo]

Every ``TrainConfig`` field is a flag (``model_dim`` -> ``--model-dim``); flags override the config
file, which overrides the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
from pathlib import Path

from .._version import __version__
from .config import TrainConfig, load_config_file

__all__ = ["main", "build_parser", "config_from_args", "demo_configs", "format_comparison"]


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        doc = f"(default: {f.default!r})"
        if hint is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=doc)
        elif hint in (int, float, str):
            p.add_argument(flag, dest=f.name, type=hint, default=None, help=doc)
        else:  # optional str
            p.add_argument(flag, dest=f.name, type=str, default=None, help=doc)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lowcomm", description="Low-communication distributed training for PyTorch."
    )
    p.add_argument("--version", action="version", version=f"lowcomm {__version__}")
    p.add_argument("--log-level", default="WARNING", help="logging level (default: WARNING)")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train replicas of the reference model (DiLoCo, Streaming DiLoCo or DP)")
    t.add_argument("--config", help="TOML or JSON file with the same keys as the flags")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_flags(t)

    la = sub.add_parser(
        "launch",
        help="start a multi-process job on this machine (loopback), like torchrun --standalone",
        description="Runs REPLICAS x PROCS_PER_REPLICA copies of COMMAND with RANK, WORLD_SIZE, LOCAL_RANK, "
        "MASTER_ADDR=127.0.0.1, MASTER_PORT and LOWCOMM_PROCS_PER_REPLICA set. Example: "
        "lowcomm launch --replicas 4 -- lowcomm train --steps 200",
    )
    la.add_argument("--replicas", type=int, required=True)
    la.add_argument("--procs-per-replica", type=int, default=1)
    la.add_argument("--port", type=int, default=None, help="rendezvous port (default: a free one)")
    la.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")

    d = sub.add_parser("demo", help="DP vs DiLoCo vs Streaming DiLoCo on the reference model, side by side")
    d.add_argument("--steps", type=int, default=400, help="inner steps per run (default: 400)")
    d.add_argument("--replicas", type=int, default=4, help="replicas (default: 4)")
    d.add_argument("--out", default="runs/demo", help="parent folder of the three run directories")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    data = load_config_file(args.config) if getattr(args, "config", None) else {}
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            data[f.name] = v
    return TrainConfig.from_dict(data)


def demo_configs(steps: int = 400, replicas: int = 4, out: str = "runs/demo") -> dict[str, TrainConfig]:
    """The three runs of ``lowcomm demo``: equal tokens, a model small enough for 2 CPU cores."""
    base = TrainConfig(
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
        threads=2,
    )
    return {
        "dp": base.replace(mode="dp", run_dir=f"{out}/dp"),
        "diloco": base.replace(mode="diloco", fragments=1, overlap=0, codec="fp32", run_dir=f"{out}/diloco"),
        "streaming": base.replace(
            mode="diloco", fragments=4, overlap=1, codec="e3m0", alpha=0.5, run_dir=f"{out}/streaming"
        ),
    }


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"


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
                _fmt_bytes(s["bytes_sent_per_replica"]),
                red,
                f"{s['wall_seconds']:.1f}s",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from .trainer import train

    try:
        if args.command == "train":
            cfg = config_from_args(args)
            s = train(cfg, progress=not args.quiet)
            if int(os.environ.get("RANK", "0")) == 0:
                print(format_comparison({cfg.mode: s}))
                print(f"records in {Path(cfg.run_dir).resolve()}")
        elif args.command == "launch":
            from .launch import launch

            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            return launch(cmd, args.replicas, args.procs_per_replica, port=args.port)
        elif args.command == "demo":
            cfgs = demo_configs(args.steps, args.replicas, args.out)
            summaries = {}
            for name, cfg in cfgs.items():
                print(f"[{name}] {cfg.run_dir}", file=sys.stderr, flush=True)
                summaries[name] = train(cfg, progress=not args.quiet)
            print(
                f"\nlowcomm demo: M={args.replicas} replicas, {args.steps} steps each, equal tokens, "
                f"{summaries['dp']['params']:,} parameters\n"
            )
            print(format_comparison(summaries))
            print(f"\nrecords in {Path(args.out).resolve()}/{{dp,diloco,streaming}}")
    except (ValueError, FileNotFoundError) as e:
        print(f"lowcomm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
