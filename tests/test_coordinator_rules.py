"""The coordinator's rules as plain function calls: CoordinatorState with a hand-driven clock.

No socket and no process: each test feeds requests and the passing of time, and checks the
messages the state returns. The live-process tests (test_control_plane.py, test_elastic.py) run
the same rules through the server.
"""

import itertools

import pytest

from lowcomm.runtime.elastic.membership import Deadline
from lowcomm.runtime.elastic.state import CoordinatorState, RoundDeadline

STORE = "127.0.0.1:1234"


class Sim:
    """A coordinator state, a clock, and the replies each worker received (reply address = worker id)."""

    def __init__(self, **kw):
        kw.setdefault("deadline", Deadline(floor=2.0, ceiling=4.0))
        kw.setdefault("round_deadline", RoundDeadline(floor=10.0, ceiling=20.0))
        self.now = 0.0
        count = itertools.count()
        kw.setdefault("nonce", lambda: f"n{next(count)}")  # rendezvous names, predictable in tests
        self.state = CoordinatorState("job", STORE, now=self.now, generation=1000, **kw)
        self.inbox: dict[str, list[tuple[str, dict]]] = {}

    def _deliver(self, out):
        for o in out:
            self.inbox.setdefault(o.to, []).append((o.kind, o.body))

    def send(self, who: str, kind: str, **body) -> None:
        self._deliver(self.state.handle(kind, body, who, self.now))

    def tick(self, dt: float = 0.0) -> None:
        self.now += dt
        self._deliver(self.state.tick(self.now))

    def advance(self, seconds: float, alive=(), rnd: int = 0) -> None:
        """Let ``seconds`` pass in half-second ticks; the ``alive`` workers heartbeat at each."""
        for _ in range(round(seconds / 0.5)):
            for w in alive:
                self.send(w, "heartbeat", worker_id=w, step=0, round=rnd)
                self.take_kind(w, "heartbeat_reply")
            self.tick(0.5)

    def take_kind(self, who: str, kind: str) -> None:
        """Drop ``who``'s replies of ``kind``, keep the others."""
        self.inbox[who] = [m for m in self.inbox.get(who, []) if m[0] != kind]

    def take(self, who: str) -> list[tuple[str, dict]]:
        return self.inbox.pop(who, [])

    def last(self, who: str, kind: str | None = None) -> dict:
        msgs = [b for k, b in self.take(who) if kind is None or k == kind]
        assert msgs, f"{who} received no {kind or 'reply'}"
        return msgs[-1]

    def register(self, w: str, **kw) -> dict:
        self.send(w, "register", worker_id=w, advertise_addr="127.0.0.1", step=0, **kw)
        return self.last(w, "register_reply")

    def beat(self, *workers: str, rnd: int = 0) -> dict:
        for w in workers:
            self.send(w, "heartbeat", worker_id=w, step=0, round=rnd)
        return {w: self.last(w, "heartbeat_reply") for w in workers}

    def ask(self, w: str, rnd: int) -> None:
        self.send(w, "quorum", worker_id=w, round=rnd)

    def commit(self, w: str, rnd: int, gen: int, ok: bool = True, members=(), suspects=()) -> None:
        self.send(
            w,
            "commit",
            worker_id=w,
            round=rnd,
            generation=gen,
            ok=ok,
            members=list(members),
            suspects=list(suspects),
        )


def _quorum(sim: Sim, workers, rnd: int) -> dict[str, dict]:
    for w in workers:
        sim.ask(w, rnd)
    return {w: sim.last(w, "quorum_reply") for w in workers}


def test_a_quorum_forms_once_every_synced_member_asked_with_ranks_by_worker_id():
    sim = Sim()
    for w in ("c", "a", "b"):  # join order is not rank order
        assert sim.register(w)["synced"]
    sim.ask("c", 0)
    sim.ask("a", 0)
    assert sim.take("a") == [] and sim.take("c") == []  # b has not asked
    sim.ask("b", 0)
    replies = {w: sim.last(w, "quorum_reply") for w in "abc"}
    assert {w: r["rank"] for w, r in replies.items()} == {"a": 0, "b": 1, "c": 2}
    assert all(r["members"] == ["a", "b", "c"] and r["world"] == 3 for r in replies.values())
    assert len({r["generation"] for r in replies.values()}) == 1 and replies["a"]["generation"] > 1000
    assert all(r["action"] == "run" and r["store"] == STORE for r in replies.values())
    assert {r["rendezvous"] for r in replies.values()} == {"n0"}  # one secret name for the group


