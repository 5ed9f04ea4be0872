"""What the trainer's loop costs the host per step, against a plain PyTorch loop. Prints JSON.

    python benchmarks/host_overhead.py --json benchmarks/results/host_overhead.json

On a GPU every aten operation of an eager step is a kernel launch of a few microseconds: at the
GPU-training issue's small size a compiled plain loop takes about 13 ms a step, so a few hundred
operations more are several percent of it. This counts, with a dispatch mode on the CPU, the
operations of one step of each phase, for a tiny reference GPT (nothing here depends on the
model's width): the plain loop (one model, the replicas' batches concatenated, a foreach gradient
clip and a fused AdamW) against ``lowcomm train`` with M = 4 batched replicas as DP, DiLoCo and
Streaming DiLoCo (between rounds). The optimizers are built as on CUDA: the plain loop's AdamW
fused, the trainer's ReplicaAdamW on its Triton steps (a launch for each matrix and embedding,
one for all the biases and layer norms, as at the small size on a GPU) and the per-replica clip's
sums of squares on theirs (a launch per gradient dtype), each launch counted as one operation and
not run (the kernels need a GPU or the interpreter). It also times the steps on
the CPU with one thread (``ms_per_step``): there the tiny model's arithmetic is small, so the time
is mostly the host's (without Triton's launcher); it is not a GPU figure. ``update_ms_per_step``
is the update's part of it (the clip and the optimizer's step; the plain loop's foreach clip and
fused AdamW).

``compiled`` times the same with ``torch.compile`` (the plain model; the trainer's ``--compile``)
at the small size's depth, 8 layers, and a tiny width (COMPILED_SHAPE): the host's time a step
when the forward and backward are a few compiled graphs, to hold against a GPU's step time (no
counts: a dispatch mode sees a compiled graph's bookkeeping, not its launches).

``layers`` counts the same way what one Linear's forward and backward dispatches under bf16
autocast, as ``nn.Linear`` and in each low-precision recipe on its sm_90 path: the device is
reported as sm_90 and ``torch._scaled_mm`` replaced by a stand-in that makes its output (one
operation, as the real GEMM is one launch); each Triton launch goes through Triton's own launch
path (binding, specialization, the compiled kernel's cache; in a child process whose Triton
compiles each kernel for sm_90 and launches nothing: :func:`triton_without_a_gpu`), counted by
its kernel's name; allocations are left out, so ``ops`` counts launches. ``host_us`` times the
same forward and backward: the host's Python path and Triton's, not the driver's launch call,
not the GPU; on CPU tensors, so without the autotuner (``launch_us`` gives its share of a launch)
and without each launch's switch of the current GPU.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
from common import empty_launches, replacing, stamp, write_result  # noqa: E402

from lowcomm.kernels import triton_adamw  # noqa: E402
from lowcomm.lm.model import GPT, GPTConfig  # noqa: E402
from lowcomm.optim import replica_adamw  # noqa: E402
from lowcomm.optim.replica_adamw import ReplicaAdamW  # noqa: E402
from lowcomm.runtime.cli import train_config_from_flags  # noqa: E402
from lowcomm.runtime.trainer import build as build_module  # noqa: E402
from lowcomm.runtime.trainer.loop import Trainer  # noqa: E402

SHAPE = dict(model_dim=32, layers=2, heads=2, seq_len=16, batch_size=2)
#: the ``compiled`` part's: the GPU-training issue's small size's depth (8 layers), a tiny width
COMPILED_SHAPE = dict(model_dim=16, layers=8, heads=2, seq_len=16, batch_size=1)
REPLICAS = 4
MODES = {
    "dp": ["--mode", "dp"],
    "diloco": ["--mode", "diloco", "--sync-every", "1000"],
    "streaming": ["--mode", "diloco", "--sync-every", "1000", "--fragments", "2", "--overlap", "1"]
    + ["--codec", "e3m0", "--alpha", "0.5"],
}


class _Count(TorchDispatchMode):
    """Counts the operations that launch work: views (a new stride on the same memory) do not."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not getattr(func, "is_view", False) and not str(func).startswith("profiler."):
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


#: the trainer's AdamW launches counted by :func:`_adamw_launch` (not run)
_LAUNCHES = [0]


