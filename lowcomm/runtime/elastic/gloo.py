"""Process groups of an elastic job, and giving up on a gloo call that cannot return.

Every round and every state transfer runs on a gloo group built for it from the coordinator's
TCPStore under a prefix of its own (``g{generation}/`` for a round, ``x{transfer_id}/`` for a
transfer), not registered with torch.distributed, so any number can exist side by side.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from ...comm.distributed import gloo_group

__all__ = ["Abandoned", "make_gloo_group", "run_guarded"]


class Abandoned(RuntimeError):
    """An operation on a gloo group was given up because the coordinator aborted its generation
    or a peer of it was lost."""


def make_gloo_group(store_addr: str, prefix: str, rank: int, world: int, host: str, timeout_s: float):
    """A gloo process group of ``world`` processes from a TCPStore, not registered with
    torch.distributed (so any number can exist side by side, one per generation)."""
    h, port = store_addr.rsplit(":", 1)
    store = dist.TCPStore(
        h, int(port), is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
    )
    prefixed = dist.PrefixStore(prefix, store)
    return gloo_group(prefixed, rank, world, timeout_s, host=host), prefixed


def run_guarded(fn: Callable[[], Any], abandon: Callable[[], str | None], timeout_s: float | None = None):
    """Run ``fn`` on a daemon thread; give up (Abandoned) as soon as ``abandon()`` names a reason.

    A gloo call blocked on a dead or hung peer cannot be interrupted; the thread is left behind
    and ends at gloo's own timeout, while the caller moves on at once.
    """
    box: dict[str, Any] = {}
    done = threading.Event()

    def body():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=body, daemon=True, name="lowcomm-gloo").start()
    end = None if timeout_s is None else time.monotonic() + timeout_s
    while not done.wait(0.02):
        reason = abandon()
        if reason:
            raise Abandoned(reason)
        if end is not None and time.monotonic() > end:
            raise Abandoned(f"no progress within {timeout_s}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")