def test_the_first_round_waits_for_min_workers():
    sim = Sim(min_workers=2)
    sim.register("a")
    sim.ask("a", 0)
    sim.advance(60.0, alive="a")  # however long: no round deadline before the job has its workers
    assert sim.take("a") == []
    sim.register("b")
    sim.ask("b", 0)
    assert sim.last("a", "quorum_reply")["world"] == 2


def test_a_round_is_committed_only_when_every_member_reported_success():
    sim = Sim()
    for w in "ab":
        sim.register(w)
    gen = _quorum(sim, "ab", 0)["a"]["generation"]
    sim.commit("a", 0, gen, members="ab")
    assert sim.take("a") == []  # waits for b
    sim.commit("b", 0, gen, members="ab")
    assert sim.last("a", "decision") == {"round": 0, "generation": gen, "commit": True}
    assert sim.last("b", "decision")["commit"] is True
    assert sim.state.committed == 0
    sim.ask("a", 0)  # a round already committed: whoever asks for it again is out of sync
    assert sim.last("a", "quorum_reply")["action"] == "resync"


def test_a_failed_member_aborts_the_round_for_everyone():
    sim = Sim()
    for w in "abc":
        sim.register(w)
    gen = _quorum(sim, "abc", 0)["a"]["generation"]
    sim.commit("a", 0, gen, members="abc")  # a succeeded and waits
    sim.commit("b", 0, gen, ok=False, members="abc")
    assert sim.last("b", "decision")["commit"] is False
    assert sim.last("a", "decision")["commit"] is False  # the waiter is told at once
    sim.commit("c", 0, gen, members="abc")  # a late success changes nothing
    assert sim.last("c", "decision")["commit"] is False
    assert gen in sim.beat("c")["c"]["aborted"] and sim.state.committed == -1


def test_a_dead_member_aborts_its_undecided_round_and_is_reported_lost():
    sim = Sim()
    for w in "abc":
        sim.register(w)
    gen = _quorum(sim, "abc", 0)["a"]["generation"]
    sim.commit("a", 0, gen, members="abc")
    sim.tick(1.0)
    sim.beat("a", "b")
    sim.tick(3.5)  # c has been silent for 4.5 s > its 4 s deadline (no heartbeat history: the ceiling)
    assert sim.last("a", "decision")["commit"] is False
    hb = sim.beat("a")["a"]
    assert gen in hb["aborted"] and hb["lost"] == ["c"]
    assert [m.worker_id for m in sim.state.membership.members] == ["a", "b"]
    again = _quorum(sim, "ab", 0)  # the survivors redo the round, without c
    assert again["a"]["members"] == ["a", "b"] and again["a"]["generation"] > gen


def test_a_straggler_past_the_round_deadline_is_left_out_and_must_resync():
    sim = Sim(round_deadline=RoundDeadline(floor=10.0, ceiling=10.0))
    for w in "abc":
        sim.register(w)
    sim.ask("a", 0)
    sim.ask("b", 0)
    sim.advance(5.0, alive="abc")
    sim.ask("a", 0)  # a re-sent ask keeps its first arrival time
    sim.advance(4.5, alive="abc")
    assert sim.take("a") == []  # 9.5 s: within the 10 s deadline
    sim.advance(1.0, alive="abc")  # 10.5 s after the first ask
    assert sim.last("a", "quorum_reply")["members"] == ["a", "b"]
    assert sim.state.membership.get("c").synced is False
    sim.ask("c", 0)
    assert sim.last("c", "quorum_reply")["action"] == "resync"


