"""Training throughput on one GPU: a plain PyTorch loop against ``lowcomm train``. Prints JSON.

    python benchmarks/gpu_throughput.py --json benchmarks/results/gpu_throughput.json
    python benchmarks/gpu_throughput.py --smoke          # tiny shapes on CPU (CI runs this)

For each size, the same model, data and tokens per step:

- ``plain``: one reference GPT with batch M·B, bf16 autocast, fused AdamW, torch.compile (what a
  well-written loop does);
- ``replicas`` and ``replicas_clip``: the M = 4 replicas' own computation without the trainer
  (lowcomm's batched model over parameters stacked along a replica axis, the trainer's
  ReplicaAdamW over the stack; ``replicas_clip`` also clips each replica's gradient norm, as the
  trainer does), on
  the plain loop's fixed batch: what separates them from the plain loop is the cost of simulating
  M replicas (M times the parameters and optimizer state), what separates ``lowcomm train`` from
  them is the trainer's own work;
- ``lowcomm train`` with M = 4 simulated replicas of batch B each (bf16, compiled, replicas
  batched): DP, DiLoCo (H = 50) and Streaming DiLoCo (P = 4, τ = 1, e3m0, α = 0.5). DP's
  replicas share one set of parameters (they hold the same values at every step): its model is
  the plain loop's, with the trainer's clip, records and per-replica losses, so the ``replicas``
  rows bound DiLoCo and Streaming, not DP.

Throughput is measured after warm-up (compilation): the loops without the trainer time their
last ``steps // 2`` steps; a lowcomm run takes its tokens/s between the step records at a
quarter of the run and at its end (the records are written every ``log_every`` steps, when the
losses are read). MFU = 6·N·tokens/s over the device's dense bf16 peak. ``wait_fraction`` is the
share of the steps' time spent waiting for a round's result (the goal for Streaming τ = 1: under 1%);
the end's sync, whose rounds have no step left to hide behind, is reported apart (``finish_s``).
``wait_fraction_steady`` (and the GPU's ``device_wait_fraction_steady``) counts the same waits
after every fragment's first round only (``common.steady_wait_fractions``): the first pays for
first use (buffers, connections, kernels), and a run of 80 steps with H = 50 and P = 4 holds no
other. The two-process run takes twice the steps for that (``--two-process-steps``).

Sizes: ``small`` d=512, 8 layers, T=256, B=16 (16,384 tokens per step over 4 replicas) and
``large`` d=1024, 12 layers, T=1024, B=4 (16,384 tokens per step).

``--update``: the M replicas' update alone at each size (no model, no compilation; first, it
takes seconds): what it was before ReplicaAdamW (the forward's cast of each weight to bf16 and
its gradient's back to fp32, the per-replica clip's scale, fused AdamW) against ReplicaAdamW's
step (bf16 gradients, the clip's coefficient and the weights' bf16 copies in its pass), ms a step
and the bytes each moves by the arithmetic of BENCHMARKS.md (52 against 30 an element of a
weight with a copy).

Each part records ``wall_s``, its seconds with compilation and warm-up: what a bounded slot has
to fit.

``--two-process``: Streaming DiLoCo over two processes (``lowcomm launch --replicas 2``; on one
GPU they share it over gloo) and its wait fraction. ``--loss-check``: the reference model (the
trainer's defaults) trained ``--loss-steps`` steps in fp32 and in bf16 on one device: final eval
losses and their ratio (the goal: within 1%). These two run first (no compilation: they cost less
than one size's), then the sizes; the JSON is written after each part, so a bounded slot that
runs out keeps every part that ran.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    ROUND_FIELDS,
    launch_command,
    profile_top,
    profile_window,
    round_times,
    stamp,
    steady_tokens_per_second,
    steady_wait_fractions,
    window_ms_per_step,
    write_result,
)

from lowcomm.lm import GPT, GPTConfig
from lowcomm.runtime import TrainConfig, train
from lowcomm.runtime.trainer.loop import peak_flops, profile_stem
from lowcomm.runtime.trainer.profiling import StepProfiler

SIZES = {
    "small": dict(model_dim=512, layers=8, heads=8, seq_len=256, batch_size=16),
    "large": dict(model_dim=1024, layers=12, heads=16, seq_len=1024, batch_size=4),
    "smoke": dict(model_dim=32, layers=3, heads=2, seq_len=32, batch_size=2),
}
RUNS = {
    "dp": dict(mode="dp"),
    "diloco": dict(mode="diloco", sync_every=50),
    "streaming": dict(mode="diloco", sync_every=50, fragments=4, overlap=1, codec="e3m0", alpha=0.5),
}
#: the loops without the trainer: the M replicas' computation (see replicas_loop)
LOOPS = ("replicas", "replicas_clip")
REPLICAS = 4


def plain_loop(
    size: dict, steps: int, device: torch.device, compile: bool, profile=None, out: str = ""
) -> dict:
    """One model with the replicas' batches concatenated: tokens/s over the last half of the steps;
    ``profile`` (A, B): steps A+1 to B under the trainer's profiler, its table's top rows kept."""
    cfg = _gpt_config(size)
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt = _adamw(model.parameters(), device)
    run = torch.compile(model) if compile else model
    x, y = _fixed_batch(size, (REPLICAS * size["batch_size"],), device)

    def step():
        with _autocast(device):
            loss = run(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    n = model.num_params()
    return {**_timed(step, size, steps, device, profile, Path(out) / "plain-profile", n), "params": n}


def replicas_loop(
    size: dict, steps: int, device: torch.device, compile: bool, clip: bool, profile=None, out: str = ""
) -> dict:
    """The M replicas' own computation, without the trainer: lowcomm's batched model
    (:func:`~lowcomm.lm.batched.batched_gpt_loss` over parameters stacked along a replica axis),
    the trainer's optimizer over the stack (:class:`~lowcomm.optim.ReplicaAdamW`, with bf16
    copies of the matrices on a GPU) and, with ``clip``, each replica's gradient norm clipped to 1
    as the trainer does (``step(max_norm=1.0)``, applied in the optimizer's pass), on the same
    fixed batch as the plain loop.
    Between the plain loop and this, what simulating M replicas costs (M times the parameters and
    optimizer state, batched matrix multiplies); between this and ``lowcomm train``, the trainer's
    own work (data, records, the sync)."""
    from lowcomm.lm.batched import batched_gpt_loss, linear_weights, stack_parameters
    from lowcomm.optim.replica_adamw import ReplicaAdamW

    cfg = _gpt_config(size)
    torch.manual_seed(0)
    base = GPT(cfg).to(device)
    params = stack_parameters([base] * REPLICAS)  # (M, *shape) leaves, every replica alike
    copies = {n: params[n] for n in linear_weights(cfg)} if device.type == "cuda" else {}  # bf16 there
    opt = ReplicaAdamW(params.values(), lr=1e-3, betas=(0.9, 0.99), eps=1e-8, copies=copies)
    loss_fn = functools.partial(batched_gpt_loss, cfg=cfg)
    run = torch.compile(loss_fn) if compile else loss_fn
    x, y = _fixed_batch(size, (REPLICAS, size["batch_size"]), device)

    def step():
        with _autocast(device):
            losses = run(params, idx=x, targets=y, weights=opt.fresh_copies())
        losses.sum().backward()
        opt.step(max_norm=1.0 if clip else None)  # as the trainer runs it
        opt.zero_grad(set_to_none=True)

    stem = Path(out) / f"replicas{'-clip' if clip else ''}-profile"
    return _timed(step, size, steps, device, profile, stem, base.num_params())


def _adamw(params, device: torch.device) -> torch.optim.AdamW:
    """The plain loop's AdamW, fused on a GPU."""
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99), **fused)


