"""Elastic jobs: the coordinator (rules in ``state``, sockets in ``server``), its wire protocol,
the worker agent and the ElasticGroup over it, state transfers and worker checkpoints.

Needs pyzmq and msgpack (``pip install lowcomm[elastic]``); nothing else of lowcomm imports this
package until an elastic job starts.
"""

from ..._lazy import lazy_names

# imported on first use (lowcomm/_lazy.py): `lowcomm keys` and `lowcomm status` load no torch
__getattr__, __dir__, __all__ = lazy_names(
    __name__,
    {
        ".agent": ("Quorum", "ResyncRequired", "WorkerAgent", "default_advertise_addr"),
        ".checkpoint": ("job_state", "load_job_state", "read_checkpoint", "write_checkpoint"),
        ".client": ("CoordinatorClient",),
        ".gloo": ("Abandoned",),
        ".group": ("ContributionDropped", "ElasticGroup"),
        ".localjob": ("LocalJob", "pace"),
        ".membership": ("Deadline", "Membership"),
        ".protocol": ("ProtocolError", "load_key", "new_key"),
        ".server": ("Coordinator",),
        ".state": ("CoordinatorState", "Outgoing", "RoundDeadline"),
        ".transfer": ("CorruptStateError", "load_state", "save_state"),
    },
)
