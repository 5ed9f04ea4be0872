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
    """Import ``benchmarks/<name>.py`` as a module, its folder on the path for its own imports:
    last, after the installed packages (first, where a benchmark puts it when it is run,
    ``benchmarks/kernels.py`` hid the installed package ``kernels`` from the rest of the suite's
    process, and transformers' Trainer imported it in its place)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.path[:] = [p for p in sys.path if not (p and Path(p).resolve() == BENCHMARKS)] + [str(BENCHMARKS)]
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


def torchrun(
    procs: int, *args: str, timeout: float, env: dict, nodes: int = 1, min_nodes=None, during=None
) -> list:
    """``torchrun --nproc-per-node PROCS ARGS`` (ARGS: torchrun's options, then the script or
    ``-m`` module and its arguments), ``--standalone``, or with ``nodes`` > 1 as that many nodes
    on this machine (an agent each, c10d rendezvous on loopback, hosted by node 0's agent;
    ``min_nodes``: ``--nnodes MIN_NODES:NODES``, the agents told a lost node within about 2 s and
    waiting 1 s for more nodes once they have enough): the CompletedProcess of each node, its
    output captured (written to files: a node killed by ``during`` leaves no pipe to read).
    ``during(agents)``, if given, is called once they started (their Popen objects, say to kill a
    node with :func:`kill_tree`). On ``timeout`` every process of theirs is killed and the test
    fails."""
    import tempfile

    from lowcomm.comm.net import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs)]
    if nodes == 1:
        agents = [[*cmd, "--standalone"]]
    else:
        meet = ["--nnodes", f"{min_nodes}:{nodes}" if min_nodes else str(nodes), "--rdzv-backend", "c10d"]
        meet += ["--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
        conf = ",last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=2" if min_nodes else ""
        agents = [[*cmd, *meet, "--rdzv-conf", f"is_host={int(n == 0)}{conf}"] for n in range(nodes)]
    with tempfile.TemporaryDirectory() as tmp:
        logs = [(Path(tmp) / f"out{n}", Path(tmp) / f"err{n}") for n in range(len(agents))]
        started = []
        for a, (out, err) in zip(agents, logs):
            with open(out, "w") as o, open(err, "w") as e:  # (the child holds its own copies)
                started.append(subprocess.Popen([*a, *args], env=env, stdout=o, stderr=e, text=True))
        deadline = time.monotonic() + timeout
        try:
            if during is not None:
                during(started)
            for p in started:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in started:
                kill_tree(p.pid)
            errs = [err.read_text()[-2000:] for _, err in logs]
            pytest.fail(f"torchrun did not end within {timeout:g} s: {errs}")
        except BaseException:  # (``during`` failed: its nodes would outlive the test)
            for p in started:
                kill_tree(p.pid)
            raise
        return [
            subprocess.CompletedProcess(p.args, p.returncode, out.read_text(), err.read_text())
            for p, (out, err) in zip(started, logs)
        ]


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process under it (torchrun's workers are not in its process
    group: killing a node takes its agent and them), children first looked up, then killed."""
    tree, i = [pid], 0
    while i < len(tree):
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == tree[i]:  # (the parent's pid: the second field after the name)
                tree.append(int(stat.parent.name))
        i += 1
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


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


def srun_tasks(cmd: list[str], tmp_path: Path, tasks: int = 2, timeout: float = 180) -> list:
    """``cmd`` as the tasks of one ``srun -n TASKS`` step on this machine would run it: each with
    the variables srun sets (none of torchrun's), a job id whose rendezvous port (derived from it,
    as in :mod:`lowcomm.comm.slurm`) is free here; their CompletedProcess."""
    import random
    import socket

    while True:  # a port lowcomm will derive from the job id, free on this machine
        job = random.randrange(20000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 10000 + job))
                break
            except OSError:
                continue
    launcher = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    base = {k: v for k, v in os.environ.items() if k not in launcher}
    base.update(OMP_NUM_THREADS="1", SLURM_JOB_ID=str(job), SLURM_STEP_ID="0", SLURM_JOB_NAME="train")
    base.update(SLURM_NTASKS=str(tasks), SLURM_NTASKS_PER_NODE=str(tasks), SLURM_STEP_NUM_TASKS=str(tasks))
    base.update(SLURM_STEP_TASKS_PER_NODE=str(tasks), SLURM_STEP_NODELIST="localhost", SLURM_NODEID="0")
    procs = []
    for r in range(tasks):
        env = {**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)}
        out, err = (open(tmp_path / f"task{r}.{x}", "w+") for x in ("out", "err"))
        procs.append((subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True), out, err))
    done = []
    try:
        for p, out, err in procs:
            p.wait(timeout=timeout)
            out.seek(0)
            err.seek(0)
            done.append(subprocess.CompletedProcess(cmd, p.returncode, out.read(), err.read()))
    finally:
        for p, out, err in procs:
            if p.poll() is None:
                p.kill()
            out.close()
            err.close()
    return done