def test_a_member_a_majority_found_missing_is_left_out_and_a_minority_is_not_enough():
    sim = Sim()
    for w in "abcd":
        sim.register(w)
    gen = _quorum(sim, "abcd", 0)["a"]["generation"]
    sim.commit("a", 0, gen, ok=False, members="abcd", suspects=["d"])
    assert sim.state.membership.get("d").synced  # one of three others: not a majority
    sim.commit("b", 0, gen, ok=False, members="abcd", suspects=["d"])
    assert sim.state.membership.get("d").synced is False  # two of three
    sim.commit("c", 0, gen, ok=False, members="abcd", suspects=["a"])
    assert sim.state.membership.get("a").synced


def test_suspicion_never_leaves_the_job_without_a_member_in_sync():
    """The fifth soak run's case: a round failed for everyone after a coordinator restart (the
    rendezvous lost every arrival), the first two reports named the other two missing, the later
    ones named the first two, and nobody held the job's state: every worker waited for a donor
    for ever. A report naming its own sender missing is about the rendezvous, not the peers; the
    report of a member already left out counts no more, so some member always stays in sync."""
    sim = Sim()
    for w in "abcd":
        sim.register(w)
    gen = _quorum(sim, "abcd", 0)["a"]["generation"]
    for w in "abcd":  # each found everyone missing, itself included
        sim.commit(w, 0, gen, ok=False, members="abcd", suspects="abcd")
    assert all(sim.state.membership.get(w).synced for w in "abcd")

    gen = _quorum(sim, "abcd", 0)["a"]["generation"]
    sim.commit("a", 0, gen, ok=False, members="abcd", suspects="cd")
    sim.commit("b", 0, gen, ok=False, members="abcd", suspects="cd")
    assert [w for w in "abcd" if sim.state.membership.get(w).synced] == ["a", "b"]
    sim.commit("c", 0, gen, ok=False, members="abcd", suspects="ab")
    sim.commit("d", 0, gen, ok=False, members="abcd", suspects="ab")
    assert [w for w in "abcd" if sim.state.membership.get(w).synced] == ["a", "b"]

    sim = Sim()
    for w in "ab":
        sim.register(w)
    gen = _quorum(sim, "ab", 0)["a"]["generation"]
    sim.commit("a", 0, gen, ok=False, members="ab", suspects="b")  # one of one other: a majority
    sim.commit("b", 0, gen, ok=False, members="ab", suspects="a")  # b was left out: not counted
    assert sim.state.membership.get("a").synced and not sim.state.membership.get("b").synced


def test_after_a_restart_the_workers_that_hold_the_state_define_the_configuration():
    """The seventh soak run's case: a worker of another model (holding nothing) registered first with
    a restarted coordinator, its configuration became the job's, and every worker of the job was
    refused. A worker that brings the job's state defines it; the other is removed and refused
    when it registers again. In a fresh job (nobody holds state) the first comes first."""
    sim = Sim(grace=5.0)
    sim.register("rogue", fingerprint="other")
    assert sim.state.membership.get("rogue").synced
    reply = sim.register("a", fingerprint="job", synced=True, round=7, holds_state=True)
    assert reply["synced"] and sim.state.membership.get("rogue") is None
    sim.register("b", fingerprint="job", synced=True, round=7, holds_state=True)
    sim.send("rogue", "register", worker_id="rogue", advertise_addr="127.0.0.1", step=0, fingerprint="other")
    assert "runs another configuration" in sim.last("rogue", "error")["reason"]
    # once pinned by the state, a later state holder of another configuration is refused too
    sim.send("c", "register", worker_id="c", advertise_addr="127.0.0.1", step=70, fingerprint="x",
             synced=True, round=7, holds_state=True)  # fmt: skip
    assert "runs another configuration" in sim.last("c", "error")["reason"]

    sim = Sim()
    sim.register("a", fingerprint="job")
    sim.send("b", "register", worker_id="b", advertise_addr="127.0.0.1", step=0, fingerprint="other")
    assert "runs another configuration" in sim.last("b", "error")["reason"]


