"""A worker of the multi-process tests: started by ``lowcomm launch`` (real processes, loopback).

    python tests/_dist_worker.py OUT_DIR SCENARIOS_JSON

Each scenario trains the tiny GPT (or a model with BatchNorm) with DiLoCo over the job's
DistributedGroup and saves, per rank, the final global and local parameters, buffers and
per-round bytes to OUT_DIR/<name>.rank<r>.pt.
"""

import json
import logging
import os
import sys
import time

import torch
import torch.distributed as dist
from helpers import NormLM  # (this script's folder is on the path)

from lowcomm import DiLoCo
from lowcomm.comm import DistributedGroup
from lowcomm.lm import GPT, GPTConfig
from lowcomm.optim.fragments import synced_buffers
from lowcomm.runtime.trainer.topology import init_from_torchrun

TINY = GPTConfig(vocab_size=32, seq_len=8, n_layer=3, n_head=2, n_embd=16)


def batch(step: int, stream: int):
    g = torch.Generator().manual_seed(1000 * step + stream)
    x = torch.randint(0, 32, (2, 8), generator=g)
    return x, torch.roll(x, -1, dims=1)


class Collect(logging.Handler):
    """Keeps the lowcomm logger's warnings, saved with the results."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _refused(out: str, sc: dict, rank: int, message: str, code: int) -> None:
    """Write this rank's refusal and exit with ``code``. With ``await_peers`` (a scenario where every
    rank refuses), first wait (up to 30 s) for every rank's refusal: the first rank out would end
    the job (the launcher stops the others, and rank 0 hosts the store), maybe before a slower
    rank got to its own."""
    open(f"{out}/{sc['name']}.rank{rank}.err", "w").write(message)
    if sc.get("await_peers"):
        deadline = time.monotonic() + 30
        paths = [f"{out}/{sc['name']}.rank{r}.err" for r in range(dist.get_world_size())]
        while not all(os.path.exists(p) for p in paths) and time.monotonic() < deadline:
            time.sleep(0.05)
    os._exit(code)


def main() -> None:
    out, scenarios = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(1)
    collected = Collect()
    logging.getLogger("lowcomm").addHandler(collected)
    topo = init_from_torchrun(timeout_s=float(os.environ.get("TEST_TIMEOUT", "60")))
    for sc in scenarios:
        torch.manual_seed(1 if sc.get("seed_rank") == topo.rank else 0)  # a different init there
        model = NormLM() if sc.get("model") == "norm" else GPT(TINY)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
        runner = model
        from torch.nn.parallel import DistributedDataParallel as DDP

        if topo.inner is not None:
            runner = DDP(model, process_group=topo.inner)
        elif sc.get("ddp_world"):  # the mistake of a framework that saw the launcher's environment
            runner = model = DDP(model)
        group = DistributedGroup(
            topo.outer.pg,
            store=topo.outer.store,
            name=sc["name"],
            timeout=float(os.environ.get("TEST_TIMEOUT", "60")),
        )
        if "bucket_elems" in sc:
            group.bucket_elems = sc["bucket_elems"]
        kw = dict(sc["diloco"])
        if sc.get("mismatch_rank") == topo.rank:
            kw.update(sc["mismatch"])
        try:
            collected.messages.clear()
            dil = DiLoCo(model, opt, group, shard_group=topo.inner if sc.get("shard") else None, **kw)
        except ValueError as e:  # as the other refusals: no teardown of a group the peer is leaving too
            _refused(out, sc, topo.rank, str(e), 3)
        stream = topo.replica * topo.procs_per_replica + topo.local_rank
        rounds = []
        steps = sc.get("short_steps", sc["steps"]) if sc.get("short_rank") == topo.rank else sc["steps"]
        for step in range(1, steps + 1):
            if sc.get("hang_rank") == topo.rank and step == sc["hang_step"]:
                time.sleep(600)
            runner(*batch(step, stream)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            try:
                dil.step()
            except Exception as e:
                _refused(out, sc, topo.rank, f"{type(e).__name__}: {e}", 4)
            rounds += [r.to_dict() for r in dil.drain_round_stats()]
        if sc.get("finish"):  # sync what is left, as a training script does at its end
            try:
                dil.finish()
            except Exception as e:
                _refused(out, sc, topo.rank, f"{type(e).__name__}: {e}", 4)
        torch.save(
            {
                "global": dil.global_vector(),
                "local": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
                "buffers": [model.get_buffer(n) for n in synced_buffers(model)],
                "rounds": rounds,
                "fragment_numels": dil.fragment_numels(),
                "warnings": list(collected.messages),
            },
            f"{out}/{sc['name']}.rank{topo.rank}.pt",
        )
        if sc.get("natural_exit"):  # a script that ends with a round in flight and no cleanup
            return
        group.close()
    # every rank past its last collective before any tears its groups down (rank 0 hosts the store);
    # then out without the interpreter's shutdown, where gloo's threads can abort a process (seen
    # once in 2x2 DDP: "terminate called without an active exception"), as `lowcomm train` does
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
