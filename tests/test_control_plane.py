"""The coordinator's protocol, membership rules and server (a real process on 127.0.0.1)."""

import json
import os
import random
import re
import subprocess
import sys
import time
import types

import msgpack
import pytest
import torch
import zmq

from lowcomm.runtime.elastic import CoordinatorClient
from lowcomm.runtime.elastic.membership import Deadline, Membership, expire, heartbeat, leave, ranks, register
from lowcomm.runtime.elastic.protocol import (
    MAX_MESSAGE_BYTES,
    VERSION,
    ProtocolError,
    ReplayGuard,
    Signer,
    deserialize,
    load_key,
    new_key,
    serialize,
)
from lowcomm.runtime.errors import CoordinatorRefused, KeyRejected, NotRegistered

KEY = bytes.fromhex(new_key())
SIGNER = Signer(KEY)


def _hb(seq, **kw):
    body = {"worker_id": "w1", "step": 3, "round": 1, **kw}
    return serialize(SIGNER, "heartbeat", body, sender="w1", seq=seq)


def test_a_signed_message_round_trips():
    msg = deserialize(_hb(1), SIGNER, ReplayGuard())
    assert (msg.type, msg.sender, msg.seq, msg.body["step"]) == ("heartbeat", "w1", 1, 3)


def test_wrong_key_and_tampering_are_rejected_as_unauthenticated():
    frames = _hb(1)
    with pytest.raises(ProtocolError, match="bad signature") as e:
        deserialize(frames, Signer(bytes.fromhex(new_key())))
    assert not e.value.authenticated
    body = msgpack.unpackb(frames[3])
    body["step"] = 999
    with pytest.raises(ProtocolError, match="bad signature"):
        deserialize([*frames[:3], msgpack.packb(body)], SIGNER)


def test_replayed_message_is_rejected():
    guard = ReplayGuard()
    frames = _hb(5)
    deserialize(frames, SIGNER, guard)
    with pytest.raises(ProtocolError, match="replayed") as e:
        deserialize(frames, SIGNER, guard)
    assert e.value.authenticated
    with pytest.raises(ProtocolError, match="replayed"):
        deserialize(_hb(4), SIGNER, guard)


def test_frames_are_checked_in_order_before_unpacking():
    with pytest.raises(ProtocolError, match="4 frames"):
        deserialize([b"LC1", b"x"], SIGNER)
    with pytest.raises(ProtocolError, match="larger than"):
        deserialize([b"LC1", b"x" * 32, b"h" * MAX_MESSAGE_BYTES, b"b"], SIGNER)
    with pytest.raises(ProtocolError, match="magic"):
        deserialize([b"XX9", *_hb(1)[1:]], SIGNER)
    with pytest.raises(ProtocolError, match="signature missing"):
        deserialize([b"LC1", b"short", *_hb(1)[2:]], SIGNER)


def test_authenticated_but_invalid_bodies_name_the_field():
    def signed(header: dict, body: dict):
        h, b = msgpack.packb(header), msgpack.packb(body)
        return [b"LC1", SIGNER.sign(h, b), h, b]

    header = {
        "v": VERSION,
        "type": "heartbeat",
        "id": "x",
        "sender": "w",
        "seq": 1,
        "epoch": 0,
        "ts": time.time(),
    }
    with pytest.raises(ProtocolError, match="lacks field 'round'") as e:
        deserialize(signed(header, {"worker_id": "w", "step": 1}), SIGNER)
    assert e.value.authenticated
    with pytest.raises(ProtocolError, match=r"step must be int"):
        deserialize(signed(header, {"worker_id": "w", "step": "1", "round": 0}), SIGNER)
    with pytest.raises(ProtocolError, match="unknown fields"):
        deserialize(signed(header, {"worker_id": "w", "step": 1, "round": 0, "evil": 1}), SIGNER)
    with pytest.raises(ProtocolError, match=f"version {VERSION + 1}"):
        deserialize(signed({**header, "v": VERSION + 1}, {}), SIGNER)
    with pytest.raises(ProtocolError, match="clock window"):
        deserialize(
            signed({**header, "ts": 1.0}, {"worker_id": "w", "step": 1, "round": 0}), SIGNER, ReplayGuard()
        )
    with pytest.raises(ProtocolError, match="unknown message type"):
        deserialize(signed({**header, "type": "shutdown"}, {}), SIGNER)


