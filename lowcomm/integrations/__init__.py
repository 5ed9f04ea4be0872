"""DiLoCo inside the trainers people already use. Each module imports its framework on use.

    from lowcomm.integrations import replica_group
    from lowcomm.integrations.lightning import DiLoCoCallback     # Lightning
    from lowcomm.integrations.hf import DiLoCoTrainerCallback     # Hugging Face Trainer
    from lowcomm.integrations.titan import diloco_from_toml       # a torchtitan-style [diloco] table

Under ``lowcomm launch`` or torchrun, call :func:`replica_group` before building the framework's
trainer: it joins the replicas' group from the launcher's environment, then hides that
environment, so the framework sees one process and does not wrap the model in DDP (which would
all-reduce gradients every step and make DiLoCo pointless). With several processes a replica
(``--procs-per-replica k``) it rewrites that environment to the replica's own job instead: the
framework's DDP runs inside the replica, DiLoCo between the replicas. :func:`resume_checkpoint`
picks the checkpoint each replica resumes from: the newest step every replica holds.
"""

from .common import replica_group, resume_checkpoint

__all__ = ["replica_group", "resume_checkpoint"]
