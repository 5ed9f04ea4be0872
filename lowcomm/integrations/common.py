"""What every integration needs: the replicas' group, and a launcher environment kept from the
framework (which would otherwise start data parallelism across the replicas), or with several
processes a replica, rewritten to the replica's own job."""

from __future__ import annotations

import atexit
import logging
import os
from pathlib import Path

from .._checks import env_int, newest_common_step, one_line
from ..comm import LocalGroup, ReplicaGroup
from ..optim import DiLoCoConfig

__all__ = [
    "replica_group",
    "check_same_start",
    "resume_checkpoint",
    "round_metrics",
    "replica_env",
    "replica_shard_group",
    "replica_state",
    "procs_per_replica",
    "LAUNCHER_ENV",
    "outer_device",
    "warn_if_spanning_replicas",
]

log = logging.getLogger(__name__)

#: the variables torchrun and ``lowcomm launch`` set, which frameworks read to start DDP
LAUNCHER_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)

#: what makes a framework take the job for SLURM's (Lightning's SLURMEnvironment: the srun step's
#: tasks, the replicas, as one DDP job), hidden with the launcher's variables
SCHEDULER_ENV = ("SLURM_NTASKS",)


def replica_group(hide_env: bool = True, timeout_s: float = 300.0) -> ReplicaGroup:
    """The group of this process's replica: the replicas of a ``lowcomm launch`` or torchrun job,
    or of the tasks of an ``srun`` step (:mod:`lowcomm.comm.slurm`: the launcher's variables made
    from SLURM's; ``SLURM_NTASKS`` is hidden too, so that Lightning does not take the step for its
    own job), or a group of one replica in a lone process.

    With one process per replica, the group's gloo process group is built from the launcher's
    rendezvous without initializing torch.distributed's default group, and with ``hide_env`` the
    launcher's variables are removed from ``os.environ`` (their values are kept in
    ``lowcomm.integrations.common.HIDDEN``): Lightning, the HF Trainer and accelerate see one
    process, so they neither wrap the model in DDP nor save checkpoints from rank 0 only; on a
    machine with several GPUs the process is shown its own (``CUDA_VISIBLE_DEVICES``: GPU
    ``LOCAL_RANK``), so the framework trains on it alone.

    With ``k`` processes per replica (``lowcomm launch --procs-per-replica k``; the layout of
    :mod:`lowcomm.runtime.trainer.topology`: replica ``r`` is ranks ``r·k .. r·k + k − 1``), the
    group joins this process with the process of the same place in every other replica (its
    ``rank`` is the replica's), and with ``hide_env`` the launcher's variables are rewritten to the
    replica's own job: ``RANK`` and ``WORLD_SIZE`` its place in the replica and ``k``, ``LOCAL_*``
    and ``GROUP_RANK`` / ``NODE_RANK`` the replica's processes on this machine, ``MASTER_ADDR`` /
    ``MASTER_PORT`` a rendezvous of the replica's own (its first process's machine, a free port),
    ``CUDA_VISIBLE_DEVICES`` the replica's GPUs on this machine. The framework then runs its DDP
    inside the replica (it is given ``k`` devices, as for a job of ``k`` processes), and DiLoCo
    synchronizes the replicas, each process its 1/k shard (:func:`replica_shard_group`). The
    launcher's values are in ``HIDDEN``.

    Call it before building the framework's trainer and before anything touches a GPU. Called
    again in the same process, it returns the group it joined (until that group is closed).

    Raises:
        ValueError: LOWCOMM_PROCS_PER_REPLICA is not a whole number that divides WORLD_SIZE.
    """
    global _REPLICAS
    if _REPLICAS is not None and not _REPLICAS.closed:
        # called again (a notebook cell, a second fit): the launcher's variables are hidden or the
        # replica's by now, and read again they would make a group of one replica that never syncs
        return _REPLICAS
    from ..comm.slurm import adopt_srun_env

    adopt_srun_env()  # a task of `srun python train.py`: a process of the job, as under torchrun
    world = env_int("WORLD_SIZE", 1)
    k = procs_per_replica()
    if k < 1 or world % k:
        raise ValueError(
            f"LOWCOMM_PROCS_PER_REPLICA={k} must be >= 1 and divide WORLD_SIZE={world} "
            "(the processes of the job, k to a replica)"
        )
    if world == k:  # one replica: its processes are the launcher's whole job
        if hide_env and k == 1:
            _hide_launcher()
        return LocalGroup.create(1)[0]
    import torch.distributed as dist

    from ..comm.distributed import DistributedGroup, gloo_group, job_store

    store, rank, _ = job_store(timeout_s)  # (under keys of this attempt: torchrun's restarts)
    (replica, place), replicas = divmod(rank, k), world // k
    prefix = "lowcomm/replicas/" if k == 1 else f"lowcomm/replicas{place}/"
    outer = dist.PrefixStore(prefix, store)
    group = DistributedGroup(
        gloo_group(outer, replica, replicas, timeout_s),
        store=outer,
        rank=replica,
        size=replicas,
        name="replicas" if k == 1 else f"replicas{place}",
        timeout=timeout_s,
    )
    log.info(
        "replica %d of %d, process %d of %d (gloo, from the launcher's rendezvous)",
        replica,
        replicas,
        place,
        k,
    )
    atexit.register(_release, group)
    _REPLICAS = group
    if hide_env:
        if k == 1:
            _own_gpus()  # before the variables that place this process go
            _hide_launcher()
        else:
            _enter_replica(store, rank, replica, k)
    return group


