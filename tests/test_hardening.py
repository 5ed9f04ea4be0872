"""A hostile day for the control plane: floods that pass the key check, replays across a restart,
names that try to forge log lines, and where the job's store listens."""

import os
import subprocess
import sys
import time

import msgpack
import pytest
import zmq
from helpers import write_corpus

from lowcomm.runtime.elastic import Coordinator, CoordinatorClient, LocalJob
from lowcomm.runtime.elastic.protocol import (
    ProtocolError,
    ReplayGuard,
    Signer,
    deserialize,
    new_key,
    serialize,
)
from lowcomm.runtime.errors import CoordinatorRefused

KEY = bytes.fromhex(new_key())
SIGNER = Signer(KEY)


#: a model small enough that a worker process reaches the coordinator in seconds
TINY = ["--model-dim", "16", "--layers", "1", "--heads", "2", "--seq-len", "8", "--batch-size", "2"]


def _coordinator(tmp_path, *flags):
    job = LocalJob(tmp_path, [], ["--deadline-floor", "30", "--deadline-ceiling", "60", *flags])
    job.key = KEY.hex()
    job.env["LOWCOMM_KEY"] = job.key
    job.start_coordinator()
    job.wait_until(lambda st: True, 30, "the coordinator to answer")
    return job


def _flood(endpoint: str, messages, window: int = 2000) -> list[dict]:
    """Send signed messages, at most ``window`` unanswered at a time; return the decoded replies."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    replies, in_flight = [], 0
    for frames in messages:
        sock.send_multipart(frames)
        in_flight += 1
        while in_flight >= window or (in_flight and sock.poll(0)):
            if not sock.poll(20_000):
                raise TimeoutError(f"the coordinator stopped answering after {len(replies)} replies")
            replies.append(deserialize(sock.recv_multipart(), SIGNER))
            in_flight -= 1
    while in_flight:
        if not sock.poll(20_000):
            raise TimeoutError(f"the coordinator stopped answering after {len(replies)} replies")
        replies.append(deserialize(sock.recv_multipart(), SIGNER))
        in_flight -= 1
    sock.close(0)
    return replies


def test_the_coordinator_stays_up_under_5000_registrations_and_20000_senders(tmp_path):
    """Its replay table held to 10,000 senders (--max-senders; 100,000 by default) so that twice
    that many distinct senders cost a second, not ten."""
    job = _coordinator(tmp_path, "--max-senders", "10000")
    try:
        regs = (
            serialize(
                SIGNER,
                "register",
                {"worker_id": f"m{i}", "advertise_addr": "10.0.0.1", "step": 0},
                sender=f"m{i}",
                seq=1,
            )
            for i in range(5000)
        )
        replies = _flood(job.endpoint, regs)
        kinds = [r.type for r in replies]
        assert kinds.count("register_reply") == 4096 and kinds.count("error") == 904
        refusal = next(r for r in replies if r.type == "error")
        assert refusal.body["code"] == "full" and refusal.re  # named by the request's id
        status = job.status()
        assert status["total"] == 4096 and len(status["members"]) == 200  # one page fits a message
        known = CoordinatorClient(job.endpoint, KEY, "known", timeout_s=10)
        known.request("status", {"limit": 1})  # an active sender before the flood
        # 20,000 distinct senders within one replay window: past the table's 10,000 (which holds
        # the 5,000 registrations', the known one's and a few status clients') the new ones are
        # refused by name (with their request's id), the coordinator keeps serving
        stats = (serialize(SIGNER, "status", {"limit": 1}, sender=f"s{i}", seq=1) for i in range(20_000))
        replies = _flood(job.endpoint, stats)
        refused = [r for r in replies if r.type == "error"]
        assert len(replies) == 20_000 and 15_001 <= len(refused) <= 15_100 and refused[0].re
        assert "too many senders active" in refused[0].body["reason"]
        assert job.coord.poll() is None  # alive
        assert known.request("status", {"limit": 5}).body["total"] == 4096  # an active sender is served
        known.close()
    finally:
        job.close()


def test_a_message_replayed_to_a_restarted_coordinator_is_refused(tmp_path):
    job = _coordinator(tmp_path)
    try:
        client = CoordinatorClient(job.endpoint, KEY, "w1/main")
        client.request("register", {"worker_id": "w1", "advertise_addr": "127.0.0.1", "step": 0})
        assert client.inst  # it learned which coordinator process answers
        captured = serialize(
            SIGNER,
            "register",
            {"worker_id": "w1", "advertise_addr": "127.0.0.1", "step": 5},
            sender="w1/main",
            seq=time.time_ns(),
            inst=client.inst,
        )
        job.coord.kill()
        job.coord.wait(10)
        job.start_coordinator()
        job.wait_until(lambda st: True, 30, "the restarted coordinator")
        (reply,) = _flood(job.endpoint, [captured])
        assert reply.type == "error" and reply.body["code"] == "stale_instance"
        assert job.status()["total"] == 0  # not registered by the replay
        # the real client resends to the new process by itself
        assert client.request("register", {"worker_id": "w1", "advertise_addr": "127.0.0.1", "step": 6}).body[
            "synced"
        ]
        client.close()
    finally:
        job.close()


def test_the_store_listens_where_the_coordinator_binds_and_records_hold_no_rendezvous(tmp_path):
    coord = Coordinator("tcp://127.0.0.1:0", "job", KEY)
    try:
        assert coord.store_bound == "127.0.0.1"
        assert coord.state.store.startswith("127.0.0.1:")
    finally:
        coord._sock.close(0)
        del coord._store  # the store closes the socket it was handed (closing it under a live
        # store aborts the process on torch < 2.8, whose store then runs the legacy backend)
    with pytest.raises(ValueError, match="bind='http://x:1' is not allowed"):
        Coordinator("http://x:1", "job", KEY)
    # a port past 65535 was handed to ZeroMQ, which bound something and printed it as given
    with pytest.raises(ValueError, match=r"bind='tcp://0.0.0.0:99999' .* PORT 1-65535 or 0\)"):
        Coordinator("tcp://0.0.0.0:99999", "job", KEY)
    with pytest.raises(ValueError, match="endpoint='notaurl' is not allowed"):  # was ZMQError
        CoordinatorClient("notaurl", KEY, "status")
    with pytest.raises(ValueError, match="job=.* is not allowed: printable ASCII"):
        Coordinator("tcp://127.0.0.1:0", "x" * 300, KEY)
    with pytest.raises(ValueError, match="job=.* is not allowed"):
        Coordinator("tcp://127.0.0.1:0", "two words", KEY)
    with pytest.raises(ValueError, match=r"max_senders=100 is not allowed: an integer >= 9216 \(two"):
        Coordinator("tcp://127.0.0.1:0", "job", KEY, max_senders=100)


def test_a_stopped_coordinator_ends_cleanly_and_its_store_stops_listening():
    """serve() ends without an error when stopped, and the store's socket closes with the store:
    the store owns it (it used to be closed a second time after the store had closed it)."""
    import socket
    import threading

    coord = Coordinator("tcp://127.0.0.1:0", "job", KEY)
    port = int(coord.state.store.rsplit(":", 1)[1])
    errors = []

    def serve():
        try:
            coord.serve()
        except BaseException as e:  # noqa: BLE001 - the test reports whatever escaped
            errors.append(e)

    t = threading.Thread(target=serve)
    t.start()
    socket.create_connection(("127.0.0.1", port), timeout=5).close()  # the store serves
    coord.stop()
    t.join(10)
    assert not t.is_alive() and errors == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_a_name_with_a_newline_is_refused_before_it_reaches_a_log():
    frames = serialize(SIGNER, "status", {}, sender="ok", seq=1)
    h = msgpack.unpackb(frames[2])
    h["sender"] = "w1\n2026-11-30 INFO lowcomm: forged line"
    hb = msgpack.packb(h)
    with pytest.raises(ProtocolError, match="printable ASCII without spaces") as e:
        deserialize([frames[0], SIGNER.sign(hb, frames[3]), hb, frames[3]], SIGNER)
    assert e.value.request_id == h["id"]  # the refusal can name the request
    body = {"worker_id": "w\x1b[2J", "advertise_addr": "h", "step": 0}
    with pytest.raises(ValueError, match="printable ASCII"):
        serialize(SIGNER, "register", body, sender="w", seq=1)


def test_the_replay_guard_forgets_senders_silent_past_its_window_and_refuses_only_while_full():
    guard = ReplayGuard(window_s=300.0, max_senders=3)
    for i, name in enumerate(("a", "b", "c")):
        guard.check(name, 1, ts=1000.0 + i, now=1000.0 + i)
    with pytest.raises(ProtocolError, match="too many senders active within 300s"):
        guard.check("d", 1, ts=1010.0, now=1010.0)
    guard.check("a", 2, ts=1200.0, now=1200.0)  # a stays active
    guard.check("d", 1, ts=1302.5, now=1302.5)  # b and c were silent > 300 s: forgotten
    assert len(guard) == 2
    with pytest.raises(ProtocolError, match="replayed"):
        guard.check("a", 2, ts=1303.0, now=1303.0)
    guard.forget("d")
    guard.check("d", 1, ts=1304.0, now=1304.0)


def test_a_worker_with_the_wrong_key_says_so_and_exits_2(tmp_path):
    job = _coordinator(tmp_path)
    try:
        env = {**os.environ, "LOWCOMM_KEY": new_key()}
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "lowcomm",
                "train",
                "--coordinator",
                job.endpoint,
                "--run-dir",
                str(tmp_path / "w"),
                *TINY,  # the refusal comes at registration, whatever the model and data
                "--corpus",
                str(write_corpus(tmp_path / "corpus")),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert r.returncode == 2, r.stderr
        assert "rejects this key" in r.stderr and r.stderr.count("\n") <= 3
    finally:
        job.close()


def test_a_worker_of_another_configuration_says_so_and_exits_2(tmp_path):
    """A worker whose model differs from the job's is bad input: one line naming both
    configurations, exit code 2, and it never becomes a member."""
    job = _coordinator(tmp_path)
    try:
        c = CoordinatorClient(job.endpoint, KEY, "w0/main")
        c.request(
            "register", {"worker_id": "w0", "advertise_addr": "127.0.0.1", "step": 0, "fingerprint": "f" * 64}
        )
        c.close()
        r = subprocess.run(
            [sys.executable, "-m", "lowcomm", "train", "--coordinator", job.endpoint, "--worker-id", "w1",
             "--run-dir", str(tmp_path / "w1"), "--quiet", *TINY],
            capture_output=True,
            text=True,
            timeout=120,
            env=job.env,
        )  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert "runs another configuration" in r.stderr and "ffffffffffff" in r.stderr
        assert r.stderr.strip().count("\n") == 0, r.stderr
        assert [m["worker_id"] for m in job.status()["members"]] == ["w0"]
    finally:
        job.close()


def test_refusals_are_typed_for_the_client(tmp_path):
    job = _coordinator(tmp_path)
    try:
        c = CoordinatorClient(job.endpoint, KEY, "w9/main")
        with pytest.raises(CoordinatorRefused, match="only a joiner asks for state"):
            c.request("register", {"worker_id": "w9", "advertise_addr": "127.0.0.1", "step": 0})
            c.request("join", {"worker_id": "w9", "failed": []})
        c.close()
    finally:
        job.close()