def test_a_joiner_gets_the_first_synced_donor_and_is_synced_once_the_donor_reports():
    sim = Sim()
    for w in "ba":
        sim.register(w)
    gen = _quorum(sim, "ab", 0)["a"]["generation"]
    sim.commit("a", 0, gen, members="ab")
    sim.commit("b", 0, gen, members="ab")
    assert sim.register("j", synced=True, round=0)["synced"] is False  # a past round: a joiner
    sim.send("j", "join", worker_id="j", failed=[])
    reply = sim.last("j", "join_reply")
    assert reply["donor"] == "a" and reply["store"] == STORE
    tid, secret = reply["transfer_id"], reply["rendezvous"]
    assert secret not in ("", "n0")  # its own, not the round's
    assert sim.beat("a")["a"]["serve"] == [
        {"transfer_id": tid, "joiner": "j", "store": STORE, "rendezvous": secret}
    ]
    assert sim.beat("b")["b"]["serve"] == []
    sim.send("a", "transfer_done", worker_id="a", joiner="j", transfer_id=tid, ok=True, round=1, step=9)
    assert sim.state.membership.get("j").synced and sim.beat("a")["a"]["serve"] == []
    quorum = _quorum(sim, "abj", 1)
    assert quorum["j"]["members"] == ["a", "b", "j"]


def test_a_failed_transfer_is_cancelled_for_the_other_side_and_the_joiner_gets_another_donor():
    sim = Sim()
    for w in "ab":
        sim.register(w)
    gen = _quorum(sim, "ab", 0)["a"]["generation"]
    sim.commit("a", 0, gen, members="ab")
    sim.commit("b", 0, gen, members="ab")
    sim.register("j")
    sim.send("j", "join", worker_id="j", failed=[])
    tid = sim.last("j", "join_reply")["transfer_id"]
    sim.send("j", "transfer_done", worker_id="j", joiner="j", transfer_id=tid, ok=False, round=0, step=0)
    hb = sim.beat("a")["a"]
    assert tid in hb["cancelled"] and tid not in hb["aborted"] and hb["serve"] == []
    sim.send("j", "join", worker_id="j", failed=["a"])
    assert sim.last("j", "join_reply")["donor"] == "b"
    sim.send("j", "join", worker_id="j", failed=["a", "b"])  # every donor failed: all are tried again
    assert sim.last("j", "join_reply")["donor"] == "a"
    with_own = dict(worker_id="j", joiner="j", transfer_id=tid, ok=True, round=0, step=0)
    sim.send("j", "transfer_done", **with_own)  # a joiner cannot declare itself synced
    err = sim.last("j", "error")
    assert err["code"] == "refused" and "cannot report its own transfer" in err["reason"]


def test_requests_from_strangers_and_out_of_turn_are_refused_with_a_code():
    sim = Sim()
    sim.send("x", "heartbeat", worker_id="x", step=0, round=0)
    assert sim.last("x", "error")["code"] == "not_registered"
    sim.register("a", fingerprint="f" * 64)
    sim.send("b", "register", worker_id="b", advertise_addr="h", step=0, fingerprint="e" * 64)
    assert "another configuration" in sim.last("b", "error")["reason"]


def test_a_member_that_gave_up_a_transfer_its_donor_then_finished_may_join_again():
    """The fourth soak run's case: the joiner gave up on a slow transfer, the donor finished it
    and reported success (the joiner became synced), then the joiner asked for another donor and
    was refused, and exited: the job then waited for ever for min_workers."""
    sim = Sim()
    sim.register("a")
    sim.register("j", synced=False)
    sim.send("j", "join", worker_id="j", failed=[])
    tid = sim.last("j", "join_reply")["transfer_id"]
    sim.send("a", "transfer_done", worker_id="a", joiner="j", transfer_id=tid, ok=True, round=0, step=0)
    assert sim.state.membership.get("j").synced
    sim.send("j", "join", worker_id="j", failed=["a"])  # it had given up: it holds no state
    assert sim.state.membership.get("j").synced is False
    assert sim.last("j", "join_reply")["donor"] == "a"  # every donor failed it: all tried again


