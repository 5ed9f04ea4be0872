"""What a joiner receives and what a worker checkpoints: the job's state around a DiLoCo wrapper.

A *job state* (:func:`job_state`) is what every synced member holds alike: the DiLoCo state
(global fragments, outer momentum, step, error-feedback buffers; nothing in flight), the next
round and the reduce time its sender observed. A joiner continues from a donor's with
:func:`load_job_state`. A *worker checkpoint* adds what is the worker's own (its model, inner
optimizer, data position) so that a job that lost every worker resumes bit for bit;
:func:`write_checkpoint` and :func:`read_checkpoint` keep it on disk in the format of
:mod:`~lowcomm.runtime.elastic.transfer` (atomic, checksummed, never pickled).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .transfer import CorruptStateError, load_state, save_state

if TYPE_CHECKING:
    from .group import ElasticGroup

__all__ = [
    "CHECKPOINT_NAME",
    "WORKER_FORMAT",
    "job_state",
    "load_job_state",
    "read_checkpoint",
    "write_checkpoint",
]

#: a worker's checkpoint file in its run directory
CHECKPOINT_NAME = "checkpoint.lcs"
WORKER_FORMAT = "lowcomm-worker/1"


def job_state(diloco, group: ElasticGroup) -> dict:
    """What a joiner receives from its donor: the DiLoCo state (global fragments, outer momentum,
    step, error-feedback buffers, nothing in flight) and the next round. Take it at a step with no
    round in flight (``diloco.in_flight == 0``); add what else the joiner should get."""
    # (with the reduce time the donor observed, so the receiver's first round has a deadline)
    return {
        "diloco": diloco.state_dict(compact=True),
        "round": group.next_round,
        "collective_s": group.collective_s,
    }


def load_job_state(diloco, group: ElasticGroup, state: dict, *, joiner: bool = True) -> None:
    """Continue from ``state`` (a donor's :func:`job_state`, or this worker's own checkpoint).

    As a joiner (the default) the error-feedback residuals are zeroed, since a copy of the donor's
    would count its quantization error twice, and the local parameters are set to the global
    ones, so the first pseudo-gradient holds only this worker's own progress. Queued rounds are
    dropped and the agent's step set to the state's.
    """
    group.reset(int(state["round"]))
    group.adopt_collective_s(state.get("collective_s"))  # (a state of an older lowcomm has none)
    diloco.load_state_dict(state["diloco"], own=not joiner)  # (the donor's: residuals zeroed, local = global)
    group.agent.step = diloco.step_count


def write_checkpoint(path: str | Path, state: dict[str, Any], *, opener=None) -> int:
    """Write a worker checkpoint (a job state plus the worker's own parts) atomically, owner-only;
    returns its bytes. ``opener``: see :func:`~lowcomm.runtime.elastic.transfer.save_state`."""
    kw = {"opener": opener} if opener is not None else {}
    return save_state(path, {**state, "format": WORKER_FORMAT}, **kw)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a worker checkpoint.

    Raises:
        CorruptStateError: the file is damaged, truncated or not a lowcomm worker checkpoint.
    """
    state = load_state(path)
    if not isinstance(state, dict) or state.get("format") != WORKER_FORMAT:
        raise CorruptStateError(f"{path}: not a lowcomm worker checkpoint")
    return state
