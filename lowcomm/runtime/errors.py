"""The runtime's typed errors and the exit codes every command shares.

Decisions are taken on types, never on an exception's text: a client that gets no reply raises
:class:`CoordinatorTimeout`, a refusal carries the coordinator's machine-readable ``code`` and
becomes the matching subclass of :class:`CoordinatorRefused`, and a process reports how it ended
with an :class:`ExitCode` that the chaos runner and the tests read back.
"""

from __future__ import annotations

import enum

__all__ = [
    "ExitCode",
    "CoordinatorError",
    "CoordinatorTimeout",
    "CoordinatorLost",
    "CoordinatorRefused",
    "NotRegistered",
    "JobFinished",
    "KeyRejected",
    "ConfigurationRejected",
    "Stopped",
    "refusal",
    "REFUSAL_CODES",
]


class ExitCode(enum.IntEnum):
    """How a ``lowcomm`` process ended."""

    OK = 0
    #: the run failed (a peer, the coordinator or the code gave up); the records say where
    FAILED = 1
    #: bad input (a configuration value, a flag, a file): one line on stderr, nothing started
    USAGE = 2
    #: an elastic worker started after its job's last step: there is nothing left to join
    JOB_FINISHED = 3
    #: interrupted by the user (SIGINT)
    INTERRUPTED = 130
    #: terminated (SIGTERM, as a scheduler stops a job): ``lowcomm launch`` stopped its processes too
    TERMINATED = 143


class CoordinatorError(RuntimeError):
    """The coordinator could not serve a request (base of the errors below)."""


class CoordinatorTimeout(CoordinatorError):
    """No reply from the coordinator in time (it is down, restarting, or cut off from us)."""


class CoordinatorLost(CoordinatorTimeout):
    """Nothing heard from the coordinator for the worker's whole ``coordinator_timeout``: the
    worker gives up on the job (a restart of the coordinator takes far less; see docs/elastic.md)."""


class CoordinatorRefused(CoordinatorError):
    """The coordinator answered with a refusal; ``code`` says which kind (see REFUSAL_CODES)."""

    code = "refused"


class NotRegistered(CoordinatorRefused):
    """The coordinator does not know this worker (it restarted, or expired the worker): register again."""

    code = "not_registered"


class JobFinished(CoordinatorRefused):
    """The job's workers reached the last step and left: a late joiner has nothing to join."""

    code = "job_finished"


class KeyRejected(CoordinatorRefused):
    """The coordinator could not verify our signature: this process holds another job's key."""

    code = "bad_key"


class ConfigurationRejected(CoordinatorRefused):
    """This worker's model, schedule, codec or fragments differ from the job's (bad input)."""

    code = "configuration"


class Stopped(Exception):
    """A run asked to stop (``train(stop=...)``; SIGTERM to ``lowcomm train``) ended at the end of
    step ``step``, before its last: its records are closed (no summary), its checkpoint at
    ``step`` is at ``checkpoint`` when it writes checkpoints (None otherwise), and an elastic
    worker has left its job. ``apart``: why a process of a static job stopped without the job's
    other processes, and so without a checkpoint of the step (some are gone, ``lost``; the job's
    store did not answer); None when they stopped together."""

    def __init__(self, step: int, checkpoint: str | None = None, lost=(), apart: str | None = None) -> None:
        self.step, self.checkpoint, self.lost, self.apart = step, checkpoint, list(lost), apart
        where = f"; its checkpoint is {checkpoint}" if checkpoint else ""
        if apart:
            where += f" without the job's other processes ({apart})"
        super().__init__(f"stopped at the end of step {step}{where}")


REFUSAL_CODES: dict[str, type[CoordinatorRefused]] = {
    c.code: c for c in (CoordinatorRefused, NotRegistered, JobFinished, KeyRejected, ConfigurationRejected)
}


def refusal(code: str, reason: str) -> CoordinatorRefused:
    """The exception for a refusal reply (an unknown code is a plain refusal)."""
    return REFUSAL_CODES.get(code, CoordinatorRefused)(reason)
