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
from dataclasses import replace

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


def build(out: str, sc: dict, topo, name: str):
    """The scenario's model (sharded by FSDP2 with ``fsdp``: over the replica's processes, or with
    ``fsdp_world`` over the whole job, the mistake), the module that runs it, AdamW and DiLoCo."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(1 if sc.get("seed_rank") == topo.rank else 0)  # a different init there
    cfg = replace(TINY, n_embd=32) if sc.get("wide_rank") == topo.rank else TINY  # another model there
    model = NormLM() if sc.get("model") == "norm" else GPT(cfg)
    runner = model
    if sc.get("fsdp") or sc.get("fsdp_world"):
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard

        if sc.get("fsdp_world"):
            mesh = init_device_mesh("cpu", (topo.world_size,))
        else:
            mesh = DeviceMesh.from_group(topo.inner, "cpu")
        fully_shard(model, mesh=mesh)
    elif topo.inner is not None:
        runner = DDP(model, process_group=topo.inner)
    elif sc.get("ddp_world"):  # the mistake of a framework that saw the launcher's environment
        runner = model = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    group = DistributedGroup(
        topo.outer.pg,
        store=topo.outer.store,
        name=name,
        timeout=float(os.environ.get("TEST_TIMEOUT", "60")),
    )
    if "bucket_elems" in sc:
        group.bucket_elems = sc["bucket_elems"]
    kw = dict(sc["diloco"])
    if sc.get("mismatch_rank") == topo.rank:
        kw.update(sc["mismatch"])
    try:
        dil = DiLoCo(model, opt, group, shard_group=topo.inner if sc.get("shard") else None, **kw)
    except ValueError as e:  # as the other refusals: no teardown of a group the peer is leaving too
        _refused(out, sc, topo.rank, str(e), 3)
    return model, runner, opt, group, dil


def reload(out: str, sc: dict, topo, model, opt, group, dil):
    """Save the model, AdamW and DiLoCo with torch.distributed.checkpoint over the replica's own
    processes (as torchtitan does, each replica in a folder of its own), then build them anew
    and load them: what a resumed job trains with."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = f"{out}/{sc['name']}-ckpt/replica{topo.replica}"
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd, "diloco": dil}, checkpoint_id=folder, **topo.checkpoint_scope())
    group.close()  # the saved round's collective finishes first (a new process has no other)
    model, runner, opt, group, dil = build(out, sc, topo, sc["name"] + "-resumed")
    # (the loader takes an optimizer step at lr 0 to make AdamW's state, after DiLoCo counts steps)
    msd, osd = get_state_dict(model, opt)
    dcp.load({"model": msd, "optim": osd, "diloco": dil}, checkpoint_id=folder, **topo.checkpoint_scope())
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    return model, runner, opt, group, dil


def full(t: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value (a DTensor's gathered from its shards)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main() -> None:
    out, scenarios = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(1)
    collected = Collect()
    logging.getLogger("lowcomm").addHandler(collected)
    topo = init_from_torchrun(timeout_s=float(os.environ.get("TEST_TIMEOUT", "60")))
    for sc in scenarios:
        collected.messages.clear()
        model, runner, opt, group, dil = build(out, sc, topo, sc["name"])
        stream = topo.replica * topo.procs_per_replica + topo.local_rank
        rounds, in_flight_at_reload = [], None
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
            if step == sc.get("reload_at"):
                in_flight_at_reload = dil.in_flight
                model, runner, opt, group, dil = reload(out, sc, topo, model, opt, group, dil)
        evaluated = None
        if sc.get("eval"):  # a loss without backward, then of the global parameters, then again
            with torch.no_grad():
                x = batch(0, 0)
                local = runner(*x)
                with dil.global_parameters():
                    evaluated = [local, runner(*x)]
                evaluated.append(runner(*x))
        if sc.get("finish"):  # sync what is left, as a training script does at its end
            try:
                dil.finish()
            except Exception as e:
                _refused(out, sc, topo.rank, f"{type(e).__name__}: {e}", 4)
        torch.save(
            {
                "global": dil.global_vector(),
                "local": torch.cat([full(p.detach()).reshape(-1) for p in model.parameters()]),
                "state": dil.state_dict(),
                "buffers": [model.get_buffer(n) for n in synced_buffers(model)],
                "rounds": rounds,
                "fragment_numels": dil.fragment_numels(),
                "warnings": list(collected.messages),
                "in_flight_at_reload": in_flight_at_reload,
                "evaluated": evaluated,  # losses: local, global, local again
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
