"""``lowcomm launch``: a static multi-process job on this machine, like ``torchrun --standalone``.

``lowcomm launch --replicas M --procs-per-replica k -- CMD ...`` starts ``M·k`` processes of
``CMD`` with torchrun's variables set (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR=127.0.0.1, MASTER_PORT) plus LOWCOMM_PROCS_PER_REPLICA; when one fails the others
are stopped and its exit code is returned.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

from ..._checks import refuse
from ..errors import ExitCode
from ..net import free_port

__all__ = ["launch"]

log = logging.getLogger(__name__)


def launch(
    command: list[str],
    replicas: int,
    procs_per_replica: int = 1,
    *,
    port: int | None = None,
    grace_s: float = 5.0,
) -> int:
    """Run ``replicas · procs_per_replica`` copies of ``command`` on this machine; returns an exit code.

    Raises:
        ValueError: counts below 1, a port outside 0-65535 or an empty command.
    """
    if not command:
        raise ValueError("launch needs a command after '--'")
    if replicas < 1 or procs_per_replica < 1:
        raise ValueError(f"replicas={replicas} and procs_per_replica={procs_per_replica} must be >= 1")
    if port is not None and not 0 <= port <= 65535:
        raise refuse("port", port, "a TCP port, 1-65535, or 0 for a free one (the default)")
    world = replicas * procs_per_replica
    port = port or free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "LOWCOMM_PROCS_PER_REPLICA": str(procs_per_replica),
        }
        procs.append(subprocess.Popen(command, env=env))
    running = dict(enumerate(procs))
    code = 0
    try:
        while running:
            for rank, p in list(running.items()):
                rc = p.poll()
                if rc is None:
                    continue
                del running[rank]
                if rc != 0 and code == 0:
                    code = rc
                    log.error("rank %d exited with code %d; stopping the other ranks", rank, rc)
                    _stop(list(running.values()), grace_s)
            time.sleep(0.05)
    except KeyboardInterrupt:
        _stop(list(running.values()), grace_s)
        return ExitCode.INTERRUPTED
    return code


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.time(), 0.01))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
