"""The worker agent: one worker's membership in an elastic job (the client side of the coordinator).

    agent = WorkerAgent("tcp://coord:29400", key, worker_id="node7")
    group = ElasticGroup(agent)
    diloco = DiLoCo(model, opt, group, ...)          # hands the configuration's fingerprint to the agent
    if not agent.start():                            # a joiner: fetch the job's state first
        agent.join(lambda state: load_job_state(diloco, group, state))
    for ...:
        ...; diloco.step()                           # may raise ResyncRequired: join again
        agent.serve_pending(snapshot)                # hand state to joiners at a quiet step

The agent heartbeats on a thread of its own (so a worker busy in a long step is not declared
dead) and learns from each reply which generations were aborted, which transfers were cancelled,
which members were lost, and which joiners it owes a state transfer.

Settings, all in one place (none needs tuning for a loopback or LAN job):
    heartbeat_s: how often the agent heartbeats (0.5 s). The coordinator declares a worker dead
        after ``clamp(5 x its observed interval, 2 s, 30 s)`` of silence.
    pg_timeout_s: gloo's own timeout (300 s): only a backstop, the coordinator's aborts come first.
    transfer_timeout_s: a state transfer that makes no progress for this long is retried from
        another donor (120 s); a donor's death is noticed within a heartbeat instead.
    coordinator_timeout_s: a worker that hears nothing from its coordinator for this long (600 s,
        torchelastic's rendezvous join timeout) while it registers, waits for a round or joins
        gives up with CoordinatorLost; a coordinator's restart takes seconds.
    The coordinator's round deadline for stragglers: ``clamp(5 x observed arrival spread, 10 s, 120 s)``.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..._checks import human_bytes
from ...comm.group import CollectiveError
from ...comm.net import address_toward, check_local_address
from ..errors import CoordinatorError, CoordinatorLost, CoordinatorRefused, CoordinatorTimeout, NotRegistered
from ..hooks import NO_FAULTS, FaultHooks
from .client import CoordinatorClient
from .gloo import make_gloo_group, run_guarded
from .transfer import ForgedStateError, recv_state, send_signed, signed

__all__ = ["WorkerAgent", "Quorum", "ResyncRequired", "default_advertise_addr"]

log = logging.getLogger(__name__)


class ResyncRequired(CollectiveError):
    """This worker fell out of the job's rounds (left out as a straggler, expired, or the
    coordinator restarted without it): fetch the state again with :meth:`WorkerAgent.join`."""


@dataclass(frozen=True)
class Quorum:
    """The coordinator's answer to a quorum request: this worker runs ``round`` at ``rank`` of
    ``world`` with ``members`` (rank order), on the store ``store`` under generation ``generation``."""

    round: int
    rank: int
    world: int
    members: tuple[str, ...]
    store: str
    generation: int
    epoch: int
    rendezvous: str  # the secret store prefix of this round's group

    @classmethod
    def from_reply(cls, body: dict) -> Quorum:
        return cls(
            round=int(body["round"]),
            rank=int(body["rank"]),
            world=int(body["world"]),
            members=tuple(str(m) for m in body["members"]),
            store=str(body["store"]),
            generation=int(body["generation"]),
            epoch=int(body["epoch"]),
            rendezvous=str(body["rendezvous"]),
        )


def default_advertise_addr(coordinator: str) -> str:
    """The address of this host on the route to the coordinator (127.0.0.1 for a local one)."""
    return address_toward(coordinator.split("//", 1)[-1].rsplit(":", 1)[0])


@dataclass
class _View:
    """What the heartbeat thread last heard from the coordinator."""

    aborted: set[int] = field(default_factory=set)  # generations
    cancelled: set[int] = field(default_factory=set)  # transfer ids
    lost: set[str] = field(default_factory=set)
    serve: list[dict] = field(default_factory=list)
    synced: bool = True
    reachable: bool = True


class WorkerAgent:
    """One worker's membership in an elastic job.

    Args:
        endpoint: the coordinator, "tcp://host:port".
        key: the job's shared secret.
        worker_id: this worker's name in the job (default: hostname-pid).
        advertise_addr: the address peers use to reach this worker (gloo and state transfers);
            default: this host's address on the route to the coordinator.
        heartbeat_s, pg_timeout_s, transfer_timeout_s, coordinator_timeout_s: see the module's
            settings.
        record: ``record(kind, **fields)`` receives membership events (rounds redone, transfers).
        hooks: fault hooks (partitions from the coordinator, deaths during a state transfer).
    """

    def __init__(
        self,
        endpoint: str,
        key: bytes,
        worker_id: str | None = None,
        advertise_addr: str | None = None,
        *,
        heartbeat_s: float = 0.5,
        pg_timeout_s: float = 300.0,
        transfer_timeout_s: float = 120.0,
        coordinator_timeout_s: float = 600.0,
        record: Callable[..., None] | None = None,
        hooks: FaultHooks = NO_FAULTS,
    ) -> None:
        if not heartbeat_s > 0:
            raise ValueError(f"heartbeat_s must be > 0, got {heartbeat_s!r}")
        if not coordinator_timeout_s > 0:
            raise ValueError(f"coordinator_timeout_s must be > 0 (seconds), got {coordinator_timeout_s!r}")
        self.coordinator_timeout_s = coordinator_timeout_s
        self._clients: list[CoordinatorClient] = []  # every client's last reply counts as heard
        self._waiting_since = time.monotonic()  # until the first reply
        self.endpoint, self.key, self.hooks = endpoint, key, hooks
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        if advertise_addr:  # another machine's: every round of the job failed, twice a second, for ever
            check_local_address("advertise_addr", advertise_addr)
        self.advertise_addr = advertise_addr or default_advertise_addr(endpoint)
        self.heartbeat_s, self.pg_timeout_s, self.transfer_timeout_s = (
            heartbeat_s,
            pg_timeout_s,
            transfer_timeout_s,
        )
        self.incarnation = uuid.uuid4().hex[:16]
        self.record = record or (lambda kind, **f: None)
        self.fingerprint = ""
        self.step = 0
        self.next_round = 0
        self.synced = True
        self.view = _View()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._hb_thread: threading.Thread | None = None
        self._registered = False
        # a refusal of re-registration that will not change (the job finished, another key or
        # configuration): the rounds' thread raises it instead of waiting to be registered again
        self._refused: CoordinatorRefused | None = None
        self._main = self._client("main")
        self._rpc = self._client("rpc")
        self._done_transfers: set[int] = set()

    def _client(self, role: str) -> CoordinatorClient:
        client = CoordinatorClient(
            self.endpoint,
            self.key,
            f"{self.worker_id}/{role}",
            timeout_s=5.0,
            blocked=functools.partial(self.hooks.partitioned_from, "coordinator"),
        )
        self._clients.append(client)
        return client

    def silent_for(self) -> float:
        """Seconds since any of this worker's clients last heard the coordinator (a refusal counts:
        it answered), or since :meth:`start` began waiting for it."""
        heard = [c.last_reply_at for c in self._clients if c.last_reply_at is not None]
        return time.monotonic() - max(heard, default=self._waiting_since)

    def _coordinator_gone(self) -> bool:
        return self.silent_for() > self.coordinator_timeout_s

    def _lost_coordinator(self) -> CoordinatorLost:
        return CoordinatorLost(
            f"no reply from the coordinator at {self.endpoint} for {self.silent_for():.0f} s "
            f"(coordinator_timeout {self.coordinator_timeout_s:g} s): it is down or cut off from "
            "this worker; this worker gives up (its checkpoint, if any, resumes with --resume auto)"
        )

    def set_fingerprint(self, fingerprint: str) -> None:
        """The configuration's fingerprint, sent when registering (the coordinator refuses workers
        whose fingerprint differs from the job's).

        Raises:
            RuntimeError: after :meth:`start`: the registration has gone without it.
        """
        if self._registered:
            raise RuntimeError(
                f"{self.worker_id}: the configuration was given after the agent registered; build "
                "DiLoCo (which hands it over) before agent.start()"
            )
        self.fingerprint = fingerprint

    # ---- registration and heartbeats ------------------------------------------------------------

    def _register(self, client: CoordinatorClient) -> bool:
        body = {
            "worker_id": self.worker_id,
            "advertise_addr": self.advertise_addr,
            "step": self.step,
            "incarnation": self.incarnation,
            "fingerprint": self.fingerprint,
            "synced": self.synced,
            "round": self.next_round,
            # a claim of a round past 0 is backed by state this worker holds (its checkpoint, or
            # what it kept through a coordinator restart)
            "holds_state": self.synced and self.next_round > 0,
        }
        reply = client.request("register", body).body
        with self._lock:
            self.synced = self.synced and reply["synced"]
            self.view.synced = reply["synced"]
        self._registered = True
        return reply["synced"]

    def start(self, fresh: bool = True) -> bool:
        """Register (waiting for the coordinator as long as it takes) and start heartbeating.

        Returns whether this worker is in sync with the job (a fresh job's first members are);
        if not, call :meth:`join` before training.

        Raises:
            CoordinatorRefused: the coordinator refused this worker (another configuration, ...).
            CoordinatorLost: no reply for ``coordinator_timeout_s``.
        """
        self.synced = fresh
        self._waiting_since = time.monotonic()
        while True:
            try:
                synced = self._register(self._main)
                break
            except CoordinatorTimeout:
                if self._coordinator_gone():
                    raise self._lost_coordinator() from None
                log.warning(
                    "coordinator at %s does not answer yet; retrying (for up to %g s in all)",
                    self.endpoint,
                    self.coordinator_timeout_s,
                )
        self.record("membership", what="registered", synced=synced, worker=self.worker_id)
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, daemon=True, name="lowcomm-heartbeat")
        self._hb_thread.start()
        return synced

    def _heartbeat_loop(self) -> None:
        client = self._client("hb")
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._heartbeat_once(client)
            except Exception as e:  # the heartbeat thread never dies of one bad reply
                log.error("%s: heartbeat error: %r", self.worker_id, e)
        client.close()

    def _heartbeat_once(self, client: CoordinatorClient) -> None:
        try:
            reply = client.request(
                "heartbeat",
                {"worker_id": self.worker_id, "step": self.step, "round": self.next_round},
                timeout_s=max(2.0, 2 * self.heartbeat_s),
            ).body
        except NotRegistered:  # a restarted coordinator, or we were expired
            log.warning("%s: the coordinator does not know this worker; registering again", self.worker_id)
            try:
                synced = self._register(client)
                self.record("membership", what="re-registered", synced=synced, worker=self.worker_id)
            except NotRegistered as e:
                log.warning("re-registration failed: %s", e)
            except CoordinatorRefused as e:
                log.warning("re-registration refused: %s", e)
                self._refused = e
                self._stop.set()  # nothing to heartbeat for
            except CoordinatorError as e:
                log.warning("re-registration failed: %s", e)
            return
        except CoordinatorError as e:
            if self.view.reachable:
                log.warning("%s: heartbeat failed: %s", self.worker_id, e)
            self.view.reachable = False
            return
        lost = {str(w) for w in reply["lost"]}
        for w in sorted(lost - self.view.lost - {self.worker_id}):  # died, hung, cut off or left
            self.record("membership", what="lost", worker=w)
        with self._lock:
            self.view.reachable = True
            self.view.aborted.update(int(g) for g in reply["aborted"])
            self.view.cancelled.update(int(t) for t in reply["cancelled"])
            self.view.lost = lost
            self.view.serve = [
                t
                for t in reply["serve"]
                if isinstance(t, dict) and t.get("transfer_id") not in self._done_transfers
            ]
            self.view.synced = bool(reply["synced"])

    def close(self, leave: bool = True, finished: bool = False) -> None:
        """Stop heartbeating; with ``leave``, tell the coordinator this worker is gone (``finished``:
        it reached the job's last step)."""
        self._stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join(5)
        if leave and not self._main.key_rejected:  # (a coordinator of another key cannot hear it)
            try:
                self._main.request(
                    "leave", {"worker_id": self.worker_id, "finished": finished}, timeout_s=2.0
                )
            except CoordinatorError as e:
                log.info("leave not acknowledged: %s", e)
        self._main.close()
        self._rpc.close()

    def is_aborted(self, generation: int) -> bool:
        with self._lock:
            return generation in self.view.aborted

    def is_cancelled(self, transfer_id: int) -> bool:
        with self._lock:
            return transfer_id in self.view.cancelled

    def lost(self, worker: str) -> bool:
        with self._lock:
            return worker in self.view.lost

    # ---- rounds (driver thread) --------------------------------------------------------------------

    def _await_registration(self) -> None:
        """After a NotRegistered reply (a restarted coordinator, or this worker expired): raise the
        re-registration's refusal if it was refused for good, else wait a heartbeat, in which the
        heartbeat thread registers this worker again, for the caller to ask again."""
        if self._refused is not None:
            raise self._refused from None
        time.sleep(self.heartbeat_s)

    def _rpc_call(self, kind: str, body: dict, match, cancel=None):
        """A long-poll on the rounds' client; while the coordinator does not know this worker (it
        restarted), wait for the heartbeat thread to register again and ask again.

        Raises:
            CoordinatorRefused: the heartbeat thread's re-registration was refused for good
                (JobFinished when the job finished meanwhile).
            CoordinatorLost: nothing heard from the coordinator for ``coordinator_timeout_s``.
        """

        def stop() -> bool:
            return (cancel is not None and cancel()) or self._coordinator_gone()

        while True:
            try:
                reply = self._rpc.call(kind, body, match=match, cancel=stop)
            except NotRegistered:
                self._await_registration()
                continue
            if reply is None and not (cancel is not None and cancel()):
                raise self._lost_coordinator()
            return reply

    def quorum(self, rnd: int, cancel: Callable[[], bool] | None = None) -> Quorum | None:
        """Wait for the quorum of round ``rnd`` (None once ``cancel()`` is true).

        Raises:
            ResyncRequired: this worker is out of sync and must fetch the state.
        """
        reply = self._rpc_call(
            "quorum",
            {"worker_id": self.worker_id, "round": rnd},
            lambda r: r.type == "quorum_reply" and r.body["round"] == rnd,
            cancel,
        )
        if reply is None:
            return None
        if reply.body["action"] == "resync":
            with self._lock:
                self.synced = False
            raise ResyncRequired(f"{self.worker_id} is out of sync at round {rnd}; it must fetch the state")
        return Quorum.from_reply(reply.body)

    def commit(self, rnd: int, generation: int, ok: bool, members, suspects=()) -> bool:
        """Report the outcome of a round; returns the coordinator's decision (True = committed)."""
        body = {
            "worker_id": self.worker_id,
            "round": rnd,
            "generation": generation,
            "ok": ok,
            "members": list(members),
            "suspects": list(suspects),
        }
        reply = self._rpc_call(
            "commit", body, lambda r: r.type == "decision" and r.body["generation"] == generation
        )
        return bool(reply.body["commit"])

    # ---- state transfer (main thread) ---------------------------------------------------------------

    def join(self, load: Callable[[Any], None]) -> dict:
        """Fetch the job's state from a live member and hand it to ``load``; retries other donors.

        Returns facts about the transfer (donor, seconds, attempts, transfer id).

        A coordinator that does not know this worker (it restarted meanwhile) is asked again once
        the heartbeat thread has registered the worker again, as the rounds' calls are.

        Raises:
            JobFinished: the job's workers finished and left: there is nothing to join.
            CoordinatorRefused: the re-registration was refused for good.
            CoordinatorLost: nothing heard from the coordinator for ``coordinator_timeout_s``.
        """
        failed: list[str] = []
        attempts = 0
        while True:
            try:
                reply = self._main.call(
                    "join",
                    {"worker_id": self.worker_id, "failed": failed[-64:]},
                    match=lambda r: r.type == "join_reply",
                    cancel=self._coordinator_gone,
                )
            except NotRegistered:  # a restarted coordinator (a chaos run's joiner met one and exited)
                self._await_registration()
                continue
            attempts += 1
            if reply is None:
                raise self._lost_coordinator()
            b = reply.body
            donor, tid = b["donor"], b["transfer_id"]
            t0 = time.perf_counter()
            self.record("transfer", what="start", donor=donor, transfer_id=tid, attempt=attempts)
            try:
                state = self._over_transfer_group(
                    b["store"], b["rendezvous"], tid, 1, donor, lambda pg: recv_state(pg, 0, self.key)
                )
            except ForgedStateError as e:  # someone without the job key reached the transfer
                log.error(
                    "%s: refused a state transfer claiming to come from %s: %s", self.worker_id, donor, e
                )
                self.record("transfer", what="forged", donor=donor, transfer_id=tid, reason=str(e)[:300])
                self._report_transfer(tid, self.worker_id, ok=False)
                failed.append(donor)
                continue
            except Exception as e:
                log.warning(
                    "%s: state transfer from %s failed (%s); asking for another donor",
                    self.worker_id,
                    donor,
                    e,
                )
                self.record("transfer", what="failed", donor=donor, transfer_id=tid, reason=str(e)[:300])
                self._report_transfer(tid, self.worker_id, ok=False)  # the donor stops waiting for us
                failed.append(donor)
                # back off: when every donor failed (this worker is cut off, say) they are tried again
                time.sleep(min(0.25 * 2 ** (len(failed) - 1), 2.0))
                continue
            seconds = time.perf_counter() - t0
            load(state)
            with self._lock:
                self.synced = True
            info = {"donor": donor, "seconds": seconds, "attempts": attempts, "transfer_id": tid}
            self.record("transfer", what="received", **info)
            log.info(
                "%s: in sync with the job: its state from %s in %.2f s (attempt %d)",
                self.worker_id,
                donor,
                seconds,
                attempts,
            )
            return info

    def _over_transfer_group(
        self, store: str, rendezvous: str, tid: int, rank: int, peer: str, work: Callable[[Any], Any]
    ):
        """Run ``work(pg)`` on the two-process group of transfer ``tid`` (donor rank 0, joiner rank
        1; found on the store under the secret ``rendezvous``), given up as soon as ``peer`` is
        lost, the coordinator cancels the transfer (the other side gave up on it), or after
        ``transfer_timeout_s``."""

        def body():
            # fault hooks: a joiner's before it connects, a donor's once connected (a death mid-transfer)
            if rank == 1:
                self.hooks.during_transfer("joiner")
            pg, _ = make_gloo_group(store, f"x{rendezvous}/", rank, 2, self.advertise_addr, self.pg_timeout_s)
            if rank == 0:
                self.hooks.during_transfer("donor")
            return work(pg)

        def abandon() -> str | None:
            if self.lost(peer):
                return f"{'donor' if rank else 'joiner'} {peer} was lost"
            if self.is_cancelled(tid):
                return f"transfer {tid} was given up by {'the donor' if rank else 'the joiner'} {peer}"
            return None

        return run_guarded(body, abandon, self.transfer_timeout_s)

    def serve_pending(self, snapshot: Callable[[], Any]) -> int:
        """Send the state to every joiner this worker owes one; call at a step with no round in flight.

        Returns the number of transfers served.
        """
        with self._lock:
            todo = list(self.view.serve)
            self.view.serve = []
        served = 0
        for t in todo:
            tid, joiner = int(t["transfer_id"]), str(t["joiner"])
            if tid in self._done_transfers or self.is_cancelled(tid):  # the joiner gave up on it
                continue
            self._done_transfers.add(tid)
            try:
                header, tensors, nbytes = signed(snapshot())  # (the live tensors: sent before the next step)
            except (TypeError, ValueError) as e:  # every donor's would fail alike: not a reason to stop
                log.error("%s: cannot send its state to %s: %s", self.worker_id, joiner, e)
                self.record("transfer", what="served", joiner=joiner, transfer_id=tid, ok=False, error=str(e))
                self._report_transfer(tid, joiner, False)
                continue
            t0 = time.perf_counter()
            try:
                ok = self._over_transfer_group(
                    str(t["store"]),
                    str(t["rendezvous"]),
                    tid,
                    0,
                    joiner,
                    functools.partial(
                        send_signed, header=header, tensors=tensors, nbytes=nbytes, key=self.key
                    ),
                )
            except Exception as e:
                log.warning("%s: transfer %d to %s failed: %s", self.worker_id, tid, joiner, e)
                ok = False
            seconds = time.perf_counter() - t0
            if ok:
                log.info(
                    "%s: sent the job's state to %s (%s, %.2f s)",
                    self.worker_id,
                    joiner,
                    human_bytes(len(header) + nbytes),
                    seconds,
                )
            self.record(
                "transfer",
                what="served",
                joiner=joiner,
                transfer_id=tid,
                ok=ok,
                bytes=len(header) + nbytes,
                seconds=seconds,
            )
            self._report_transfer(tid, joiner, bool(ok))
            served += int(bool(ok))
        return served

    def _report_transfer(self, tid: int, joiner: str, ok: bool) -> None:
        """Tell the coordinator how transfer ``tid`` ended: a donor's success makes the joiner
        synced; a failure on either side cancels the transfer, so the other side stops waiting."""
        try:
            self._main.request(
                "transfer_done",
                {
                    "worker_id": self.worker_id,
                    "joiner": joiner,
                    "transfer_id": tid,
                    "ok": ok,
                    "round": self.next_round,
                    "step": self.step,
                },
            )
        except CoordinatorError as e:
            log.warning("transfer_done not acknowledged: %s", e)
