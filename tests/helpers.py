"""Shared pieces of the tests: a small synthetic corpus, the flags of a tiny model, a model with
BatchNorm."""

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.utils._python_dispatch
from torch import nn

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


class Dispatched(torch.utils._python_dispatch.TorchDispatchMode):
    """The ATen operators dispatched while it is active, in order: ``calls`` holds (name, the
    output's shape; None for an output not a tensor), the name without namespace or overload
    (``cat`` for ``aten.cat.default``). It keeps no output: a reference held here would change
    what autograd does (a gradient it could take as it is, it would copy)."""

    def __init__(self):
        super().__init__()
        self.calls: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        self.calls.append((str(func).split(".")[1], shape))
        return out

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


# the reference GPT at its smallest, one torch thread: for CLI runs in tests
TINY_FLAGS = [
    "--model-dim",
    "16",
    "--layers",
    "2",
    "--heads",
    "2",
    "--seq-len",
    "16",
    "--batch-size",
    "2",
    "--eval-batches",
    "2",
    "--threads",
    "1",
]


def write_corpus(folder: Path, lines: int = 3000, files: int = 4) -> str:
    """A directory of Python-like text files (about 30 bytes a line); returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(lines))
    size = -(-len(text) // files)
    for i in range(files):
        (folder / f"part{i}.py").write_text(text[i * size : (i + 1) * size])
    return str(folder)


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` as a module (its folder on the path, as when it is run)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fp8_gemm_tolerance(device) -> float:
    """Relative max error allowed between an fp8 GEMM kernel and its fp32 emulation.

    Where the products are summed in fp32 (CPU, the Triton interpreter) only the summation order
    differs: 1e-6. A GPU's fp8 tensor-core MMA keeps about 14 bits of its running sum (DeepSeek-V3
    technical report §3.3.2; docs/references.md), a relative error near 2^-14 per partial sum that
    grows with K: 2^-11 (4.9e-4) leaves room above the 0.8-1.6e-4 measured on an H200 at these
    shapes, and is still 50x below what a wrong scale or a dropped block costs (> 1e-2).
    """
    return 2**-11 if str(device).startswith("cuda") else 1e-6


def torchrun(procs: int, *args: str, timeout: float, env: dict, nodes: int = 1) -> list:
    """``torchrun --nproc-per-node PROCS ARGS`` (ARGS: torchrun's options, then the script or
    ``-m`` module and its arguments), ``--standalone``, or with ``nodes`` > 1 as that many nodes
    on this machine (an agent each, c10d rendezvous on loopback): the CompletedProcess of each
    node, its output captured. On ``timeout`` every process of theirs is killed (torchrun's workers
    would outlive it) and the test fails."""
    from lowcomm.comm.net import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs)]
    if nodes == 1:
        agents = [[*cmd, "--standalone"]]
    else:
        meet = ["--nnodes", str(nodes), "--rdzv-backend", "c10d"]
        meet += ["--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
        agents = [[*cmd, *meet, "--node-rank", str(n)] for n in range(nodes)]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    started = [subprocess.Popen([*a, *args], env=env, start_new_session=True, **pipes) for a in agents]
    deadline = time.monotonic() + timeout
    done = []
    try:
        for p in started:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    except subprocess.TimeoutExpired:
        for p in started:
            os.killpg(p.pid, signal.SIGKILL)
        errs = [p.communicate()[1][-2000:] for p in started]
        pytest.fail(f"torchrun did not end within {timeout:g} s: {errs}")
    return done


def launch_train(replicas: int, *train_args: str, start: str = "exec") -> list[str]:
    """``lowcomm launch --replicas N --start START -- python -m lowcomm train ARGS`` as an argument
    list."""
    lowcomm = [sys.executable, "-m", "lowcomm"]
    head = [*lowcomm, "launch", "--replicas", str(replicas), "--start", start]
    return [*head, "--", *lowcomm, "train", *train_args]


class NormLM(nn.Module):
    """A tiny language model with BatchNorm in its blocks (running statistics for DiLoCo to
    synchronize): ``model(x, y)`` is the loss, as the reference GPT's."""

    def __init__(self, vocab: int = 32, dim: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim)) for _ in range(2))
        self.head = nn.Linear(dim, vocab)

    def forward(self, x, y):
        h = self.embed(x).reshape(-1, self.embed.embedding_dim)
        for b in self.blocks:
            h = h + torch.relu(b(h))
        return nn.functional.cross_entropy(self.head(h), y.reshape(-1))


def needs_triton() -> None:
    """Skip where lowcomm's Triton kernels are off (triton missing or older than they run on);
    CI installs a Triton they run on, so there these tests run."""
    from lowcomm.kernels.triton_quantize import HAVE_TRITON, TRITON_MISSING

    if not HAVE_TRITON:
        pytest.skip(TRITON_MISSING)