def replica_shard_group(strategy: str, whole_model: bool):
    """DiLoCo's ``shard_group`` inside a framework's trainer: with a replica of ``k > 1``
    processes, the framework's own process group (its default group, which :func:`replica_group`
    made the replica's), so each process synchronizes its 1/k shard of every fragment with its
    place in the other replicas: ``k`` times fewer bytes between replicas than each process
    sending the whole. None with one process per replica.

    Args:
        strategy: the framework's name for how it spreads the replica (for the error).
        whole_model: whether each process holds the whole model (the framework's DDP).

    Raises:
        ValueError: the replica's processes hold shards (FSDP, DeepSpeed): DiLoCo inside a
            framework takes its DDP; or the framework runs another number of processes than the
            replica's (replica_group() not called first, or not ``devices=k``).
    """
    k = procs_per_replica()
    if k == 1:
        return None
    import torch.distributed as dist

    seen = dist.get_world_size() if dist.is_initialized() else 1
    if seen != k:
        raise ValueError(
            f"the framework's job is {seen} process{'es' if seen > 1 else ''} where a replica is {k} "
            f"(LOWCOMM_PROCS_PER_REPLICA): give it {k} devices, and call "
            "lowcomm.integrations.replica_group() before building its trainer"
        )
    if not whole_model:
        raise ValueError(
            f"a replica of {k} processes (LOWCOMM_PROCS_PER_REPLICA) runs the framework's DDP inside "
            f"it, where each process holds the whole model; {strategy} is not supported"
        )
    return dist.group.WORLD


def replica_state(diloco) -> dict:
    """On the first process of its replica, DiLoCo's state with the part of every process of the
    replica (a replica of ``k > 1`` processes holds ``k`` parts; a framework writes its first
    process's checkpoint only, and each process takes its own part back from it); on the others,
    their own state, which the framework does not write. A collective over the replica's
    processes: every one of them calls it, as frameworks save checkpoints. The parts go to the
    first process only: the others would hold ``k`` states each for nothing."""
    state = diloco.state_dict(compact=True)  # (the frameworks torch.save it: no fixed layout needed)
    group = diloco.shard_group
    if group is None:
        return state
    import torch.distributed as dist

    first = dist.get_rank(group) == 0
    parts: list | None = [None] * dist.get_world_size(group) if first else None
    dist.gather_object(_on_cpu(state), parts, dst=dist.get_global_rank(group, 0), group=group)
    if parts is None:
        return state
    return {key: value for part in parts for key, value in part.items()}


#: the checkpoint :func:`resume_checkpoint` chose last in this process (the HF callback reads
#: DiLoCo's state from it: the Trainer tells its callbacks the step it resumes at, not the folder)
CHOSEN: dict[str, str] = {}