def test_keys_load_from_env_and_files(tmp_path, monkeypatch, caplog):
    k = new_key()
    (tmp_path / "k").write_text(k + "\n")
    os.chmod(tmp_path / "k", 0o600)
    with caplog.at_level("WARNING"):
        assert load_key("@" + str(tmp_path / "k")) == bytes.fromhex(k)
        assert not caplog.records
        os.chmod(tmp_path / "k", 0o644)  # a key file others can read is named, as ssh does
        assert load_key("@" + str(tmp_path / "k")) == bytes.fromhex(k)
    assert [r.getMessage() for r in caplog.records] == [
        f"key file '{tmp_path / 'k'}' can be read by other users (mode 644): chmod 600 it"
    ]
    monkeypatch.setenv("LOWCOMM_KEY", k)
    assert load_key() == bytes.fromhex(k)
    monkeypatch.delenv("LOWCOMM_KEY")
    with pytest.raises(ValueError, match="no job key"):
        load_key()
    with pytest.raises(ValueError, match="hex"):
        load_key("not-hex")
    with pytest.raises(ValueError, match="16 bytes"):
        Signer(b"short")


def test_membership_epochs_ranks_and_adaptive_deadlines():
    d = Deadline(floor=2.0, ceiling=30.0, factor=5.0)
    ms = register(Membership(), "a", "10.0.0.1", 0, now=0.0)
    ms = register(ms, "b", "10.0.0.2", 0, now=1.0)
    assert ms.epoch == 2 and ranks(ms) == {"a": 0, "b": 1}
    assert register(ms, "a", "10.0.0.9", 5, now=1.5).epoch == 2  # a re-register is no new epoch
    for t in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0):  # a heartbeats every 0.5 s -> deadline 2.5 s
        ms = heartbeat(ms, "a", 1, 0, now=t)
    for t in (2.0, 3.0):  # b every 1 s -> 5 s
        ms = heartbeat(ms, "b", 1, 0, now=t)
    assert d.seconds(ms.get("a").interval) == pytest.approx(2.5, rel=0.05)
    same, dead = expire(ms, now=4.0, deadline=d)
    assert dead == [] and same is ms
    later, dead = expire(ms, now=5.6, deadline=d)
    assert dead == ["a"] and later.epoch == 3 and ranks(later) == {"b": 0}
    assert leave(later, "b").epoch == 4 and leave(later, "zzz") is later
    with pytest.raises(KeyError):
        heartbeat(later, "a", 1, 0, now=6.0)
    with pytest.raises(ValueError, match="floor"):
        Deadline(floor=0)


@pytest.fixture
def coordinator(tmp_path, request):
    """A coordinator process on 127.0.0.1; extra flags by indirect parametrization."""
    env = {**os.environ, "LOWCOMM_KEY": KEY.hex()}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lowcomm",
            "--log-level",
            "INFO",
            "coordinator",
            "--bind",
            "tcp://127.0.0.1:0",
            "--job",
            "t",
            "--deadline-floor",
            "1",
            "--deadline-ceiling",
            "3",
            *getattr(request, "param", []),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    line = proc.stdout.readline()
    assert "coordinator of job" in line, line
    yield line.split()[-1]
    proc.kill()
    proc.wait(timeout=10)


def test_workers_register_heartbeat_and_the_silent_one_expires(coordinator):
    a = CoordinatorClient(coordinator, KEY, "a")
    b = CoordinatorClient(coordinator, KEY, "b")
    assert (
        a.request("register", {"worker_id": "a", "advertise_addr": "127.0.0.1", "step": 0}).body["epoch"] == 1
    )
    assert (
        b.request("register", {"worker_id": "b", "advertise_addr": "127.0.0.1", "step": 0}).body["epoch"] == 2
    )
    deadline = time.time() + 8
    while time.time() < deadline:  # a heartbeats, b goes silent
        a.request("heartbeat", {"worker_id": "a", "step": 1, "round": 0})
        st = a.request("status", {}).body
        if [m["worker_id"] for m in st["members"]] == ["a"]:
            break
        time.sleep(0.2)
    assert [m["worker_id"] for m in st["members"]] == ["a"] and st["epoch"] == 3
    with pytest.raises(NotRegistered, match="not registered"):
        b.request("heartbeat", {"worker_id": "b", "step": 1, "round": 0})