def test_the_only_holder_of_the_state_may_not_ask_for_it():
    """Unsynced, the job would have no member holding its state and the joiner no donor."""
    sim = Sim()
    sim.register("a")
    sim.send("a", "join", worker_id="a", failed=[])
    assert "only a joiner asks for state" in sim.last("a", "error")["reason"]
    assert sim.state.membership.get("a").synced


def test_a_late_joiner_of_a_finished_job_is_told_so():
    sim = Sim()
    sim.register("a")
    sim.register("j", synced=False)
    assert sim.state.status(0.0)["finished"] is False
    sim.send("a", "leave", worker_id="a", finished=True)
    assert sim.state.status(0.0)["finished"] is True  # what `lowcomm status` says of it
    sim.send("j", "join", worker_id="j", failed=[])
    err = sim.last("j", "error")
    assert err["code"] == "job_finished" and "finished" in err["reason"]


def test_a_worker_back_after_the_job_finished_is_told_so_and_rolls_nothing_back():
    """The soak run's case: b is cut off, a finishes the job and leaves; b comes back claiming the
    state of an earlier round. It used to be taken for a resume (no member held the job's state),
    roll the job back and train on alone to different parameters."""
    sim = Sim()
    sim.register("a", synced=True, round=0)
    sim.register("b", synced=True, round=0)
    for r in range(3):
        gen = _quorum(sim, "ab", r)["a"]["generation"]
        sim.commit("a", r, gen, members="ab")
        sim.commit("b", r, gen, members="ab")
    sim.send("b", "leave", worker_id="b")  # cut off (as expired: gone without finishing)
    gen = _quorum(sim, "a", 3)["a"]["generation"]
    sim.commit("a", 3, gen, members="a")
    sim.send("a", "leave", worker_id="a", finished=True)
    sim.send(
        "b", "register", worker_id="b", advertise_addr="h", step=30, synced=True, round=3, holds_state=True
    )
    err = sim.last("b", "error")
    assert err["code"] == "job_finished" and sim.state.committed == 3


def test_a_restarted_worker_replaces_its_old_process_and_aborts_its_rounds():
    sim = Sim()
    sim.register("a", incarnation="one")
    sim.register("b", incarnation="one")
    gen = _quorum(sim, "ab", 0)["a"]["generation"]
    epoch = sim.state.membership.epoch
    sim.register("b", incarnation="two")  # b's process restarted under the same id
    assert sim.state.membership.epoch > epoch
    sim.commit("a", 0, gen, members="ab")
    assert sim.last("a", "decision")["commit"] is False


def test_a_transfer_whose_donor_restarted_is_cancelled_for_the_joiner_at_once():
    """The soak run's case: a donor killed and restarted before it served its joiner came back
    (a new incarnation, so never reported lost); its transfer was dropped without a word, and the
    joiner waited its whole transfer timeout (120 s) before asking again. Now the joiner's next
    heartbeat reply cancels it, and the restarted process owes nothing."""
    sim = Sim()
    for w in "ab":
        sim.register(w, incarnation="one")
    gen = _quorum(sim, "ab", 0)["a"]["generation"]
    sim.commit("a", 0, gen, members="ab")
    sim.commit("b", 0, gen, members="ab")
    sim.register("j", incarnation="one")
    sim.send("j", "join", worker_id="j", failed=[])
    reply = sim.last("j", "join_reply")
    tid = reply["transfer_id"]
    assert reply["donor"] == "a" and tid not in sim.beat("j")["j"]["cancelled"]
    sim.register("a", incarnation="two", synced=True, round=1)  # a restarted before it served j
    assert tid in sim.beat("j")["j"]["cancelled"]
    assert sim.beat("a")["a"]["serve"] == []
    sim.send("j", "join", worker_id="j", failed=["a"])
    assert sim.last("j", "join_reply")["donor"] == "b"


def test_before_the_first_quorum_the_newest_state_wins():
    sim = Sim(min_workers=2)
    assert sim.register("old", synced=True, round=4, holds_state=True)["synced"]
    sim.ask("old", 4)
    assert sim.register("new", synced=True, round=8, holds_state=True)["synced"]
    assert sim.last("old", "quorum_reply")["action"] == "resync"  # its pending ask is answered at once
    assert sim.state.committed == 7 and sim.state.membership.get("old").synced is False