def _adamw_launch(*args, **kwargs) -> None:
    """Stands in for ``lowcomm.kernels.triton_adamw.adamw_replicas_``: one launch, counted."""
    _LAUNCHES[0] += 1


def _sumsq_launch(tensors: list) -> torch.Tensor:
    """Stands in for ``lowcomm.kernels.triton_adamw.sumsq_replicas``: a launch per gradient dtype,
    counted, and the (M,) sum its partial sums make (one operation, as on the GPU)."""
    _LAUNCHES[0] += len({t.dtype for t in tensors})
    return torch.ones(tensors[0].shape[0])


def _ops(fn) -> int:
    """aten operations other than views that ``fn`` dispatches, and the AdamW launches."""
    c = _Count()
    before = _LAUNCHES[0]
    with c:
        fn()
    return sum(c.ops.values()) + _LAUNCHES[0] - before


class _FusedAdamW(torch.optim.AdamW):
    """AdamW fused as the trainer builds it on CUDA (torch's fused AdamW also runs on CPU)."""

    def __init__(self, *args, **kwargs):
        kwargs["fused"] = True
        super().__init__(*args, **kwargs)


def plain(steps: int, shape: dict = SHAPE, compile: bool = False) -> dict:
    torch.manual_seed(0)
    c = shape
    model = GPT(
        GPTConfig(
            vocab_size=256,
            seq_len=c["seq_len"],
            n_layer=c["layers"],
            n_head=c["heads"],
            n_embd=c["model_dim"],
        )
    )
    opt = _FusedAdamW(model.parameters(), lr=1e-3)
    run = torch.compile(model) if compile else model
    x = torch.randint(0, 256, (REPLICAS * c["batch_size"], c["seq_len"]))
    y = torch.roll(x, -1, 1)

    def forward_backward():
        run(x, y).backward()

    def update():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        forward_backward()
        update()
    phases = None if compile else {"forward_backward": _ops(forward_backward), "update": _ops(update)}
    t0, in_update = time.perf_counter(), 0.0
    for _ in range(steps):
        forward_backward()
        t1 = time.perf_counter()
        update()
        in_update += time.perf_counter() - t1
    ms = (time.perf_counter() - t0) / steps * 1e3
    return {"ops": _total(phases), "ms_per_step": ms, "update_ms_per_step": in_update / steps * 1e3}


def _total(phases: dict | None) -> dict | None:
    """The phases' counts and their total. None when compiled: a dispatch mode sees the compiled
    graphs' own bookkeeping (views and buffers as aten calls), not their launches."""
    return None if phases is None else {**phases, "total": sum(phases.values())}


def lowcomm(mode: str, steps: int, shape: dict = SHAPE, compile: bool = False) -> dict:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in shape.items()] + (["--compile"] if compile else [])
    with tempfile.TemporaryDirectory() as d:
        cfg = train_config_from_flags(
            [*flags, *MODES[mode], "--replicas", str(REPLICAS), "--steps", str(steps + 3)]
            + ["--eval-every", "0", "--replica-batching", "batched", "--run-dir", f"{d}/r"]
        )
        trainer = Trainer(cfg, progress=False)
        trainer._build()
        sync, reps = trainer.sync, trainer.replicas
        sync.start()
        phases = None
        for step in range(3):  # the third step's counts (the first builds optimizer state)
            if compile:  # warm-up (compilation) only: see _total
                reps.forward_backward()
                sync.before_update()
                reps.update()
                sync.after_update(step + 1)
                continue
            phases = {
                "forward_backward": _ops(reps.forward_backward),
                "before_update": _ops(sync.before_update),
                "update": _ops(reps.update),
                "after_update": _ops(lambda s=step: sync.after_update(s + 1)),
            }
        t0, in_update = time.perf_counter(), 0.0
        for step in range(3, 3 + steps):
            reps.forward_backward()
            sync.before_update()
            t1 = time.perf_counter()
            reps.update()
            in_update += time.perf_counter() - t1
            sync.after_update(step + 1)
        ms = (time.perf_counter() - t0) / steps * 1e3
        sync.close(True)
    return {"ops": _total(phases), "ms_per_step": ms, "update_ms_per_step": in_update / steps * 1e3}