def resume_checkpoint(group: ReplicaGroup, folder: str | os.PathLike) -> str | None:
    """The checkpoint this replica resumes from: its own, in ``folder``, at the newest DiLoCo step
    every replica that holds checkpoints holds one of; None where no replica holds any (a fresh
    start). Pass it to the framework (Lightning's ``fit(ckpt_path=...)``, the HF Trainer's
    ``train(resume_from_checkpoint=...)``), so a job that always asks to resume (under
    ``torchrun --max-restarts``) starts anew the first time and, after a replica was killed while
    the others wrote a checkpoint it never wrote, resumes every replica from the one before.

    A replica that holds none (a job resumed with more replicas than it saved, or a replica
    killed before its first checkpoint) resumes from the checkpoint of that step of the first
    replica that holds one, which it must be able to read (a filesystem every node sees); the
    callbacks then load that state as another replica's (``DiLoCo.load_state_dict`` reads whose
    it is).

    ``folder`` is this replica's own: Lightning's ``default_root_dir`` or checkpoint directory
    (the ``*.ckpt`` files under it, at any depth, with the DiLoCo callback's state inside), or the
    HF Trainer's ``output_dir`` (its ``checkpoint-N`` folders, each with the callback's
    ``diloco.pt``; the folder is returned). A checkpoint that cannot be read (a torn write) is
    passed over with a warning. A collective over the replicas: every replica calls it.

    Raises:
        ValueError: no step is held by every replica that holds checkpoints, naming each
            replica's steps; or this replica holds none and cannot read the checkpoint it would
            resume from, naming it.
    """
    CHOSEN.clear()
    found = _checkpoints_by_step(folder)
    mine = {str(step): os.path.abspath(path) for step, path in found.items()}
    held = [mine] if group.size == 1 else group.all_gather_json(mine)
    steps = [sorted(int(s) for s in h) for h in held]
    if not any(steps):
        log.info("no DiLoCo checkpoint under %s or any replica's folder: a fresh start", folder)
        return None
    try:
        step = newest_common_step(steps, "replica", skip_empty=True)
    except ValueError as e:
        raise ValueError(
            f"{folder}: {e}: resume from checkpoints every replica holds, or start anew in another folder"
        ) from None
    if step in found:
        CHOSEN["path"] = found[step]
        return found[step]
    donor = next(r for r, s in enumerate(steps) if s)
    path = held[donor][str(step)]
    if not os.path.exists(path):
        raise ValueError(
            f"replica {group.rank} holds no checkpoint in {folder} and would resume from replica "
            f"{donor}'s of step {step}, {path}, which this process cannot read: put the replicas' "
            "folders where every node reads them, or copy that checkpoint into this replica's folder"
        )
    log.warning(
        "replica %d holds no checkpoint in %s: it resumes from replica %d's of step %d, %s",
        group.rank,
        folder,
        donor,
        step,
        path,
    )
    CHOSEN["path"] = path
    return path


def _checkpoints_by_step(folder: str | os.PathLike) -> dict[int, str]:
    """This replica's checkpoints in ``folder`` by DiLoCo step (see :func:`resume_checkpoint`)."""
    import torch

    root = Path(folder)
    # Lightning's (a step's own file before last.ckpt, its copy), then the HF Trainer's
    files = sorted(root.rglob("*.ckpt"), key=lambda p: (p.name == "last.ckpt", str(p)))
    files += sorted(root.rglob(STATE_FILE))
    found: dict[int, str] = {}
    for path in files:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torn, truncated, not torch's: not a checkpoint to resume from
            log.warning("%s: not read (%s: %s), passed over", path, type(e).__name__, one_line(e, 200))
            continue
        if path.suffix == ".ckpt":  # (Lightning's: the callbacks' states, ours among them)
            callbacks = state.get("callbacks") if isinstance(state, dict) else None
            state = next(
                (v for k, v in (callbacks or {}).items() if str(k).startswith("DiLoCoCallback")),
                None,
            )
        step = _state_step(state)
        if isinstance(step, int):
            found.setdefault(step, str(path if path.suffix == ".ckpt" else path.parent))
    return found


def _state_step(state) -> int | None:
    """The DiLoCo step of a state (its own, or the first part's of a replica of several processes)."""
    if not isinstance(state, dict):
        return None
    parts = [v for k, v in state.items() if isinstance(k, str) and k.startswith("part ")]
    return (parts[0] if parts and isinstance(parts[0], dict) else state).get("step")


def round_metrics(rounds: list) -> dict[str, float]:
    """The metrics a framework's logger gets for the rounds that completed at one step
    (:meth:`lowcomm.DiLoCo.drain_round_stats`): the bytes this replica sent, the mean norm of its
    pseudo-gradients and their cosine to the replicas' mean, and the seconds its loop waited for
    the rounds; {} for none."""
    if not rounds:
        return {}
    n = len(rounds)
    return {
        "diloco/rounds": float(n),
        "diloco/bytes_sent": float(sum(r.bytes_sent for r in rounds)),
        "diloco/pseudo_grad_norm": sum(r.pseudo_grad_norm for r in rounds) / n,
        "diloco/cosine_to_mean": sum(r.cosine_to_mean for r in rounds) / n,
        "diloco/wait_s": float(sum(r.wait_s for r in rounds)),
    }


