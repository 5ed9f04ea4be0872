"""Your own training loop as an elastic DiLoCo worker, with lowcomm's fault injection.

    python examples/embed_elastic.py                      # 3 workers, a corrupt payload and a slow link
    LOWCOMM_FAULTS=plan.toml python examples/embed_elastic.py    # any fault plan instead

The script starts a coordinator (a thread here; `lowcomm coordinator` on a real cluster) and
three worker processes of itself on 127.0.0.1. Each worker is a plain PyTorch loop around a small
MLP with BatchNorm: lowcomm's WorkerAgent keeps it in the job, ElasticGroup carries its rounds, and the same
FaultInjector the `lowcomm train` workers use fires the plan's faults at the same hook points.
The workers print one JSON line each; the script checks that they all hold the same global
parameters and BatchNorm statistics and prints which contributions the guards excluded.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading

import torch
from torch import nn

import lowcomm
from lowcomm.runtime import NO_FAULTS
from lowcomm.runtime.elastic import (
    Coordinator,
    ElasticGroup,
    ResyncRequired,
    WorkerAgent,
    job_state,
    load_job_state,
    new_key,
)
from lowcomm.runtime.faults import FaultInjector

WORKERS = ["w0", "w1", "w2"]
DEMO_PLAN = {
    "seed": 0,
    "faults": [
        {"kind": "corrupt", "target": "worker:w1", "at_round": 2},
        {"kind": "slow-link", "target": "worker:w2", "at_step": 40, "duration": 1.0, "latency": "50ms"},
    ],
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 64)
        # BatchNorm's running statistics are averaged with their block's rounds (sync_buffers)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.GELU()) for _ in range(2)
        )
        self.out = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


def worker(endpoint: str, worker_id: str, steps: int) -> None:
    torch.manual_seed(0)  # every worker starts from the same model
    torch.set_num_threads(1)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    events: list[dict] = []

    def record(kind: str, **fields) -> None:  # your logger; lowcomm's trainer writes events.jsonl
        events.append({"kind": kind, **fields})

    # the fault plan of $LOWCOMM_FAULTS, fired at the same hook points as in `lowcomm train` workers
    hooks = FaultInjector.from_env(worker_id, record=record) or NO_FAULTS
    key = bytes.fromhex(os.environ["LOWCOMM_KEY"])
    agent = WorkerAgent(endpoint, key, worker_id, record=record, hooks=hooks)
    group = ElasticGroup(agent, hooks=hooks)
    diloco = lowcomm.DiLoCo(model, opt, group, sync_every=10, codec="int8")  # before agent.start()

    def load(state: dict) -> None:  # a joiner (or a worker left out of a round) takes the job's state
        load_job_state(diloco, group, state)

    if not agent.start():
        agent.join(load)
    gen = torch.Generator().manual_seed(WORKERS.index(worker_id))
    w_true = torch.linspace(-1, 1, 8)[:, None]
    finished = False
    try:
        while diloco.step_count < steps:
            step = diloco.step_count + 1
            hooks.before_step(step)
            x = torch.randn(32, 8, generator=gen)
            loss = nn.functional.mse_loss(model(x), torch.tanh(x @ w_true))
            loss.backward()
            opt.step()
            opt.zero_grad()
            try:
                diloco.step()
            except ResyncRequired:
                agent.join(load)
                continue
            agent.step = diloco.step_count
            hooks.after_step(step)
            if diloco.in_flight == 0:  # hand the job's state to joiners at a quiet step
                agent.serve_pending(lambda: job_state(diloco, group))
        diloco.apply_due(final=True)
        finished = True
    finally:
        agent.close(leave=True, finished=finished)
    digest = hashlib.sha256(diloco.global_vector().numpy().tobytes()).hexdigest()
    stats = torch.cat([b.reshape(-1) for n, b in model.named_buffers() if "running" in n])
    stats_digest = hashlib.sha256(stats.numpy().tobytes()).hexdigest()
    excluded = {e["round"]: e["contributions"] for e in events if e["kind"] == "excluded"}
    faults = [e["fault"] for e in events if e["kind"] == "fault"]
    print(
        json.dumps(
            {
                "worker": worker_id,
                "loss": loss.item(),
                "digest": digest,
                "stats_digest": stats_digest,
                "excluded": excluded,
                "faults": faults,
            }
        ),
        flush=True,
    )
    os._exit(0)  # a collective given up on a lost peer may leave a gloo thread behind


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.endpoint, args.worker, args.steps)
        return 0
    key = new_key()
    coord = Coordinator("tcp://127.0.0.1:0", "embed-elastic", bytes.fromhex(key), min_workers=len(WORKERS))
    threading.Thread(target=coord.serve, daemon=True).start()
    env = {**os.environ, "LOWCOMM_KEY": key}
    env.setdefault("LOWCOMM_FAULTS", json.dumps(DEMO_PLAN))
    cmd = [sys.executable, __file__, "--endpoint", coord.endpoint, "--steps", str(args.steps), "--worker"]
    procs = [subprocess.Popen([*cmd, w], env=env, stdout=subprocess.PIPE, text=True) for w in WORKERS]
    results = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]
    coord.stop()
    for r in results:
        print(f"{r['worker']}: loss {r['loss']:.4f}, faults {r['faults']}, global params {r['digest'][:16]}")
    excluded = {k: v for r in results for k, v in r["excluded"].items()}
    print(f"contributions excluded by every worker: {excluded or 'none'}")
    same = len({(r["digest"], r["stats_digest"]) for r in results}) == 1
    print(
        "all workers hold identical global parameters and BatchNorm statistics"
        if same
        else "global parameters or BatchNorm statistics DIFFER"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