def test_a_restarted_coordinator_forms_no_quorum_in_its_grace_and_decides_unknown_rounds_from_claims():
    sim = Sim(grace=3.0)
    sim.register("a", synced=True, round=5)
    sim.register("b", synced=True, round=5)
    sim.ask("a", 5)
    sim.ask("b", 5)
    assert sim.take("a") == []  # in grace: workers are still re-registering
    # a commit report of a generation formed before the restart: the members named are alive and
    # the grace is on, so it is decided by the usual rule over them
    sim.commit("a", 4, 77, members="ab")
    sim.commit("b", 4, 77, members="ab")
    assert sim.last("a", "decision") == {"round": 4, "generation": 77, "commit": True}
    sim.advance(3.5, alive="ab", rnd=5)
    assert sim.last("a", "quorum_reply")["world"] == 2  # after its grace, with those that came back
    sim.commit("a", 3, 66, members=["a", "gone"])  # a round before the committed one: it was committed
    assert sim.last("a", "decision")["commit"] is True


def test_after_its_grace_a_restarted_coordinator_does_not_wait_for_min_workers():
    sim = Sim(grace=1.0, min_workers=3)
    sim.register("a", synced=True, round=2)
    sim.register("b", synced=True, round=2)  # the third worker died meanwhile
    gen = 5
    sim.commit("a", 1, gen, members="ab")
    sim.commit("b", 1, gen, members="ab")
    assert sim.state.committed == 1
    sim.advance(1.5, alive="ab", rnd=2)
    _quorum(sim, "ab", 2)  # raises unless both got a quorum of two


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_min_workers_is_checked(bad):
    with pytest.raises(ValueError, match="min_workers"):
        CoordinatorState("job", STORE, now=0.0, min_workers=bad)


def test_deadlines_and_grace_are_finite():
    """An infinite deadline never declares a silent member dead, an infinite grace never forms a
    round: both were accepted (--deadline-floor inf --deadline-ceiling inf, --grace inf)."""
    for bad in [(1.0, float("inf")), (float("inf"), float("inf")), (float("nan"), 2.0), (0.0, 1.0)]:
        allowed = r"are not allowed: 0 < floor <= ceiling, both finite seconds"
        with pytest.raises(ValueError, match=rf"^deadline_floor={bad[0]!r} and deadline_ceiling=.*{allowed}"):
            Deadline(*bad)
        with pytest.raises(ValueError, match=rf"^round_deadline_floor={bad[0]!r} and .* {allowed}"):
            RoundDeadline(*bad)
    for bad in [float("inf"), float("nan"), -1.0]:
        with pytest.raises(ValueError, match="is not allowed: a finite number of seconds >= 0"):
            CoordinatorState("job", STORE, now=0.0, grace=bad)


def test_a_bare_round_claim_beyond_the_job_is_not_believed():
    sim = Sim()
    sim.register("a")
    gen = _quorum(sim, "a", 0)["a"]["generation"]
    sim.commit("a", 0, gen, members="a")
    reply = sim.register("x", synced=True, round=2**62)  # no state behind it: a key holder's lie
    assert reply["synced"] is False and sim.state.committed == 0
    assert sim.register("y", synced=True, round=7, holds_state=True)["synced"] is False  # the job is at 1
    assert sim.state.membership.get("a").synced  # nobody was sent to resync


def _commit_rounds_then_lose_everyone(sim: Sim, workers: str, rounds: int) -> None:
    """``workers`` register and commit ``rounds`` rounds together, then all fall silent and expire."""
    for w in workers:
        sim.register(w)
    for rnd in range(rounds):
        gen = _quorum(sim, workers, rnd)[workers[0]]["generation"]
        for w in workers:
            sim.commit(w, rnd, gen, members=workers)
        for w in workers:
            sim.take(w)
    assert sim.state.committed == rounds - 1
    sim.advance(5.0)
    assert sim.state.membership.members == ()