def check_same_start(group: ReplicaGroup, state: dict | None) -> None:
    """Refuse, before DiLoCo is built (its first collective), replicas that start from different
    points: every replica resumes from its own checkpoint of the same DiLoCo step, or none does.
    A framework resumes each replica from its own folder; a job resumed with more replicas than it
    saved has no checkpoint for the new ones, and one whose replica lost its last checkpoint
    resumes that one from an older step. Built anyway, the new replica would broadcast its weights
    to replicas that never enter the broadcast, and the job would hang until the group's timeout.

    Args:
        state: the DiLoCo state this replica resumes from (its own part, or the parts of a replica
            of several processes); None for a fresh start.

    Raises:
        ValueError: the replicas' steps differ, naming them.
    """
    try:
        group.verify_same("DiLoCo step each resumes from", {"step": _state_step(state)})
    except ValueError as e:
        raise ValueError(
            f"{e} (None: no checkpoint, a fresh start): resume every replica from its own "
            "checkpoint of the same step (lowcomm.integrations.resume_checkpoint finds it), or start "
            "them all anew (a job resumed with more replicas than it saved has none for the new ones)"
        ) from None


def _on_cpu(value):
    import torch

    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value


def _hide_launcher() -> None:
    """Remove the launcher's variables from the environment, keeping them in ``HIDDEN``."""
    HIDDEN.update({name: os.environ.pop(name) for name in LAUNCHER_ENV if name in os.environ})
    _hide_scheduler()


def _hide_scheduler() -> None:
    HIDDEN.update({name: os.environ.pop(name) for name in SCHEDULER_ENV if name in os.environ})


def procs_per_replica() -> int:
    """The processes of each replica in this job (``LOWCOMM_PROCS_PER_REPLICA``; 1 without it)."""
    return env_int("LOWCOMM_PROCS_PER_REPLICA", 1)