def _gpt_config(size: dict) -> GPTConfig:
    return GPTConfig(
        vocab_size=256,
        seq_len=size["seq_len"],
        n_layer=size["layers"],
        n_head=size["heads"],
        n_embd=size["model_dim"],
    )


def _fixed_batch(size: dict, lead: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Random tokens of shape (*lead, T) on the device, and their next-token targets: the loops
    without the trainer read one batch, already in place, every step."""
    x = torch.randint(0, 256, (*lead, size["seq_len"]), device=device)
    return x, torch.roll(x, -1, -1)


def _autocast(device: torch.device):
    """bf16 autocast on a GPU (as the trainer's default there), none on a CPU (fp32, its default)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _timed(step, size: dict, steps: int, device: torch.device, profile, stem: Path, params: int) -> dict:
    """Run ``step`` ``steps`` times: tokens/s over the last half (the first half warms up and
    compiles); ``profile`` (A, B): steps A+1 to B under the trainer's profiler, its table's top
    rows kept."""
    timed = max(steps // 2, 1)
    prof = StepProfiler(profile[0] + 1, profile[1], stem, device) if profile else None
    for i in range(1, steps - timed + 1):  # warm-up, compilation included
        if prof is not None:
            prof.before(i)
        step()
        if prof is not None:
            prof.after(i)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(timed):
        step()
    _sync(device)
    seconds = time.perf_counter() - t0
    tps = timed * REPLICAS * size["batch_size"] * size["seq_len"] / seconds
    result = {"tokens_per_second": tps, "mfu": _mfu(params, tps, device)}
    if prof is not None and prof.done:
        result["profile"] = profile_top(prof.stem)
    return result


def lowcomm_run(
    size: dict, run: dict, steps: int, device: torch.device, compile: bool, out: str, profile=None
) -> dict:
    cfg = TrainConfig.from_flat(
        **size,
        **run,
        replicas=REPLICAS,
        steps=steps,
        device=device.type,
        compile=compile,
        eval_every=0,
        eval_batches=1,
        warmup=min(10, steps // 4),
        log_every=max(steps // 8, 1),
        run_dir=out,
        profile=f"{profile[0]}:{profile[1]}" if profile else "",
    )
    s = train(cfg, progress=False)
    tps = steady_tokens_per_second(out, s, cfg.run.log_every)
    top = {"profile": profile_top(profile_stem(cfg, profile[0] + 1, profile[1]))} if profile else {}
    return {
        **top,
        "tokens_per_second": tps,
        "tokens_per_second_whole_run": s["tokens_per_second"],
        # [last step, ms a step] of each window between two loss reads: a DiLoCo round's shows
        "window_ms_per_step": window_ms_per_step(out, s, cfg.run.log_every),
        "mfu": _mfu(s["params"], tps, device),
        **_waits(s),
        **steady_wait_fractions(out, s, cfg.run.log_every),
        "comm_free_fraction": s["comm_free_fraction"],
        # the rounds and the loop's host seconds by phase (send, encode, decode, outer step, wait)
        "rounds": s["rounds"],
        "timing": s["timing"],
        "round_fields": list(ROUND_FIELDS),
        "round_times": round_times(out),
        "replica_batching": s["replica_batching"],
        "dtype": s["dtype"],
        "peak_memory_bytes": s["peak_memory_bytes"],
        "final_loss": s["final_eval_loss"],
    }


def two_process(size: dict, steps: int, device: torch.device, out: str) -> dict:
    """Streaming DiLoCo (P=4, τ=1, e3m0) over two processes of ``lowcomm launch``: rank 0's summary."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**size, **RUNS["streaming"]}.items()]
    cmd = launch_command(2, sys.executable, "-m", "lowcomm")
    cmd += [
        "train",
        *flags,
        f"--steps={steps}",
        f"--device={device.type}",
        "--eval-every=0",
        "--eval-batches=1",
    ]
    log_every = max(steps // 8, 1)
    cmd += [f"--run-dir={out}", "--quiet", f"--log-every={log_every}"]
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    if r.returncode:
        return {"error": r.stderr[-2000:]}
    s = json.loads((Path(out) / "summary.json").read_text())
    return {
        "tokens_per_second": s["tokens_per_second"],
        **_waits(s),
        **steady_wait_fractions(out, s, log_every),  # rank 0's records
        "comm_free_fraction": s["comm_free_fraction"],
        "bytes_sent_per_replica": s["bytes_sent_per_replica"],
        "rounds": s["rounds"],
        "timing": s["timing"],
        "round_fields": list(ROUND_FIELDS),
        "round_times": round_times(out),  # rank 0's records
    }


def update_only(size: dict, steps: int, device: torch.device) -> dict:
    """The M replicas' update at ``size``, before and with ReplicaAdamW, on the same gradients (the
    backward's bf16 ones, fixed): ms a step over ``steps`` steps after 3 of warm-up."""
    from lowcomm.lm.batched import linear_weights, stack_parameters

    cfg = _gpt_config(size)
    torch.manual_seed(0)
    base = GPT(cfg).to(device)
    names = linear_weights(cfg)
    times = {}
    for path, make in (("autocast_clip_fused_adamw", _update_before), ("replica_adamw", _update_now)):
        params = stack_parameters([base] * REPLICAS)
        low = {n: (torch.randn_like(params[n]) * 1e-3).bfloat16() for n in names}  # bf16 gradients
        rest = {n: torch.randn_like(p) * 1e-3 for n, p in params.items() if n not in low}
        step = make(params, low, rest, device)
        for _ in range(3):
            step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        times[path] = (time.perf_counter() - t0) / steps * 1e3
        del step, params, low, rest  # one path's tensors at a time on the device
    elements = sum(p.numel() for n, p in base.named_parameters() if n in names) * REPLICAS
    return {
        "ms_per_step": times,
        "weight_elements": elements,
        "bytes_per_step": {"autocast_clip_fused_adamw": 52 * elements, "replica_adamw": 30 * elements},
        "speedup": times["autocast_clip_fused_adamw"] / times["replica_adamw"],
    }


def _update_before(params: dict, low: dict, rest: dict, device: torch.device):
    """The update as the trainer ran it before ReplicaAdamW: autocast's cast of each weight (the
    forward's), its bf16 gradient cast to fp32 (the backward's), the per-replica clip scaling the
    gradients, fused AdamW."""
    from lowcomm.optim.replica_adamw import clip_coefficients

    clip, opt = clip_coefficients, _adamw(params.values(), device)

    def step():
        with torch.no_grad():
            for n in low:
                params[n].to(torch.bfloat16)
        for n, g in low.items():
            params[n].grad = g.float()
        for n, g in rest.items():
            params[n].grad = g.clone()
        grads = [p.grad for p in params.values()]
        coef = clip(grads, 1.0)
        for m in range(REPLICAS):
            torch._foreach_mul_([g[m] for g in grads], coef[m])
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _update_now(params: dict, low: dict, rest: dict, device: torch.device):
    """The trainer's update: the copies' bf16 gradients, the clip's coefficients, ReplicaAdamW."""
    from lowcomm.optim.replica_adamw import ReplicaAdamW

    opt = ReplicaAdamW(
        params.values(), lr=1e-3, betas=(0.9, 0.99), eps=1e-8, copies={n: params[n] for n in low}
    )

    def step():
        for n, c in opt.fresh_copies().items():
            c.grad = low[n]
        for n, g in rest.items():
            params[n].grad = g.clone()
        opt.step(max_norm=1.0)
        opt.zero_grad(set_to_none=True)

    return step


def _waits(s: dict) -> dict:
    """A run's waits for rounds: ``wait_fraction``, the share of the steps' time spent waiting (the
    goal's figure; null for DP), and the end's sync apart (``finish_s``, its wall time, and
    ``wait_fraction_with_end``, every round's wait over the whole loop: what the first two H200
    sessions reported as the wait fraction)."""
    t = s["timing"]
    return {
        "wait_fraction": s["wait_fraction"],
        # the GPU's own: how long its training stream stood still for rounds (two processes)
        "device_wait_fraction": s["device_wait_fraction"],
        "finish_s": t["finish_s"],
        "wait_fraction_with_end": t["wait_s"] / t["loop_s"] if t["loop_s"] else None,
    }


def loss_check(steps: int, device: torch.device, out: str) -> dict:
    """The reference model in fp32 and in bf16 at equal tokens: final eval losses."""
    losses = {}
    for dtype in ("fp32", "bf16"):
        cfg = TrainConfig.from_flat(
            steps=steps, dtype=dtype, device=device.type, eval_every=0, run_dir=f"{out}/{dtype}"
        )
        losses[dtype] = train(cfg, progress=False)["final_eval_loss"]
    return {**losses, "bf16_over_fp32": losses["bf16"] / losses["fp32"]}


def _mfu(params: int, tps: float, device: torch.device) -> float | None:
    peak = peak_flops(device)
    return 6 * params * tps / peak if peak else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="small,large", help="comma list of small, large")
    ap.add_argument(
        "--runs",
        default=",".join(LOOPS + tuple(RUNS)),
        help="comma list of the loops without the trainer (replicas, replicas_clip) and of the "
        "lowcomm train runs (dp, diloco, streaming), each measured against the plain loop",
    )
    ap.add_argument("--steps", type=int, default=120, help="steps per run (a quarter is warm-up)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--two-process", action="store_true", help="also Streaming DiLoCo over two processes")
    ap.add_argument(
        "--two-process-steps",
        type=int,
        default=None,
        help="its steps (default: twice --steps, so that each fragment syncs after its first round)",
    )
    ap.add_argument("--loss-check", action="store_true", help="also fp32 against bf16 on the reference model")
    ap.add_argument("--update", action="store_true", help="also the replicas' update alone, before and now")
    ap.add_argument("--loss-steps", type=int, default=600)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, a few steps, any device (CI)")
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        help="profile this many steps of each run after its compilation, before its timed part, and "
        "keep the top of each table of operators by GPU time (0: none)",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    unknown = [r for r in args.runs.split(",") if r not in LOOPS + tuple(RUNS)]
    if unknown:
        ap.error(f"--runs: unknown run(s) {unknown}; allowed: {list(LOOPS + tuple(RUNS))}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = ["smoke"] if args.smoke else args.sizes.split(",")
    steps = 16 if args.smoke else args.steps
    compile = not args.no_compile and not args.smoke
    two_steps = args.two_process_steps or (steps if args.smoke else 2 * steps)
    result = {**stamp("gpu_throughput"), "steps": steps, "rows": []}
    if device.type != "cuda":
        result["note"] = "no GPU: a smoke run of the code paths on CPU, not a measurement"

    def save(part: str, value) -> None:  # the JSON after every part, so a time-out keeps what ran
        print(json.dumps({part: value}), flush=True)
        write_result(result, args.json, echo=False)

    def walled(fn, *a, **kw) -> dict:
        """``fn``'s result with ``wall_s``: its seconds, compilation and warm-up included (what a
        bounded slot has to fit)."""
        t0 = time.perf_counter()
        r = fn(*a, **kw)
        return {**r, "wall_s": time.perf_counter() - t0}

    with tempfile.TemporaryDirectory() as tmp:
        # the two checks without compilation first: each is a goal, and each costs less than one
        # size's compilations, which a bounded slot may not finish
        if args.two_process:
            result["two_process"] = {
                "size": sizes[0],
                "steps": two_steps,
                **walled(two_process, SIZES[sizes[0]], two_steps, device, f"{tmp}/two"),
            }
            save("two_process", result["two_process"])
        if args.loss_check:
            n = 8 if args.smoke else args.loss_steps
            result["loss_check"] = walled(loss_check, n, device, f"{tmp}/loss")
            save("loss_check", result["loss_check"])
        if args.update:
            n = 4 if args.smoke else 20
            result["update"] = {size: walled(update_only, SIZES[size], n, device) for size in sizes}
            save("update", result["update"])
        window = profile_window(steps, args.profile)
        for size in sizes:
            # each size compiles afresh: after one size's graphs, torch.compile would give the next
            # size's dynamic shapes (it marks the sizes that changed as symbolic), slower kernels
            # and unequally so for the plain model and the batched one
            torch._dynamo.reset()
            plain = walled(plain_loop, SIZES[size], steps, device, compile, window, tmp)
            row = {"size": size, **SIZES[size], "replicas": REPLICAS, "compile": compile, "plain": plain}
            result["rows"].append(row)
            save(size, {"plain": plain})
            for name in args.runs.split(","):
                if name in LOOPS:
                    clip = name.endswith("clip")
                    r = walled(replicas_loop, SIZES[size], steps, device, compile, clip, window, tmp)
                else:
                    out = f"{tmp}/{size}-{name}"
                    r = walled(lowcomm_run, SIZES[size], RUNS[name], steps, device, compile, out, window)
                r["x_plain"] = r["tokens_per_second"] / plain["tokens_per_second"]
                row[name] = r
                save(size, {name: r})
    write_result(result, None)


if __name__ == "__main__":
    main()