def test_with_no_member_left_the_newest_checkpoint_wins_and_the_job_goes_on():
    """Every worker was lost while the coordinator lived (it committed round 9): the workers come
    back from their checkpoints of rounds 4 and 6; the newest wins, the committed round rolls
    back, the other resynchronizes from it."""
    sim = Sim(min_workers=2)
    _commit_rounds_then_lose_everyone(sim, "ab", 10)
    sim.register("a", synced=True, round=4, holds_state=True, incarnation="2")
    sim.register("b", synced=True, round=6, holds_state=True, incarnation="2")
    assert sim.state.committed == 5 and sim.state.membership.get("b").synced
    assert sim.state.membership.get("a").synced is False  # behind the newest: it resyncs from b
    sim.send("a", "join", worker_id="a", failed=[])
    assert sim.last("a", "join_reply")["donor"] == "b"


def test_after_a_kill_all_the_first_worker_back_does_not_start_alone_from_its_older_state():
    """The soak run's case: a coordinator that once restarted (grace > 0) saw every worker lost.
    The first back brought an old checkpoint (its newer writes had failed) and used to run rounds
    alone at once, so the newer checkpoints that came a second later were thrown away and the
    job went back hundreds of steps. Now the first round waits RESUME_HOLD_S and for min_workers
    registered workers; it then runs with the newest, and the older one resyncs from it (counting
    only synced workers there deadlocked the second soak run: the newest, blocked in its round,
    never served the joiner it waited for)."""
    sim = Sim(min_workers=2, grace=3.0)
    sim.advance(3.5)
    _commit_rounds_then_lose_everyone(sim, "ab", 10)
    sim.register("a", synced=True, round=3, holds_state=True, incarnation="2")
    sim.ask("a", 3)
    sim.advance(1.0, alive="a", rnd=3)
    assert sim.take("a") == []  # no quorum of one from the oldest state
    sim.register("b", synced=True, round=9, holds_state=True, incarnation="2")
    assert sim.state.committed == 8 and sim.last("a", "quorum_reply")["action"] == "resync"
    sim.ask("b", 9)
    sim.advance(1.0, alive="ab", rnd=9)
    assert sim.take("b") == []  # within the resume's hold
    sim.advance(4.0, alive="ab", rnd=9)
    assert sim.last("b", "quorum_reply")["members"] == ["b"]  # two registered: b goes on, a joins
    sim.send("a", "join", worker_id="a", failed=[])
    assert sim.last("a", "join_reply")["donor"] == "b"


def test_a_joiner_with_no_donor_is_logged_with_what_is_missing(caplog):
    sim = Sim()
    sim.register("a")
    gen = _quorum(sim, "a", 0)["a"]["generation"]
    sim.commit("a", 0, gen, members="a")
    sim.send("a", "leave", worker_id="a")
    sim.register("j", synced=False)
    sim.send("j", "join", worker_id="j", failed=[])
    with caplog.at_level("WARNING", logger="lowcomm.runtime.elastic.state"):
        sim.advance(25.0, alive="j")
    warnings = [r.message for r in caplog.records if "no progress possible" in r.message]
    assert 2 <= len(warnings) <= 4 and "wait for a donor" in warnings[0] and "'j'" in warnings[0]


def test_the_members_are_capped_and_status_comes_in_pages(monkeypatch):
    from lowcomm.runtime.elastic import state as state_module

    monkeypatch.setattr(state_module, "MAX_MEMBERS", 250)
    sim = Sim()
    for i in range(250):
        assert sim.register(f"w{i:03d}")["size"] == i + 1
    sim.send("late", "register", worker_id="late", advertise_addr="h", step=0)
    err = sim.last("late", "error")
    assert err["code"] == "full" and "250 members" in err["reason"]
    pages, offset = [], 0
    while True:
        sim.send("s", "status", offset=offset)
        page = sim.last("s", "status_reply")
        pages.append(page)
        offset += len(page["members"])
        if offset >= page["total"]:
            break
    assert [len(p["members"]) for p in pages] == [200, 50] and pages[0]["total"] == 250
    assert [m["worker_id"] for p in pages for m in p["members"]] == [f"w{i:03d}" for i in range(250)]