LAYER_SHAPE = (32, 128, 128)  # tokens, in-features, out-features: whole 128-blocks of W for mxfp8_fast
LAYER_RECIPES = ("fp8_tensorwise", "fp8_rowwise", "fp8_delayed", "mxfp8", "mxfp8_fast")
#: operations that allocate and launch nothing (the layers' count is of launches)
ALLOCATIONS = {"aten.empty.memory_format", "aten.new_empty.default", "aten.empty_strided.default"}


@contextlib.contextmanager
def triton_without_a_gpu(launched: collections.Counter):
    """Triton's own launch path on a machine without a GPU: its argument binding, specialization
    and cache of compiled kernels, each kernel compiled for sm_90 on its first launch as on an
    H100/H200, each launch counted in ``launched`` (``triton.<kernel>``) and not run: the driver
    Triton asks for the device, stream and target answers for a pretend GPU, and loads each
    kernel as a launcher that only counts (so no CUDA call). Triton is put back after."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime import driver

    # the loader's answer: (module, function, registers, spills) and, from triton 3.3 or so, the
    # threads a block; a module that is not None, or Triton loads the kernel again at every launch
    # (as it does only at the first on a GPU)
    loaded = (object(), None, 0, 0)
    if "n_max_threads" in inspect.getsource(CompiledKernel._init_handles):
        loaded += (1024,)

    class Utils:
        def load_binary(self, name, kernel, shared, device):
            return loaded

        def get_device_properties(self, device):
            return {
                "max_shared_mem": 232448,
                "multiprocessor_count": 132,
                "max_num_regs": 65536,
                "warpSize": 32,
            }

    class Driver:
        utils = Utils()

        def is_active(self):
            return True

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_device_interface(self):
            return torch.cuda

        def launcher_cls(self, src, metadata):
            name = f"triton.{getattr(getattr(src, 'fn', None), '__name__', 'kernel')}"

            def launch(*args, **kwargs):
                launched[name] += 1

            return launch

    kept = dict(vars(driver))  # (the active driver is an attribute or a property's field by version)
    driver.set_active(Driver())
    try:
        yield
    finally:
        vars(driver).clear()
        vars(driver).update(kept)


def layers(repeat: int = 300) -> dict:
    """Operations of one Linear forward + backward under bf16 autocast, per recipe on sm_90, and
    the host's time for them (``host_us``, one thread, the kernels not run); and what a Triton
    launch costs the host (``launch_us``: an empty kernel's, directly and through
    ``triton.autotune``). In a child process: its Triton launches nothing (:func:`triton_without_a_gpu`)."""
    if not os.environ.get("LOWCOMM_LAYERS_CHILD"):
        env = {**os.environ, "LOWCOMM_LAYERS_CHILD": "1"}
        env.pop("TRITON_INTERPRET", None)  # Triton's own launch path, compiled for sm_90
        argv = [sys.executable, __file__, "--layers-only", f"--layers-repeat={repeat}"]
        child = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        if child.returncode:
            return {"error": child.stderr.strip().splitlines()[-1]}
        return json.loads(child.stdout)
    import lowcomm.kernels.gemm as gemm
    import lowcomm.kernels.linear as linear
    from lowcomm.kernels import LowPrecisionLinear
    from lowcomm.kernels.triton_quantize import HAVE_TRITON, TRITON_MISSING

    if not HAVE_TRITON:
        return {"error": TRITON_MISSING}
    import triton

    from lowcomm.kernels import triton_mx_gemm

    torch.set_num_threads(1)
    tokens, k, n = LAYER_SHAPE
    launched: collections.Counter = collections.Counter()

    def gemm_stand_in(a, b, scale_a=None, scale_b=None, out_dtype=None, **kw):
        return torch.zeros(a.shape[0], b.shape[1], dtype=out_dtype)

    def bf16_gemm_stand_in(a, b, out_dtype):  # the dequant backend's cuBLAS bf16 GEMM
        return torch.zeros(a.shape[0], b.shape[1], dtype=out_dtype)

    def per_call_us(fn) -> float:
        for _ in range(3):  # compiled, tuned
            fn()
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - t0) / repeat * 1e6

    real = gemm._capability, gemm._triton_runs_on, linear._triton_runs_on, torch._scaled_mm
    real_bf16 = triton_mx_gemm._bf16_mm
    gemm._capability, torch._scaled_mm = (lambda device: (9, 0)), gemm_stand_in
    gemm._triton_runs_on = linear._triton_runs_on = lambda device: True  # the sm_90 path, on CPU tensors
    triton_mx_gemm._bf16_mm = bf16_gemm_stand_in
    gemm._blockwise_scaled_mm_works.cache_clear()
    rows = {}
    try:
        with triton_without_a_gpu(launched):
            launch_us = {k: per_call_us(call) for k, call in empty_launches(torch.zeros(32)).items()}
            for recipe in ("bf16", *LAYER_RECIPES):
                torch.manual_seed(0)
                layer = torch.nn.Linear(k, n) if recipe == "bf16" else LowPrecisionLinear(k, n, recipe=recipe)
                x = torch.randn(tokens, k, requires_grad=True)

                def step(layer=layer, x=x):
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        y = layer(x)
                    y.backward(torch.ones_like(y))

                for _ in range(3):  # compiled; fp8_delayed: the first step is dynamic, later ones not
                    step()
                c = _Count()
                launched.clear()
                with c:
                    step()
                work = {op: v for op, v in c.ops.items() if op not in ALLOCATIONS}
                ops = dict(sorted({**work, **launched}.items()))
                rows[recipe] = {"ops": sum(ops.values()), "host_us": per_call_us(step), "by_op": ops}
    finally:
        gemm._capability, gemm._triton_runs_on, linear._triton_runs_on, torch._scaled_mm = real
        triton_mx_gemm._bf16_mm = real_bf16
        gemm._blockwise_scaled_mm_works.cache_clear()
    return {
        "shape": {"tokens": tokens, "in_features": k, "out_features": n},
        "repeat": repeat,
        "triton": triton.__version__,
        "launch_us": launch_us,
        "rows": rows,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="timed steps per run")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--skip-layers", action="store_true", help="leave out the per-recipe Linear counts")
    p.add_argument("--skip-compiled", action="store_true", help="leave out the torch.compile part")
    p.add_argument(
        "--compiled-layers",
        type=int,
        default=COMPILED_SHAPE["layers"],
        help="the torch.compile part's depth (default: the small size's 8; fewer compile sooner)",
    )
    p.add_argument("--layers-only", action="store_true", help=argparse.SUPPRESS)  # the child of layers()
    p.add_argument("--layers-repeat", type=int, default=300, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.layers_only:
        print(json.dumps(layers(args.layers_repeat)))
        return {}
    torch.set_num_threads(1)
    stand_ins = [
        (build_module.torch.optim, "AdamW", _FusedAdamW),  # the sequential path's AdamW, fused as on CUDA
        # the batched replicas' optimizer and clip on their kernels, as on CUDA: launches counted,
        # not run; the tiny model's matrices and embeddings (256 elements a replica or more) each
        # on the per-tensor kernel, its biases and layer norms on the one multi-tensor launch, as
        # the small size's on a GPU (KERNEL_MIN elements or more, or a bf16 copy)
        (build_module, "ReplicaAdamW", functools.partial(ReplicaAdamW, kernel=True)),
        (triton_adamw, "adamw_replicas_", _adamw_launch),
        (triton_adamw, "adamw_replicas_multi_", _adamw_launch),
        (triton_adamw, "sumsq_replicas", _sumsq_launch),
        (replica_adamw, "KERNEL_MIN", 256),
    ]
    with replacing(stand_ins):
        rows = {"plain": plain(args.steps), **{m: lowcomm(m, args.steps) for m in MODES}}
        compiled = None
        if not args.skip_compiled:  # the trainer's --compile against a compiled plain loop
            c = {**COMPILED_SHAPE, "layers": args.compiled_layers}
            compiled = {
                "shape": c,
                "rows": {
                    "plain": plain(args.steps, c, compile=True),
                    **{m: lowcomm(m, args.steps, c, compile=True) for m in MODES},
                },
            }
    out = {**stamp("host_overhead"), "shape": SHAPE, "replicas": REPLICAS, "steps": args.steps, "rows": rows}
    out["compiled"] = compiled
    out["layers"] = None if args.skip_layers else layers()
    write_result(out, args.json)
    return out


if __name__ == "__main__":
    main()