def test_coordinator_survives_fuzzed_and_hostile_messages_and_keeps_serving(coordinator):
    rng = random.Random(1234)
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(coordinator)
    good = _hb(10**18)
    for i in range(300):
        kind = i % 6
        if kind == 0:  # random garbage frames
            frames = [rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(1, 6))]
        elif kind == 1:  # truncated real message
            frames = good[: rng.randint(1, 3)]
        elif kind == 2:  # bit flips in a real message
            frames = [bytearray(f) for f in good]
            j = rng.randrange(4)
            if frames[j]:
                frames[j][rng.randrange(len(frames[j]))] ^= 1 << rng.randrange(8)
            frames = [bytes(f) for f in frames]
        elif kind == 3:  # oversized
            frames = [b"LC1", b"x" * 32, rng.randbytes(MAX_MESSAGE_BYTES + 10), b""]
        elif kind == 4:  # valid signature, hostile msgpack body
            h = msgpack.packb(
                {
                    "v": VERSION,
                    "type": "register",
                    "id": "x",
                    "sender": f"f{i}",
                    "seq": 1,
                    "epoch": 0,
                    "ts": time.time(),
                }
            )
            b = msgpack.packb({"worker_id": ["x"] * 10, "advertise_addr": 3, "step": -1})
            frames = [b"LC1", SIGNER.sign(h, b), h, b]
        else:  # replay of one message
            frames = good
        raw.send_multipart(frames)
    raw.close(0)
    client = CoordinatorClient(coordinator, KEY, "after-fuzz")
    st = client.request("status", {}).body
    assert st["job"] == "t" and st["members"] == []
    wrong = CoordinatorClient(coordinator, bytes.fromhex(new_key()), "intruder", timeout_s=1.0)
    with pytest.raises(KeyRejected, match="rejects this key"):  # no signed answer, only the notice
        wrong.request("status", {})
    # the unsigned notice is rate-limited to one a second per peer: 30 bad requests, at most 2 notices
    probe = ctx.socket(zmq.DEALER)
    probe.setsockopt(zmq.LINGER, 0)
    probe.connect(coordinator)
    other = Signer(bytes.fromhex(new_key()))
    for i in range(30):
        probe.send_multipart(serialize(other, "status", {}, sender="probe", seq=i + 1))
    notices = []
    while probe.poll(1500):
        notices.append(probe.recv_multipart())
    probe.close(0)
    assert 1 <= len(notices) <= 2 and all(n == [b"LC1", b"KEY-REJECTED"] for n in notices)