def replica_env(rank: int, k: int, local_rank: int, local_world: int) -> dict[str, str]:
    """The launcher variables a framework reads, as a job of replica ``rank // k``'s ``k``
    processes would have them (all but its rendezvous address): its place in the replica, and the
    replica's processes on this machine, whose ranks are ``rank − local_rank`` onwards
    (``local_world`` of them; torchrun and ``lowcomm launch`` number a machine's processes in a
    row). ``GROUP_RANK`` / ``NODE_RANK``: this machine among the replica's, where every machine
    holds as many of them. ``TORCHELASTIC_USE_AGENT_STORE``: False, as the replica's rendezvous is
    hosted by its first process, not by torchrun's agent.

    Raises:
        ValueError: replicas that would share machines unevenly (``k`` neither divides
            ``local_world`` nor is divided by it: a framework would number its machines wrong).
    """
    if local_world % k and k % local_world:
        raise ValueError(
            f"replicas of {k} processes (LOWCOMM_PROCS_PER_REPLICA) on machines of {local_world} "
            "(LOCAL_WORLD_SIZE): a replica must fill whole machines, or a machine hold whole replicas"
        )
    replica, place = divmod(rank, k)
    first = rank - local_rank
    lo, hi = max(replica * k, first), min((replica + 1) * k, first + local_world)
    here = hi - lo
    machine = str((lo - replica * k) // here)
    return {
        "RANK": str(place),
        "WORLD_SIZE": str(k),
        "LOCAL_RANK": str(rank - lo),
        "LOCAL_WORLD_SIZE": str(here),
        "GROUP_RANK": machine,
        "NODE_RANK": machine,
        "ROLE_RANK": str(place),
        "GROUP_WORLD_SIZE": str(-(-k // here)),
        "ROLE_WORLD_SIZE": str(k),
        # torchrun's agent hosts the job's store; nothing hosts the replica's but its first process
        "TORCHELASTIC_USE_AGENT_STORE": "False",
    }


def _enter_replica(store, rank: int, replica: int, k: int) -> None:
    """Rewrite the launcher's variables to the replica's own job (:func:`replica_env`), with a
    rendezvous of its own: its first process publishes an address of its machine and a free port
    in the job's store, and the others read it there."""
    from ..comm.net import address_toward, free_port

    key = f"lowcomm/replica{replica}/master"
    if rank % k == 0:
        host = address_toward(os.environ.get("MASTER_ADDR", "127.0.0.1"))
        store.set(key, f"{host}:{free_port(host)}")
    host, port = store.get(key).decode().rsplit(":", 1)
    local_rank = env_int("LOCAL_RANK", rank)
    local_world = env_int("LOCAL_WORLD_SIZE", env_int("WORLD_SIZE", 1))
    env = {**replica_env(rank, k, local_rank, local_world), "MASTER_ADDR": host, "MASTER_PORT": port}
    _own_gpus(local_rank - int(env["LOCAL_RANK"]), int(env["LOCAL_WORLD_SIZE"]))
    HIDDEN.update({name: os.environ[name] for name in {*LAUNCHER_ENV, *env} if name in os.environ})
    os.environ.update(env)
    _hide_scheduler()
    log.info(
        "the framework sees replica %d's job: process %s of %s, rendezvous %s:%s",
        replica,
        env["RANK"],
        env["WORLD_SIZE"],
        host,
        port,
    )


def _own_gpus(first: int | None = None, count: int = 1) -> None:
    """Show this process of a launcher its own GPUs only (``CUDA_VISIBLE_DEVICES``): the ``count``
    from ``first`` on (default: its own one, :func:`~lowcomm.comm.distributed.local_gpu_index`),
    modulo the GPUs it sees (more processes than GPUs share them). A framework that sees one
    process takes ``cuda:0``, and the HF Trainer wraps the model in DataParallel over every GPU it
    sees, so on a machine with 8 GPUs every replica would train on the first or on all of them;
    one that runs a replica of several processes takes ``cuda:LOCAL_RANK`` of those it sees.
    Nothing without a launcher or a GPU, or where the replica's processes here would share a GPU.
    The CUDA runtime reads the variable when it starts (``torch.cuda.is_available()`` starts it):
    if it had started, the variable is put back, the first GPU is only made current, and a warning
    says what to move."""
    import torch

    from ..comm.distributed import local_gpu_index

    first = local_gpu_index() if first is None else first
    gpus = torch.cuda.device_count() if first is not None else 0  # NVML: the runtime stays unstarted
    if not gpus:
        return
    mine = [(first + i) % gpus for i in range(count)]
    if len(set(mine)) < count:
        log.warning(
            "%d processes of this replica share this machine's %d GPUs: CUDA_VISIBLE_DEVICES is "
            "left as it is",
            count,
            gpus,
        )
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",")] if visible else []
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids[g] if g < len(ids) else str(g) for g in mine)
    # the runtime's own count (torch.cuda.is_available() reads the same): it starts the runtime
    # now, reading the variable, unless it had started before
    if torch._C._cuda_getDeviceCount() == count:
        log.info("replica on GPU %s (CUDA_VISIBLE_DEVICES)", os.environ["CUDA_VISIBLE_DEVICES"])
        return
    if visible is None:
        del os.environ["CUDA_VISIBLE_DEVICES"]
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    torch.cuda.set_device(mine[0])
    log.warning(
        "CUDA had started before replica_group() (torch.cuda.is_available() starts it), so this "
        "process sees every GPU and a framework may use the first or all of them; its own, cuda:%d, "
        "is made current: call replica_group() before anything asks about GPUs",
        mine[0],
    )


def _release(group) -> None:
    """At exit, while the interpreter is whole: close the group and drop its gloo process group
    (this module made it; nothing else holds it), whose threads, left to the interpreter's
    shutdown, can abort the process ("terminate called without an active exception")."""
    from ..comm.distributed import EXIT_DRAIN_S

    group.close(EXIT_DRAIN_S)
    group.pg = None


def outer_device(group: ReplicaGroup, model, config: DiLoCoConfig) -> DiLoCoConfig:
    """The configuration with DiLoCo's global copy kept on the CPU (pinned) when the model is on a
    GPU and the group moves tensors over gloo, unless the user chose an outer device."""
    first = next(iter(model.parameters()), None)
    if config.outer_device is None and first is not None and first.is_cuda and group.size > 1:
        return config.replace(outer_device="cpu")
    return config


#: the HF callback's file of DiLoCo's state in each of the Trainer's checkpoint folders
STATE_FILE = "diloco.pt"

HIDDEN: dict[str, str] = {}
_REPLICAS = None  # the replicas' group replica_group() joined (a job of several replicas)


def warn_if_spanning_replicas(framework: str, world_size: int, build: str) -> None:
    """Warn when a framework's trainer sees more processes than a replica has: it wrapped the model
    in DDP across the replicas (it read the launcher's RANK / WORLD_SIZE: ``replica_group()`` was
    not called before ``build``), and gradients are all-reduced every step."""
    if world_size > procs_per_replica():
        log.warning(
            "the %s sees %d processes and wraps the model in DDP: gradients are all-reduced every step "
            "across replicas, which DiLoCo is meant to avoid; call lowcomm.integrations.replica_group() "
            "before building %s",
            framework,
            world_size,
            build,
        )
