"""Elastic jobs: the coordinator (rules in ``state``, sockets in ``server``), its wire protocol,
the worker agent and the ElasticGroup over it, state transfers and worker checkpoints.

Needs pyzmq and msgpack (``pip install lowcomm[elastic]``); nothing else of lowcomm imports this
package until an elastic job starts.
"""

from .agent import Quorum, ResyncRequired, WorkerAgent, default_advertise_addr
from .checkpoint import job_state, load_job_state, read_checkpoint, write_checkpoint
from .client import CoordinatorClient
from .gloo import Abandoned
from .group import ContributionDropped, ElasticGroup
from .localjob import LocalJob, pace
from .membership import Deadline, Membership
from .protocol import ProtocolError, load_key, new_key
from .server import Coordinator
from .state import CoordinatorState, Outgoing, RoundDeadline
from .transfer import CorruptStateError, load_state, save_state

__all__ = [
    "Abandoned",
    "ContributionDropped",
    "Coordinator",
    "CoordinatorClient",
    "CoordinatorState",
    "CorruptStateError",
    "Deadline",
    "ElasticGroup",
    "LocalJob",
    "Membership",
    "Outgoing",
    "ProtocolError",
    "Quorum",
    "ResyncRequired",
    "RoundDeadline",
    "WorkerAgent",
    "default_advertise_addr",
    "job_state",
    "load_job_state",
    "load_key",
    "load_state",
    "new_key",
    "pace",
    "read_checkpoint",
    "save_state",
    "write_checkpoint",
]