def test_status_command_prints_members(coordinator):
    import threading

    c = CoordinatorClient(coordinator, KEY, "w9")
    c.request("register", {"worker_id": "w9", "advertise_addr": "127.0.0.9", "step": 42})
    done = threading.Event()

    def beat():  # stay alive while the status command starts up
        while not done.wait(0.3):
            c.request("heartbeat", {"worker_id": "w9", "step": 42, "round": 0})

    t = threading.Thread(target=beat, daemon=True)
    t.start()
    out = subprocess.run(
        # a 35-day wait for each reply: ZeroMQ's poll took it in ms as a C int (an OverflowError)
        [sys.executable, "-m", "lowcomm", "status", coordinator, "--timeout", "3000000"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LOWCOMM_KEY": KEY.hex()},
    )
    as_json = subprocess.run(  # for scripts: one JSON object
        [sys.executable, "-m", "lowcomm", "status", coordinator, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LOWCOMM_KEY": KEY.hex()},
    )
    done.set()
    t.join(timeout=5)
    assert out.returncode == 0, out.stderr
    assert "w9" in out.stdout and "127.0.0.9" in out.stdout
    assert "job t: epoch 1, no round yet, 1 member(s)" in out.stdout, out.stdout  # (it read "round -1")
    assert as_json.returncode == 0, as_json.stderr
    got = json.loads(as_json.stdout)
    assert set(got) == {"job", "epoch", "round", "finished", "members"}
    assert {k: got[k] for k in ("job", "epoch", "finished")} == {"job": "t", "epoch": 1, "finished": False}
    assert got["round"] in (-1, 0)  # (the member's heartbeats report round 0: the job's by now, or not yet)
    [m] = got["members"]
    assert (m["worker_id"], m["addr"], m["step"], m["rank"], m["synced"]) == ("w9", "127.0.0.9", 42, 0, True)


def test_a_wait_longer_than_one_zeromq_poll_is_taken_in_slices_to_its_end(monkeypatch):
    """ZeroMQ's poll takes at most 2**31 - 1 ms; a longer wait polls again until its deadline."""
    from lowcomm.comm.net import free_port
    from lowcomm.runtime.elastic import client

    monkeypatch.setattr(client, "_POLL_MAX_MS", 40)
    c = CoordinatorClient(f"tcp://127.0.0.1:{free_port()}", KEY, "w1")  # nobody answers there
    try:
        t0 = time.monotonic()
        assert c._recv(0.5) is None
        assert 0.45 <= time.monotonic() - t0 < 5  # not one 40 ms slice
    finally:
        c.close()


def test_quorum_forms_without_a_dead_member_and_hands_out_a_fresh_store_prefix(coordinator):
    import threading

    import torch.distributed as dist

    workers = ["a", "b", "c"]
    for w in workers:
        CoordinatorClient(coordinator, KEY, f"{w}-reg").request(
            "register", {"worker_id": w, "advertise_addr": "127.0.0.1", "step": 7}
        )
    stop = threading.Event()

    def beat(w):  # a and b stay alive from a thread of their own; c is dead (never heard of again)
        hb = CoordinatorClient(coordinator, KEY, f"{w}-hb")
        while not stop.wait(0.2):
            hb.request("heartbeat", {"worker_id": w, "step": 7, "round": 0})

    beats = [threading.Thread(target=beat, args=(w,), daemon=True) for w in ("a", "b")]
    for t in beats:
        t.start()
    replies = {}

    def ask(w):
        replies[w] = (
            CoordinatorClient(coordinator, KEY, f"{w}-q")
            .request("quorum", {"worker_id": w, "round": 3}, timeout_s=20)
            .body
        )

    askers = [threading.Thread(target=ask, args=(w,)) for w in ("a", "b")]
    t0 = time.time()
    for t in askers:
        t.start()
    for t in askers:
        t.join(timeout=30)
    stop.set()
    waited = time.time() - t0
    assert set(replies) == {"a", "b"}
    ra, rb = replies["a"], replies["b"]
    assert (ra["world"], rb["world"]) == (2, 2) and {ra["rank"], rb["rank"]} == {0, 1}
    assert ra["members"] == ["a", "b"] and ra["epoch"] == rb["epoch"] == 4  # 3 joins + c's expiry
    assert ra["generation"] == rb["generation"] >= 1 and ra["store"] == rb["store"]
    assert waited < 10  # c's deadline (3 s ceiling without a heartbeat history), not a long timeout
    host, port = ra["store"].rsplit(":", 1)
    store = dist.PrefixStore(f"g{ra['generation']}/", dist.TCPStore(host, int(port), is_master=False))
    store.set("hello", "world")
    assert store.get("hello") == b"world"
    with pytest.raises(NotRegistered, match="not registered"):
        CoordinatorClient(coordinator, KEY, "c-q").request("quorum", {"worker_id": "c", "round": 3})


@pytest.mark.parametrize("coordinator", [["--min-workers", "2"]], indirect=True)
def test_before_the_first_quorum_the_newest_state_wins(coordinator):
    """Workers resumed from checkpoints of different rounds (one's last write failed, say): the one
    furthest on is in sync; the one behind resynchronizes, even though it registered first and
    already waits for a quorum of its round."""
    import threading

    def reg(w, rnd):
        body = {"worker_id": w, "advertise_addr": "127.0.0.1", "step": 10 * rnd, "synced": True, "round": rnd}
        body["holds_state"] = True  # resumed from their checkpoints
        return CoordinatorClient(coordinator, KEY, f"{w}-reg").request("register", body).body["synced"]

    assert reg("old", 4)  # alone, it is the newest so far
    replies = {}

    def ask():
        client = CoordinatorClient(coordinator, KEY, "old-q")
        replies["old"] = client.request("quorum", {"worker_id": "old", "round": 4}, timeout_s=10).body

    asker = threading.Thread(target=ask)
    asker.start()
    time.sleep(0.5)  # its ask waits: --min-workers 2
    assert "old" not in replies
    assert reg("new", 8)
    asker.join(timeout=15)
    assert replies["old"]["action"] == "resync"
    st = CoordinatorClient(coordinator, KEY, "st").request("status", {}).body
    assert {m["worker_id"]: m["synced"] for m in st["members"]} == {"old": False, "new": True}
    done = {"worker_id": "old", "joiner": "old", "transfer_id": 1, "ok": True, "round": 8, "step": 80}
    with pytest.raises(CoordinatorRefused, match="cannot report its own transfer"):
        CoordinatorClient(coordinator, KEY, "old-t").request("transfer_done", done)


def test_a_worker_forgotten_until_the_job_finished_stops_with_job_finished(coordinator):
    """The soak run's case: a worker cut off from the coordinator until the others had finished
    heard "the job has finished" at each re-registration and waited for ever for a quorum. Now the
    refusal reaches its rounds: the next quorum raises JobFinished (the trainer exits with its code)."""
    from lowcomm.runtime.elastic import WorkerAgent
    from lowcomm.runtime.errors import JobFinished

    b = WorkerAgent(coordinator, KEY, "b", heartbeat_s=0.2)
    assert b.start()
    a = CoordinatorClient(coordinator, KEY, "a")
    a.request("register", {"worker_id": "a", "advertise_addr": "127.0.0.1", "step": 0})
    a.request("leave", {"worker_id": "b"})  # b is forgotten, as if it had been cut off and expired
    a.request("leave", {"worker_id": "a", "finished": True})  # a finishes the job
    t0 = time.monotonic()
    with pytest.raises(JobFinished, match="the job has finished"):
        b.quorum(0)
    assert time.monotonic() - t0 < 10
    b.close(leave=False)


def test_a_worker_whose_coordinator_never_answers_gives_up_after_its_timeout():
    """No coordinator at the endpoint (a typo, or it is gone for good): registering is retried for
    coordinator_timeout_s, then CoordinatorLost names the endpoint, instead of waiting for ever."""
    from lowcomm.comm.net import free_port
    from lowcomm.runtime.elastic import WorkerAgent
    from lowcomm.runtime.errors import CoordinatorLost

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    agent = WorkerAgent(endpoint, KEY, "w", coordinator_timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(
        CoordinatorLost,
        match=rf"no reply from the coordinator at {endpoint} for \d+ s \(coordinator_timeout 1 s\)",
    ):
        agent.start()
    assert 1.0 <= time.monotonic() - t0 < 20  # a request's own 5 s timeout at most past the bound
    agent.close(leave=False)
    with pytest.raises(ValueError, match="coordinator_timeout_s must be > 0"):
        WorkerAgent(endpoint, KEY, "w", coordinator_timeout_s=0)
    # an address of another machine (TEST-NET-1): each round of the job failed in gloo ("Cannot
    # resolve 192.0.2.1 to a (local) address") and was retried twice a second, every worker's, for ever
    with pytest.raises(
        ValueError, match=r"^advertise_addr='192.0.2.1' is not allowed: an address of this host"
    ):
        WorkerAgent(endpoint, KEY, "w", "192.0.2.1")
    WorkerAgent(endpoint, KEY, "w", "127.0.0.1").close(leave=False)


def test_a_joiner_whose_coordinator_restarted_registers_again_and_joins(monkeypatch, caplog):
    """A chaos run under CI's load: w1, restarted after its kill, was joining when the coordinator
    was killed and restarted; its transfer failed, and the restarted coordinator, which did not
    know it yet, refused its next join ('not registered'): w1 exited and the report said 'data lost
    1'. The join now waits for the heartbeat thread's registration and asks again, as the rounds'
    calls do; a re-registration refused for good is raised."""
    from lowcomm.comm.net import free_port
    from lowcomm.runtime.elastic import WorkerAgent
    from lowcomm.runtime.errors import JobFinished, NotRegistered

    agent = WorkerAgent(f"tcp://127.0.0.1:{free_port()}", KEY, "w1", heartbeat_s=0.01)
    replies = [NotRegistered("worker 'w1' is not registered (register again)"), None]

    def call(kind, body, match=None, cancel=None):
        answer = replies.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return types.SimpleNamespace(
            type="join_reply",
            body={"donor": "w0", "transfer_id": 7, "store": "127.0.0.1:1", "rendezvous": 3},
        )

    monkeypatch.setattr(agent._main, "call", call)
    monkeypatch.setattr(agent, "_over_transfer_group", lambda *a: {"step": 40})
    loaded = []
    with caplog.at_level("INFO", logger="lowcomm.runtime.elastic.agent"):
        info = agent.join(loaded.append)
    assert loaded == [{"step": 40}] and info["donor"] == "w0" and info["attempts"] == 1 and not replies
    assert "w1: in sync with the job: its state from w0 in " in caplog.text  # (at --log-level INFO)
    replies[:] = [NotRegistered("worker 'w1' is not registered (register again)")]
    agent._refused = JobFinished("the job finished")  # what the heartbeat thread was told
    with pytest.raises(JobFinished, match="the job finished"):
        agent.join(loaded.append)
    agent.close(leave=False)


def test_a_state_the_donor_cannot_send_fails_that_transfer_not_the_donor(monkeypatch, caplog):
    """A snapshot (the embedding API's is the user's) holding what the state format cannot write
    raised out of serve_pending: the donor's loop died, the joiner waited for the transfer until
    its timeout and asked the next donor, whose loop died the same way. Now the transfer is
    reported failed at once, the reason named and recorded, and the donor trains on."""
    from lowcomm.comm.net import free_port
    from lowcomm.runtime.elastic import WorkerAgent

    events = []
    agent = WorkerAgent(
        f"tcp://127.0.0.1:{free_port()}", KEY, "w0", heartbeat_s=0.01, record=lambda k, **f: events.append(f)
    )
    reported = []
    monkeypatch.setattr(agent, "_report_transfer", lambda *a: reported.append(a))
    monkeypatch.setattr(agent, "_over_transfer_group", lambda *a: pytest.fail("a transfer started"))
    agent.view.serve = [{"transfer_id": 5, "joiner": "w2", "store": "127.0.0.1:1", "rendezvous": 3}]
    assert agent.serve_pending(lambda: {"w": torch.ones(2), "seen": {1, 2}}) == 0
    assert reported == [(5, "w2", False)]
    assert events == [
        {
            "what": "served",
            "joiner": "w2",
            "transfer_id": 5,
            "ok": False,
            "error": "cannot pack a set into a state",
        }
    ]
    # and a state it can write is sent (the transfer stands in here), said at --log-level INFO
    monkeypatch.setattr(agent, "_over_transfer_group", lambda *a: True)
    agent.view.serve = [{"transfer_id": 6, "joiner": "w2", "store": "127.0.0.1:1", "rendezvous": 4}]
    with caplog.at_level("INFO", logger="lowcomm.runtime.elastic.agent"):
        assert agent.serve_pending(lambda: {"w": torch.ones(2)}) == 1
    assert reported[-1] == (6, "w2", True) and "w0: sent the job's state to w2 (" in caplog.text
    agent.close(leave=False)


def test_a_round_committed_without_this_workers_result_makes_it_resynchronize():
    """The ninth soak run's case: this worker's contribution was dropped, but the round was
    committed (a restarted coordinator decided a generation it never saw from the round the job
    had reached): the worker has no mean to apply and must fetch the state, not apply None."""
    from lowcomm.comm.codecs import get_codec
    from lowcomm.runtime.elastic import ElasticGroup, ResyncRequired
    from lowcomm.runtime.elastic.agent import Quorum
    from lowcomm.runtime.hooks import FaultHooks

    class Agent:
        worker_id, next_round = "w1", 0
        records: list = []

        def quorum(self, rnd, cancel=None):
            return Quorum(rnd, 1, 2, ("w0", "w1"), "127.0.0.1:1", 7, 1, "secret")

        def is_aborted(self, gen):
            return True

        def commit(self, rnd, gen, ok, members, suspects):
            assert ok is False  # it says it failed...
            return True  # ...and is told the round was committed all the same

        def record(self, kind, **info):
            self.records.append(kind)

    class Drop(FaultHooks):
        def collective_action(self, rnd):
            return "drop"

    group = ElasticGroup(Agent(), hooks=Drop())
    work = group.all_reduce_mean(torch.ones(8), get_codec("fp32"), "two_phase")
    with pytest.raises(ResyncRequired, match="committed without this worker's result"):
        work.wait()


def test_only_failures_in_this_worker_itself_count_toward_giving_a_round_up():
    """A round given up because its generation was aborted (a peer's failure), because a peer never
    entered it or because a peer's connection went away is the others' doing and is redone however
    often; an error raised in this worker itself counts, a committed round resets the count, and
    after max_retries such attempts in a row the round is given up with one line naming the last
    error."""
    from lowcomm.comm.codecs import get_codec
    from lowcomm.comm.group import CollectiveError
    from lowcomm.runtime.elastic import ElasticGroup
    from lowcomm.runtime.elastic.agent import Quorum
    from lowcomm.runtime.elastic.gloo import Abandoned

    class Agent:
        worker_id, next_round = "w1", 0

        def __init__(self, outcomes):
            self.outcomes, self.records = list(outcomes), []

        def quorum(self, rnd, cancel=None):
            return Quorum(rnd, 1, 2, ("w0", "w1"), "127.0.0.1:1", 7, 1, "secret")

        def is_aborted(self, gen):
            return False

        def commit(self, rnd, gen, ok, members, suspects):
            return ok

        def record(self, kind, **info):
            self.records.append((kind, info))

    class Group:  # one attempt's group: its reduce does what the agent's next outcome says
        def __init__(self, agent):
            self.agent = agent

        def missing(self, seq):
            return [0] if self.agent.last == "peer" else []

    def make(outcomes, **kw):
        agent = Agent(outcomes)
        group = ElasticGroup(agent, **kw)
        group._group_for = lambda q: Group(agent)

        def reduce(g, job, q, stats, corrupt):
            agent.last = agent.outcomes.pop(0)
            if agent.last == "ok":
                return job.buffer.clone(), job.buffer  # (mean, own contribution as sent)
            if agent.last == "abort":
                raise Abandoned("generation 7 was aborted")
            if agent.last == "gone":  # what the others see when a worker that failed exits
                raise RuntimeError(
                    "[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                    "[127.0.0.1]:40868. This is typically caused by a remote worker crashing."
                )
            raise RuntimeError("Cannot resolve 192.0.2.1 to a (local) address")  # "own" or "peer"

        group._reduce = reduce
        return agent, group

    def mean(group):
        return group.all_reduce_mean(torch.ones(8), get_codec("fp32"), "two_phase").wait()

    # others' failures, however many, never give up the round; own ones in a row below the limit
    outcomes = ["abort"] * 5 + ["peer"] * 5 + ["gone"] * 5 + ["own", "own", "abort", "ok"]
    agent, group = make(outcomes, max_retries=3)
    assert torch.equal(mean(group), torch.ones(8)) and group.rounds_redone == 18
    agent.outcomes += ["own", "own", "ok"]  # the count started again after the committed round
    assert torch.equal(mean(group), torch.ones(8))
    agent.outcomes += ["own", "abort", "own", "own", "ok"]
    with pytest.raises(CollectiveError) as e:
        mean(group)
    assert str(e.value) == (
        "round 2 failed in this worker 3 times in a row (max_retries=3), last: RuntimeError: Cannot "
        "resolve 192.0.2.1 to a (local) address; leaving the job so the others go on without it"
    )
    assert agent.records[-1] == (
        "gave_up",
        {"round": 2, "attempts": 3, "reason": "Cannot resolve 192.0.2.1 to a (local) address"},
    )
    agent, group = make(["own"] * 12 + ["ok"], max_retries=0)  # 0: retried for ever
    assert torch.equal(mean(group), torch.ones(8)) and group.rounds_redone == 12
    never = r"max_retries must be an integer >= 0 \(0 = never give up\); got "
    for bad in (-1, 2.5, True, "3", None):
        with pytest.raises(ValueError, match=never + re.escape(repr(bad))):
            ElasticGroup(Agent([]), max_retries=bad)


def test_a_joiner_or_restarted_worker_starts_from_the_jobs_reduce_time_not_the_ceiling():
    """The soak run's case: a worker back from its checkpoint had no reduce time of its own, so its
    first round waited the 120 s ceiling (130 s with the rendezvous' margin) for a peer whose
    contribution never came. The job state (a donor's transfer, a checkpoint) carries the sender's
    smoothed reduce time, and a process without one of its own starts from it."""
    from lowcomm.comm import LocalGroup
    from lowcomm.lm import GPT, GPTConfig
    from lowcomm.optim import DiLoCo
    from lowcomm.runtime.elastic import ElasticGroup, job_state, load_job_state

    class Agent:
        worker_id, next_round, step = "w1", 0, 0

    model = GPT(GPTConfig(n_embd=16, n_layer=1, n_head=2, seq_len=8))
    (local,) = LocalGroup.create(1)
    diloco = DiLoCo(model, torch.optim.AdamW(model.parameters()), local, sync_every=4)
    donor, fresh = ElasticGroup(Agent()), ElasticGroup(Agent())
    assert fresh.collective_deadline() == fresh.collective_ceiling_s == 120.0  # nothing observed
    donor.adopt_collective_s(0.3)  # as if its rounds had taken 0.3 s
    state = job_state(diloco, donor)
    assert state["collective_s"] == 0.3
    load_job_state(diloco, fresh, state)
    assert fresh.collective_s == 0.3 and fresh.collective_deadline() == 5.0  # 10 x 0.3 s, floor 5 s
    fresh.adopt_collective_s(2.0)  # its own figure, once it has one, is kept
    assert fresh.collective_deadline() == 5.0
    for bad in (None, float("nan"), float("inf"), -1.0, 0.0, "2"):  # an older lowcomm's state has none
        g = ElasticGroup(Agent())
        load_job_state(diloco, g, {**state, "collective_s": bad})
        assert g.collective_s is None and g.collective_deadline() == 120.0, bad


@pytest.mark.parametrize(("version", "legacy"), [("2.4.1", True), ("2.7.1+cu126", True), ("2.8.0", False)])
def test_the_store_serving_a_handed_socket_takes_the_backend_its_torch_allows(monkeypatch, version, legacy):
    """TCPStore's libuv backend serves a socket it is handed only from torch 2.8 on: before, the
    coordinator's store must ask for the legacy one (torch 2.4 refused to start it). Versions
    compare as versions (2.10 is after 2.8)."""
    from torch.torch_version import TorchVersion

    from lowcomm._compat import listen_fd_store_kwargs

    monkeypatch.setattr(torch, "__version__", TorchVersion(version))
    assert listen_fd_store_kwargs() == ({"use_libuv": False} if legacy else {})
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.10.0"))
    assert listen_fd_store_kwargs() == {}


def test_hosts_and_names_are_checked_as_the_network_takes_them():
    from lowcomm.runtime.net import valid_host, valid_name

    for ok in ("localhost", "10.0.0.5", "::1", "[::1]", "node-1.cluster.local", "node_1", "a.b."):
        assert valid_host(ok), ok
    for bad in ("", "not an ip!", "-node", "node-", "a..b", "a" * 64, "x/y", "[10.0.0.5", "tcp://h"):
        assert not valid_host(bad), bad
    assert valid_name("w0") and valid_name("h-1234") and not valid_name("a b") and not valid_name("x" * 129)


def test_an_ipv6_endpoint_is_refused_by_name():
    """The control plane's sockets are IPv4: a worker given tcp://[::1]:PORT connected and never
    reached the coordinator (600 s, then 'no reply'); a coordinator's bind failed in its store
    ('Name or service not known')."""
    from lowcomm.runtime.net import check_endpoint
    from lowcomm.runtime.trainer import TrainConfig

    for endpoint in ("tcp://[::1]:29400", "tcp://::1:29400", "tcp://[fe80::1]:0"):
        for bind in (False, True):
            with pytest.raises(
                ValueError, match=r"is not allowed: an IPv4 address or a host name: the control"
            ):
                check_endpoint(endpoint, "coordinator", "tcp://host:29400", bind=bind)
    assert check_endpoint("tcp://127.0.0.1:29400", "coordinator", "") == "tcp://127.0.0.1:29400"
    assert check_endpoint("tcp://node-1:29400", "coordinator", "") == "tcp://node-1:29400"
    with pytest.raises(ValueError, match=r"coordinator='tcp://\[::1\]:29400' is not allowed: an IPv4"):
        TrainConfig.from_flat(coordinator="tcp://[::1]:29400")


def test_coordinator_and_status_settings_are_refused_by_name_before_any_socket(monkeypatch, capsys):
    """A quorum setting is refused before the coordinator binds (the port here is taken: a bind
    first would be refused for that instead), in the flags' words; so are a status --timeout that
    is not a number of seconds > 0 (it was accepted: 'no reply ... within -1.0s') and a deadline
    given as inf."""
    import socket

    from lowcomm.runtime.cli import main
    from lowcomm.runtime.elastic import Coordinator

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    bind = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
    try:
        for kw, match in [
            (dict(min_workers=0), r"^min_workers=0 is not allowed: an int in \[1, 4096\]"),
            # a quorum no job can reach (a job takes 4096 members): the job waited for ever
            (dict(min_workers=4097), r"^min_workers=4097 is not allowed: an int in \[1, 4096\]"),
            (dict(grace=float("inf")), r"^grace=inf is not allowed: a finite number of seconds >= 0$"),
        ]:
            with pytest.raises(ValueError, match=match):
                Coordinator(bind, "t", KEY, **kw)
        with pytest.raises(ValueError, match=f"bind='{bind}' is not allowed"):  # the port is taken
            Coordinator(bind, "t", KEY)
    finally:
        taken.close()
    # a store host that is not this machine's (TEST-NET-1) or not a host: refused by name (they were
    # a socket.gaierror / OSError traceback), and the coordinator's port is free again after it
    from lowcomm.comm.net import free_port

    bind = f"tcp://127.0.0.1:{free_port()}"
    for host, match in [("192.0.2.1", "an address of this host"), ("bad host", "an IP address or host name")]:
        with pytest.raises(ValueError, match=rf"^store_host='{host}' is not allowed: {match}"):
            Coordinator(bind, "t", KEY, store_host=host)
    coord = Coordinator(bind, "t", KEY)
    coord._sock.close(0)
    monkeypatch.setenv("LOWCOMM_KEY", KEY.hex())
    cases = {
        (
            "status",
            "tcp://127.0.0.1:9",
            "--timeout",
            "-1",
        ): "timeout=-1.0 is not allowed: a finite number of seconds > 0",
        ("status", "tcp://127.0.0.1:9", "--timeout", "nan"): "timeout=nan is not allowed",
        ("coordinator", "--bind", bind, "--min-workers", "0"): (
            "min_workers=0 is not allowed: an int in [1, 4096]"
        ),
        ("coordinator", "--bind", bind, "--deadline-ceiling", "inf"): (
            "deadline_floor=2.0 and deadline_ceiling=inf are not allowed: 0 < floor <= ceiling"
        ),
        ("coordinator", "--bind", bind, "--round-deadline-floor", "0"): "round_deadline_floor=0.0 and",
        # (a missing key file was "[Errno 2] No such file or directory: '/no/such/key'")
        ("status", "tcp://127.0.0.1:9", "--key", "@/no/such/key"): (
            "key file '/no/such/key' cannot be read: No such file or directory"
        ),
    }
    for argv, match in cases.items():
        assert main(list(argv)) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lowcomm: error: ") and match in err[0], (argv, err)
