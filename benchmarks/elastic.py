"""Elastic membership: recovery time, joiner catch-up, coordinator capacity. Prints JSON.

    python benchmarks/elastic.py recovery --out benchmarks/results/elastic_recovery.json
    python benchmarks/elastic.py catchup --out benchmarks/results/elastic_catchup.json
    python benchmarks/elastic.py capacity --workers 1000 --out benchmarks/results/coordinator_capacity.json

recovery: 4 workers on loopback; one dies inside a round (SIGKILL: its sockets close) or hangs
    inside it (SIGSTOP: nothing closes, only missed heartbeats tell); seconds from the fault to
    the survivors' next completed round, at default settings (gloo's own timeout is 300 s).
catchup: 2 workers and a joiner per model size; state bytes, transfer seconds and throughput,
    and the joiner's time from process start to its first step in sync.
capacity: one coordinator process, N simulated workers (one DEALER socket each, spread over 4
    client processes) heartbeating once a second; reply latency percentiles.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import stamp, write_result

TINY = ["--seq-len", "16", "--batch-size", "2", "--eval-batches", "2", "--threads", "1", "--eval-every", "0"]


def _events(job, wid, kind):
    return job.events(wid, kind)


def recovery(args) -> list[dict]:
    from lowcomm.runtime.elastic import LocalJob, pace

    out = []
    for kind in ("kill", "hang"):
        for trial in range(args.trials):
            tmp = Path(tempfile.mkdtemp(prefix=f"lowcomm-recovery-{kind}-"))
            names = ["w0", "w1", "w2", "w3"]
            flags = [
                *TINY,
                "--model-dim",
                "32",
                "--layers",
                "2",
                "--heads",
                "2",
                "--steps",
                "300",
                "--sync-every",
                "10",
            ]
            job = LocalJob(tmp, flags, ["--min-workers", "4"])
            fault = {"kind": kind, "target": "worker:w3", "at_round": 8, "where": "during_collective"}
            if kind == "hang":
                fault["duration"] = 60
            job.start_coordinator()
            for w in names:
                job.start_worker(w, pace(names, delay=0.03, extra=[fault]))
            job.wait_workers(names[:3], 240)
            t_fault = next(e["wall"] for e in job.events("w3", "fault") if e["fault"] == kind)
            rounds = [e for e in job.events("w0", "round") if e["wall"] > t_fault]
            redone = job.events("w0", "round_redone")
            out.append(
                {
                    "fault": kind,
                    "trial": trial,
                    "death_to_next_round_s": rounds[0]["wall"] - t_fault,
                    "death_to_abort_noticed_s": redone[0]["wall"] - t_fault if redone else None,
                    "survivors_identical": len({job.summary(w)["global_params_sha256"] for w in names[:3]})
                    == 1,
                }
            )
            print(json.dumps(out[-1]), file=sys.stderr, flush=True)
            job.close()
    return out


def catchup(args) -> list[dict]:
    from lowcomm.runtime.elastic import LocalJob, pace

    out = []
    for dim, layers in ((64, 2), (128, 4), (256, 8), (512, 8)):
        tmp = Path(tempfile.mkdtemp(prefix=f"lowcomm-catchup-d{dim}-"))
        flags = [
            *TINY,
            "--model-dim",
            str(dim),
            "--layers",
            str(layers),
            "--heads",
            "4",
            "--steps",
            "120",
            "--sync-every",
            "10",
            "--transfer-inner-state",
        ]
        job = LocalJob(tmp, flags, ["--min-workers", "2"])
        job.start_coordinator()
        for w in ("w0", "w1"):
            job.start_worker(w, pace(["w0", "w1"], delay=0.1))
        job.wait_until(lambda s: s["round"] >= 2, 120, "two rounds")
        t_start = time.time()
        job.start_worker("w2", pace(["w2"], delay=0.1))
        job.wait_workers(["w0", "w1", "w2"], 300)
        served = next(e for w in ("w0", "w1") for e in job.events(w, "transfer") if e["what"] == "served")
        received = next(e for e in job.events("w2", "transfer") if e["what"] == "received")
        params = job.summary("w2")["params"]
        out.append(
            {
                "model_dim": dim,
                "layers": layers,
                "params": params,
                "state_bytes": served["bytes"],
                "transfer_s": served["seconds"],
                "throughput_MBps": served["bytes"] / served["seconds"] / 1e6,
                "joiner_start_to_in_sync_s": received["wall"] - t_start,
                "identical": len({job.summary(w)["global_params_sha256"] for w in ("w0", "w1", "w2")}) == 1,
            }
        )
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)
        job.close()
    return out


def _client_proc(endpoint, key, ids, seconds, q):
    import zmq

    from lowcomm.runtime.elastic.protocol import Signer, deserialize, serialize

    signer = Signer(key)
    ctx = zmq.Context()
    socks, poller = {}, zmq.Poller()
    for wid in ids:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        socks[wid] = s
        poller.register(s, zmq.POLLIN)
    seq = time.time_ns()
    sent: dict[str, float] = {}

    def send(wid, kind, body):
        nonlocal seq
        seq += 1
        frames = serialize(signer, kind, body, sender=wid, seq=seq)
        import msgpack

        sent[msgpack.unpackb(frames[2])["id"]] = time.perf_counter()
        socks[wid].send_multipart(frames)

    lat = []
    for wid in ids:
        send(wid, "register", {"worker_id": wid, "advertise_addr": "127.0.0.1", "step": 0})
    rng = random.Random(ids[0])
    next_at = {wid: time.perf_counter() + rng.random() for wid in ids}
    end = time.perf_counter() + seconds
    warm = time.perf_counter() + 2.0
    while time.perf_counter() < end:
        now = time.perf_counter()
        for wid in ids:
            if next_at[wid] <= now:
                send(wid, "heartbeat", {"worker_id": wid, "step": 1, "round": 0})
                next_at[wid] += 1.0
        for s, _ in poller.poll(5):
            while True:
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                msg = deserialize(frames, signer)
                t0 = sent.pop(msg.re, None)
                if t0 is not None and msg.type == "heartbeat_reply" and t0 > warm:
                    lat.append(time.perf_counter() - t0)
    q.put(lat)


def capacity(args) -> dict:
    from lowcomm.runtime.elastic.protocol import new_key

    key_hex = new_key()
    env = {**os.environ, "LOWCOMM_KEY": key_hex}
    port = 29700 + random.randrange(200)
    endpoint = f"tcp://127.0.0.1:{port}"
    coord = subprocess.Popen(
        [sys.executable, "-m", "lowcomm", "coordinator", "--bind", endpoint, "--deadline-ceiling", "30"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    coord.stdout.readline()
    procs, q = [], mp.Queue()
    n_proc = args.client_procs
    ids = [f"sim{i:05d}" for i in range(args.workers)]
    for k in range(n_proc):
        p = mp.Process(
            target=_client_proc, args=(endpoint, bytes.fromhex(key_hex), ids[k::n_proc], args.seconds, q)
        )
        p.start()
        procs.append(p)
    lat = []
    for _ in procs:
        lat += q.get(timeout=args.seconds + 60)
    for p in procs:
        p.join(10)
    coord.kill()
    lat.sort()

    def pct(p):
        return 1000 * lat[min(int(p / 100 * len(lat)), len(lat) - 1)]

    return {
        "workers": args.workers,
        "heartbeat_interval_s": 1.0,
        "seconds": args.seconds,
        "replies": len(lat),
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "max_ms": 1000 * lat[-1],
        "goal_p99_ms": 10.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["recovery", "catchup", "capacity"])
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--client-procs", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = {"recovery": recovery, "catchup": catchup, "capacity": capacity}[args.what](args)
    write_result({**stamp(f"elastic/{args.what}"), "result": result}, args.out)


if __name__ == "__main__":
    main()
