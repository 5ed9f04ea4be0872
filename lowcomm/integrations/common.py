"""What every integration needs: the replicas' group, and a launcher environment kept from the
framework (which would otherwise start data parallelism across the replicas)."""

from __future__ import annotations

import atexit
import logging
import os
from datetime import timedelta

from ..comm import LocalGroup, ReplicaGroup
from ..optim import DiLoCoConfig

__all__ = ["replica_group", "LAUNCHER_ENV", "unwrap_optimizer", "outer_device"]

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


def replica_group(hide_env: bool = True, timeout_s: float = 300.0) -> ReplicaGroup:
    """The group of this process's replica: the replicas of a ``lowcomm launch`` or torchrun job
    (one process each), or a group of one replica in a lone process.

    The group's gloo process group is built from the launcher's rendezvous without initializing
    torch.distributed's default group, and with ``hide_env`` the launcher's variables are removed
    from ``os.environ`` (their values are kept in ``lowcomm.integrations.common.HIDDEN``): Lightning,
    the HF Trainer and accelerate see one process, so they neither wrap the model in DDP nor save
    checkpoints from rank 0 only; on a machine with several GPUs the process is shown its own
    (``CUDA_VISIBLE_DEVICES``: GPU ``LOCAL_RANK``), so the framework trains on it alone. Call it
    before building the framework's trainer and before anything touches a GPU.

    Raises:
        ValueError: the job runs several processes per replica (LOWCOMM_PROCS_PER_REPLICA > 1):
            the integrations take one process per replica.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    k = int(os.environ.get("LOWCOMM_PROCS_PER_REPLICA", "1"))
    if k != 1:
        raise ValueError(
            f"LOWCOMM_PROCS_PER_REPLICA={k}: the integrations take one process per replica "
            "(launch with --procs-per-replica 1)"
        )
    if world > 1:
        import torch.distributed as dist

        from ..comm.distributed import DistributedGroup

        store, rank, size = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout_s)))
        store = dist.PrefixStore("lowcomm/replicas/", store)
        Gloo = dist.ProcessGroupGloo
        if hasattr(Gloo, "_Options"):
            opts = Gloo._Options()
            opts._timeout = timedelta(seconds=timeout_s)
            opts._devices = [Gloo.create_default_device()]
            pg = Gloo(store, rank, size, opts)
        else:
            pg = Gloo(store, rank, size, timedelta(seconds=timeout_s))
        group: ReplicaGroup = DistributedGroup(
            pg, store=store, rank=rank, size=size, name="replicas", timeout=timeout_s
        )
        log.info("replica %d of %d (gloo, from the launcher's rendezvous)", rank, size)
        atexit.register(_release, group)
    else:
        group = LocalGroup.create(1)[0]
    if hide_env:
        _own_gpu_only()  # before the variables that place this process go
        HIDDEN.update({k: os.environ.pop(k) for k in LAUNCHER_ENV if k in os.environ})
    return group


def _own_gpu_only() -> None:
    """Show this process of a launcher its own GPU only (``CUDA_VISIBLE_DEVICES``): a framework
    that sees one process takes ``cuda:0``, and the HF Trainer wraps the model in DataParallel
    over every GPU it sees, so on a machine with 8 GPUs every replica would train on the first or
    on all of them. Its GPU is ``LOCAL_RANK`` modulo the GPUs it sees (more processes than GPUs
    share them); nothing without a launcher or a GPU. The CUDA runtime reads the variable when it
    starts (``torch.cuda.is_available()`` starts it): if it had started, the variable is put back,
    the GPU is only made current, and a warning says what to move."""
    import torch

    from ..comm.distributed import local_gpu_index

    gpu = local_gpu_index()
    if gpu is None:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",")] if visible else []
    os.environ["CUDA_VISIBLE_DEVICES"] = ids[gpu] if gpu < len(ids) else str(gpu)
    # the runtime's own count (torch.cuda.is_available() reads the same): it starts the runtime
    # now, reading the variable, unless it had started before
    if torch._C._cuda_getDeviceCount() == 1:
        log.info("replica on GPU %s (CUDA_VISIBLE_DEVICES)", os.environ["CUDA_VISIBLE_DEVICES"])
        return
    if visible is None:
        del os.environ["CUDA_VISIBLE_DEVICES"]
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    torch.cuda.set_device(gpu)
    log.warning(
        "CUDA had started before replica_group() (torch.cuda.is_available() starts it), so this "
        "process sees every GPU and a framework may use the first or all of them; its own, cuda:%d, "
        "is made current: call replica_group() before anything asks about GPUs",
        gpu,
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


HIDDEN: dict[str, str] = {}


def unwrap_optimizer(optimizer):
    """The torch optimizer inside a framework's wrapper (accelerate's, Lightning's): the one whose
    step hooks fire."""
    import torch

    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer
