"""The tasks of a SLURM ``srun`` step as a launcher's job: ``srun python train.py`` (or ``srun lowcomm
train``) without torchrun sets SLURM's variables in each task, not the ones torch.distributed
reads (RANK, WORLD_SIZE, MASTER_ADDR, ...). :func:`adopt_srun_env` writes those from SLURM's, as
torchrun would have set them, so that the tasks meet as one job; torchrun's own (``srun
torchrun ...``) and a user's are never overwritten.

What each variable is taken from (the step's, not the allocation's: ``srun -n 4`` in an
allocation of 8 tasks is a job of 4):

- ``RANK`` ← ``SLURM_PROCID``, ``WORLD_SIZE`` ← ``SLURM_STEP_NUM_TASKS``;
- ``LOCAL_RANK`` ← ``SLURM_LOCALID``; ``LOCAL_WORLD_SIZE`` ← this node's count in
  ``SLURM_STEP_TASKS_PER_NODE`` (``"4(x2),3"``: 4 on each of the first two nodes, 3 on the
  third), ``GROUP_RANK`` / ``NODE_RANK`` ← ``SLURM_NODEID``;
- ``MASTER_ADDR`` ← the step's first node (``SLURM_STEP_NODELIST``, a hostlist:
  ``gpu[003-006,9],login1`` → ``gpu003``), where task 0 runs under SLURM's default block
  distribution (task 0 on another node, by ``SLURMD_NODENAME``, is refused naming it: it hosts
  the rendezvous);
- ``MASTER_PORT`` ← ``10000 + (SLURM_JOB_ID + SLURM_STEP_ID) mod 20000``, the same in every task
  and below Linux's ephemeral ports; set ``MASTER_PORT`` to choose one.

A batch script's own process (no ``srun``: no ``SLURM_STEP_NUM_TASKS``), a step of one task and
an interactive shell of ``srun --pty`` (``SLURM_PTY_PORT``) are left alone: they run as one process.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

__all__ = ["adopt_srun_env", "first_host", "srun_env", "tasks_per_node"]

log = logging.getLogger(__name__)


def first_host(hostlist: str) -> str:
    """The first host of a SLURM hostlist (``node[01-04,07],gpu5`` → ``node01``; the padding of a
    range's numbers is kept; several bracketed parts, ``r[1-2]n[3-4]`` → ``r1n3``).

    Raises:
        ValueError: not a hostlist (empty, or brackets that do not close).
    """
    text, depth, end = hostlist.strip(), 0, None
    for i, ch in enumerate(text):  # the first top-level item: commas inside brackets list numbers
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    item = text[:end]
    host = re.sub(r"\[([^\[\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0].strip(), item)
    if not host or any(c in host for c in "[],") or depth < 0:
        raise ValueError(f"SLURM_STEP_NODELIST={hostlist!r} is not a SLURM hostlist (node[01-04],gpu5)")
    return host


def tasks_per_node(spec: str) -> list[int]:
    """SLURM's tasks per node (``"4(x2),3"`` → ``[4, 4, 3]``).

    Raises:
        ValueError: not of that form.
    """
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise ValueError(f"SLURM_STEP_TASKS_PER_NODE={spec!r} is not SLURM's form (4(x2),3)")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def srun_env(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The launcher's variables for a task of an ``srun`` step of several tasks (see the module),
    from ``environ``; None where there is nothing to make: not in such a step (or in its
    interactive shell), or a launcher's RANK / WORLD_SIZE are set already (``srun torchrun``,
    ``srun lowcomm launch`` of one task).

    Raises:
        ValueError: a SLURM variable that is not what SLURM writes, naming it.
    """
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return None
    if environ.get("SLURM_PTY_PORT"):  # a shell of `srun --pty`: one process, typed into
        return None
    tasks = environ.get("SLURM_STEP_NUM_TASKS")
    if tasks is None or not tasks.strip().isdigit() or int(tasks) < 2:
        return None

    def number(name: str) -> int:
        value = environ.get(name, "")
        if not value.strip().isdigit():
            raise ValueError(f"{name}={value!r}: srun sets it to a whole number in each task")
        return int(value)

    rank, node = number("SLURM_PROCID"), number("SLURM_NODEID")
    per_node = tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE", tasks))
    if node >= len(per_node):
        raise ValueError(
            f"SLURM_NODEID={node} but SLURM_STEP_TASKS_PER_NODE={environ.get('SLURM_STEP_TASKS_PER_NODE')!r} "
            f"names {len(per_node)} node(s)"
        )
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or ""
    addr = environ.get("MASTER_ADDR") or first_host(nodes)
    here = environ.get("SLURMD_NODENAME")
    if rank == 0 and here and not environ.get("MASTER_ADDR") and here != addr:
        # task 0 hosts the rendezvous: the others would wait on the first node for nothing
        raise ValueError(
            f"task 0 runs on {here}, not on the step's first node {addr} (SLURM_STEP_NODELIST="
            f"{nodes!r}; a distribution other than block): set MASTER_ADDR={here} for every task"
        )
    port = environ.get("MASTER_PORT") or str(
        10000 + (number("SLURM_JOB_ID") + int(environ.get("SLURM_STEP_ID", "0") or 0)) % 20000
    )
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(int(tasks)),
        "LOCAL_RANK": str(number("SLURM_LOCALID")),
        "LOCAL_WORLD_SIZE": str(per_node[node]),
        "GROUP_RANK": str(node),
        "NODE_RANK": str(node),
        "MASTER_ADDR": addr,
        "MASTER_PORT": port,
    }


def adopt_srun_env() -> dict[str, str] | None:
    """Set the launcher's variables from SLURM's in this task of an ``srun`` step (see the module);
    returns what it set, None where it set nothing. Call it before anything reads them (the
    trainer's CLI and :func:`lowcomm.integrations.replica_group` do)."""
    env = srun_env(os.environ)
    if env is None:
        return None
    os.environ.update(env)
    if env["RANK"] == "0":
        log.info(
            "a task of srun's step: RANK/WORLD_SIZE %s/%s, rendezvous %s:%s (from SLURM's variables)",
            env["RANK"],
            env["WORLD_SIZE"],
            env["MASTER_ADDR"],
            env["MASTER_PORT"],
        )
    return env
