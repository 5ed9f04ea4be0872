"""DistributedGroup with real processes over gloo on 127.0.0.1, started by ``lowcomm launch``."""

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lowcomm import DiLoCo, LocalGroup, finish_replicas, step_replicas
from lowcomm.comm import get_codec, shard_bounds, wire_bytes
from lowcomm.comm.distributed import LinkEmulator, parse_bandwidth, parse_duration

WORKER = str(Path(__file__).with_name("_dist_worker.py"))
sys.path.insert(0, str(Path(__file__).parent))
from _dist_worker import TINY, batch  # noqa: E402
from helpers import TINY_FLAGS, NormLM, launch_train, srun_tasks, write_corpus  # noqa: E402

VANILLA = {"name": "vanilla", "steps": 8, "diloco": {"sync_every": 4}}
STREAMING = {
    "name": "streaming",
    "steps": 13,
    "bucket_elems": 96,  # many buckets, parameters straddling their edges; LocalGroup uses one
    "diloco": {
        "sync_every": 8,
        "fragments": 4,
        "overlap": 1,
        "alpha": 0.5,
        "codec": "e3m0",
        "codec_block": 32,
        "error_feedback": True,
    },
}
#: BatchNorm's running statistics, averaged with their fragments' rounds (fp32 beside int8)
NORMED = {
    "name": "normed",
    "model": "norm",
    "steps": 11,
    "finish": True,  # every fragment's last round: the statistics end alike
    "diloco": {"sync_every": 4, "fragments": 3, "overlap": 1, "codec": "int8", "codec_block": 32},
}


def _launch(tmp_path, scenarios, replicas, procs_per_replica=1, timeout=180, env=None):
    cmd = [
        sys.executable,
        "-m",
        "lowcomm",
        "launch",
        "--replicas",
        str(replicas),
        "--procs-per-replica",
        str(procs_per_replica),
        "--start",  # (each rank forked from a server that imported torch once: see the README)
        "forkserver",
        "--",
        sys.executable,
        WORKER,
        str(tmp_path),
        json.dumps(scenarios),
    ]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def _local_reference(sc, M):
    torch.manual_seed(0)
    from lowcomm.lm import GPT

    base = NormLM() if sc.get("model") == "norm" else GPT(TINY)
    models = [copy.deepcopy(base) for _ in range(M)]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False) for m in models]
    dil = [DiLoCo(m, o, g, **sc["diloco"]) for m, o, g in zip(models, opts, LocalGroup.create(M))]
    for step in range(1, sc["steps"] + 1):
        for r, (m, o) in enumerate(zip(models, opts)):
            m(*batch(step, r)).backward()
            o.step()
            o.zero_grad(set_to_none=True)
        step_replicas(dil)
    if sc.get("finish"):
        finish_replicas(dil)
    return dil, models


#: STREAMING saved with torch.distributed.checkpoint at step 8 (a round in flight), loaded into a
#: new model, AdamW and DiLoCo, and trained on: one process per replica (no collective)
RESUMED = {**STREAMING, "name": "streaming-resumed", "reload_at": 8}


@pytest.fixture(scope="module")
def four_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist4")
    res = _launch(out, [VANILLA, STREAMING, NORMED, RESUMED], replicas=4)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.parametrize("sc", [VANILLA, STREAMING, NORMED], ids=["vanilla", "streaming_e3m0", "batchnorm"])
def test_four_processes_match_local_group_bit_for_bit(four_process_run, sc):
    dil, models = _local_reference(sc, 4)
    for r in range(4):
        got = torch.load(four_process_run / f"{sc['name']}.rank{r}.pt", weights_only=True)
        assert torch.equal(got["global"], dil[r].global_vector())
        assert torch.equal(got["local"], torch.cat([p.detach().reshape(-1) for p in models[r].parameters()]))
        want = [b for n, b in models[r].named_buffers() if b.is_floating_point()]
        assert len(got["buffers"]) == len(want) == (4 if sc is NORMED else 0)
        assert all(torch.equal(a, b) for a, b in zip(got["buffers"], want))
    if sc is NORMED:  # the last rounds (finish()) left the statistics alike, and not as they started
        buffers = [torch.load(four_process_run / f"normed.rank{r}.pt")["buffers"] for r in range(4)]
        assert all(torch.equal(a, b) for other in buffers[1:] for a, b in zip(other, buffers[0]))
        assert not torch.equal(buffers[0][1], torch.ones_like(buffers[0][1]))


def test_replicas_of_one_process_resume_from_a_distributed_checkpoint_bit_for_bit(four_process_run):
    """Each replica saves to its own folder with Topology.checkpoint_scope() (one process per
    replica: no collective; over the whole job the replicas' states would be saved as one)."""
    for r in range(4):
        whole = torch.load(four_process_run / f"streaming.rank{r}.pt", weights_only=True)
        resumed = torch.load(four_process_run / f"streaming-resumed.rank{r}.pt", weights_only=True)
        assert resumed["in_flight_at_reload"] == 1
        assert torch.equal(resumed["local"], whole["local"]) and _equal(resumed["state"], whole["state"])


def test_bytes_handed_to_collectives_equal_the_formula(four_process_run):
    got = torch.load(four_process_run / "streaming.rank1.pt", weights_only=True)
    codec = get_codec("e3m0", block=32)
    assert got["rounds"], "the run must complete rounds"
    for r in got["rounds"]:
        assert r["bytes_sent"] == wire_bytes(codec, r["numel"], 4, bucket_elems=96)[1]


def test_two_replicas_of_two_ddp_processes_stay_consistent(tmp_path):
    sc = {
        "name": "ddp",
        "steps": 8,
        "shard": True,  # each process of a replica syncs its half of every fragment
        "diloco": {"sync_every": 4, "fragments": 2, "overlap": 1, "codec": "int8", "codec_block": 32},
    }
    res = _launch(tmp_path, [sc], replicas=2, procs_per_replica=2)
    assert res.returncode == 0, res.stderr[-3000:]
    got = [torch.load(tmp_path / f"ddp.rank{r}.pt", weights_only=True) for r in range(4)]
    for g in got[1:]:
        assert torch.equal(g["global"], got[0]["global"])
    # inside a replica DDP keeps the local parameters identical too
    assert torch.equal(got[0]["local"], got[1]["local"]) and torch.equal(got[2]["local"], got[3]["local"])
    assert not torch.equal(got[0]["local"], got[2]["local"])  # replicas did train on different data
    codec = get_codec("int8", block=32)
    for rank, g in enumerate(got):
        assert g["rounds"]
        for r in g["rounds"]:  # the process sent only its shard of the fragment
            lo, hi = shard_bounds(r["numel"], 2, 32)[rank % 2]
            assert r["bytes_sent"] == wire_bytes(codec, hi - lo, 2)[rank // 2]


def _equal(a, b) -> bool:
    """Two saved states alike to the bit: tensors equal, everything else equal."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_equal, a, b))
    return a == b


#: FSDP2 on CPU over gloo: it trains there from torch 2.9 (these tests pass under 2.9.0, 2.10.0,
#: 2.11.0, 2.12.0 and 2.13.0, each in a run of the whole suite). 2.4's fully_shard moved a model to
#: a GPU where one existed (pytorch#132471); 2.6's backward failed ("'Stream' object has no
#: attribute 'record_event'"); 2.7.1's and 2.8.0's ran, but their gloo reduce_scatter_tensor with
#: ReduceOp.AVG, which FSDP2 reduces fp32 gradients with, returned the sum (measured on 2
#: processes): N times the gradients DDP averages (docs/references.md). Sharding a model, without
#: training it, works from 2.6 (the refusal test: 2.6.0, 2.7.1 and 2.8.0)
fsdp2_trains_on_cpu = pytest.mark.skipif(
    torch.__version__ < "2.9",
    reason="FSDP2 training on CPU over gloo: torch 2.6 fails, 2.7's and 2.8's gloo sum where FSDP2 averages",
)
fsdp2_on_cpu = pytest.mark.skipif(torch.__version__ < "2.6", reason="FSDP2 on CPU: verified from torch 2.6")


@fsdp2_trains_on_cpu
def test_fsdp2_replicas_match_ddp_replicas_and_resume_from_a_distributed_checkpoint(tmp_path):
    """Two replicas, each sharded over its two processes by FSDP2 (``fully_shard``: DTensor
    parameters); each process syncs its local shards with the same position of the other replica.

    - With fp32 rounds (elementwise) the job ends on the parameters of the same job with DDP in
      each replica (each process holding the whole model, DiLoCo's shard_group), bit for bit.
    - Saved with torch.distributed.checkpoint over each replica's processes (model, AdamW and
      DiLoCo, as torchtitan saves) with a round in flight, and loaded into new ones, the job ends
      on the parameters and DiLoCo state of the run that never stopped, bit for bit (e3m0 rounds,
      error feedback), for FSDP2 and for DDP with DiLoCo's sharded outer state. Both keep each
      process's part: the checkpoint used to hold one process's momentum for the replica's two
      (torch.distributed.checkpoint keeps one entry per key).
    - The global parameters evaluated (``global_parameters()``) after a forward without backward
      give the DDP job's loss on every process, and the replica's own loss afterwards."""
    exact = {"sync_every": 4, "fragments": 2, "overlap": 1}
    e3m0 = {**exact, "codec": "e3m0", "codec_block": 32, "error_feedback": True}
    scenarios = [
        {"name": "ddp32", "steps": 10, "shard": True, "finish": True, "diloco": exact},
        {"name": "fsdp32", "steps": 10, "fsdp": True, "finish": True, "diloco": exact},
        {"name": "fsdp", "steps": 10, "fsdp": True, "diloco": e3m0},
        {"name": "fsdp-resumed", "steps": 10, "fsdp": True, "reload_at": 6, "diloco": e3m0},
        {"name": "ddp", "steps": 10, "shard": True, "diloco": e3m0},
        {"name": "ddp-resumed", "steps": 10, "shard": True, "reload_at": 6, "diloco": e3m0},
        # evaluation of the global parameters after a forward without backward (alpha 1: the
        # replicas' own parameters stay apart from the global ones)
        {"name": "fsdp-eval", "steps": 8, "fsdp": True, "eval": True, "diloco": {**exact, "alpha": 1.0}},
        {"name": "ddp-eval", "steps": 8, "shard": True, "eval": True, "diloco": {**exact, "alpha": 1.0}},
    ]
    res = _launch(tmp_path, scenarios, replicas=2, procs_per_replica=2, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]

    def got(name):
        return [torch.load(tmp_path / f"{name}.rank{r}.pt", weights_only=True) for r in range(4)]

    ddp32, fsdp32 = got("ddp32"), got("fsdp32")
    for r in range(4):
        assert torch.equal(fsdp32[r]["local"], ddp32[r]["local"]), r
        assert torch.equal(fsdp32[r]["local"], fsdp32[0]["local"])  # every replica ends alike
        assert fsdp32[r]["rounds"] and fsdp32[r]["warnings"] == []
    for name in ("fsdp", "ddp"):
        whole, resumed = got(name), got(f"{name}-resumed")
        for r in range(4):
            assert resumed[r]["in_flight_at_reload"] == 1
            assert [k for k in whole[r]["state"] if k != "version"] == [f"part {r % 2} of 2"]
            assert torch.equal(resumed[r]["local"], whole[r]["local"]), (name, r)
            assert _equal(resumed[r]["state"], whole[r]["state"]), (name, r)
        assert not torch.equal(whole[0]["local"], whole[2]["local"])  # the replicas trained apart
    # FSDP2 keeps its root's parameters gathered after a forward without backward: the global
    # parameters written into the shards were not seen (the same loss as the local ones, another
    # on every replica); now the loss of the global parameters is the DDP job's, on every process
    fsdp, ddp = got("fsdp-eval"), got("ddp-eval")
    for r in range(4):
        local, glob, again = fsdp[r]["evaluated"]
        assert torch.equal(glob, ddp[0]["evaluated"][1]) and not torch.equal(glob, local), r
        assert torch.equal(local, ddp[r]["evaluated"][0]) and torch.equal(again, local), r


@fsdp2_on_cpu
def test_fsdp2_sharded_across_replicas_is_refused_by_name(tmp_path):
    """fully_shard over the whole job (one replica's shards on the other's process): DiLoCo would
    average one replica's shard with another's of other values; refused, naming the ranks."""
    sc = {"name": "across", "steps": 2, "fsdp_world": True, "await_peers": True, "diloco": {"sync_every": 2}}
    res = _launch(tmp_path, [sc], replicas=2)
    assert res.returncode == 3, res.stderr[-2000:]
    err = (tmp_path / "across.rank0.err").read_text()
    assert "is sharded across replicas: global ranks [0, 1]" in err, err


def test_mismatched_configuration_is_refused_naming_the_difference(tmp_path):
    sc = {
        "name": "mis",
        "steps": 2,
        "diloco": {"sync_every": 2, "codec": "int8"},
        "mismatch_rank": 1,
        "mismatch": {"codec": "e3m0"},
    }
    res = _launch(tmp_path, [sc], replicas=2)
    assert res.returncode == 3
    err = (tmp_path / "mis.rank0.err").read_text()
    assert "codec" in err and "int8" in err and "e3m0" in err and "replica 1" in err
    # one replica resuming (init "none") where the other starts anew (broadcast): refused before
    # the broadcast, which the resuming replica would never enter (the job hung until its timeout)
    sc = {**sc, "name": "start", "mismatch": {"init": "none"}}
    res = _launch(tmp_path, [sc], replicas=2, timeout=60)
    assert res.returncode == 3
    err = (tmp_path / "start.rank0.err").read_text()
    want = "in the model's parameters and init: {'init': {'replica 0': 'broadcast', 'replica 1': 'none'}}"
    assert want in err, err


def test_a_silent_peer_fails_the_round_naming_it(tmp_path):
    sc = {"name": "hang", "steps": 4, "diloco": {"sync_every": 2}, "hang_rank": 1, "hang_step": 2}
    res = _launch(tmp_path, [sc], replicas=2, env={"TEST_TIMEOUT": "4"}, timeout=120)
    assert res.returncode == 4
    err = (tmp_path / "hang.rank0.err").read_text()
    assert "CollectiveError" in err and "#0" in err and "replica(s) [1] never entered it" in err


def test_replicas_started_apart_are_made_alike_or_refused_by_name(tmp_path):
    """Rank 1 builds its model from another seed: broadcast makes it start from rank 0's weights
    (the run ends with both alike); check refuses it, naming it. A model wrapped in DDP across the
    replicas is warned about; one that is not, is not."""
    alike = {"name": "alike", "steps": 4, "diloco": {"sync_every": 2}, "seed_rank": 1}
    across = {"name": "across", "steps": 2, "diloco": {"sync_every": 2}, "ddp_world": True}
    res = _launch(tmp_path, [alike, across], replicas=2)
    assert res.returncode == 0, res.stderr[-2000:]
    got = [torch.load(tmp_path / f"alike.rank{r}.pt", weights_only=True) for r in range(2)]
    assert torch.equal(got[0]["global"], got[1]["global"])
    assert got[0]["warnings"] == []
    warned = torch.load(tmp_path / "across.rank0.pt", weights_only=True)["warnings"]
    assert len(warned) == 1 and "wrapped in DistributedDataParallel across replicas" in warned[0], warned
    refused = {"name": "apart", "steps": 4, "diloco": {"sync_every": 2, "init": "check"}, "seed_rank": 1}
    res = _launch(tmp_path, [refused], replicas=2)
    assert res.returncode == 3
    err = (tmp_path / "apart.rank0.err").read_text()
    assert "replica(s) [1] differ from replica 0 in the initial parameters" in err
    # another model on rank 1: refused naming a parameter before the broadcast (unequal sizes)
    other = {"name": "other", "steps": 2, "diloco": {"sync_every": 2}, "wide_rank": 1}
    res = _launch(tmp_path, [other], replicas=2, timeout=120)
    assert res.returncode == 3
    for r in range(2):
        err = (tmp_path / f"other.rank{r}.err").read_text()
        assert "replica(s) [1] differ from replica 0 in the model's parameters" in err, err
        want = "'param wte.weight': {'replica 0': ['torch.float32', 32, 16], 'replica 1': "
        want += "['torch.float32', 32, 32]}"
        assert want in err, err


def test_replicas_out_of_step_are_refused_naming_the_steps_and_a_finished_peer_is_named(tmp_path):
    """Rank 1 trains 3 steps and syncs what is left, rank 0 trains 6: their second rounds are of
    steps 3 and 4, refused on both with the steps named (they used to be averaged silently). Then
    rank 1 trains 4 steps and closes its group while rank 0 goes on: rank 0 is told at once (not
    at its 60 s timeout) that rank 1 finished, not that it died."""
    uneven = {"name": "uneven", "steps": 6, "diloco": {"sync_every": 2}, "short_rank": 1, "short_steps": 3}
    res = _launch(tmp_path, [{**uneven, "finish": True, "await_peers": True}], replicas=2)
    assert res.returncode == 4
    for r in range(2):  # every replica refuses the round, by the same rule
        err = (tmp_path / f"uneven.rank{r}.err").read_text()
        assert "out of step (replica(s) [1] at step 3, replica(s) [0] at step 4)" in err, err
    # rank 1 then waits in the final barrier (60 s): rank 0 is told at once, not at its timeout
    short = {"name": "short", "steps": 8, "diloco": {"sync_every": 2}, "short_rank": 1, "short_steps": 4}
    t0 = time.monotonic()
    res = _launch(tmp_path, [short], replicas=2, env={"TEST_TIMEOUT": "60"})
    assert res.returncode == 4 and time.monotonic() - t0 < 30
    err = (tmp_path / "short.rank0.err").read_text()
    assert "replica 1 finished after 2 collective(s): the replicas ran different numbers of steps" in err, err
    assert "never entered" not in err


def test_a_script_that_exits_with_a_round_in_flight_exits_cleanly(tmp_path):
    """No finish(), no close(), no destroy_process_group(): the interpreter's own exit with a round
    on the communication thread. Its teardown during a gloo collective used to abort the process
    (exit code -6, "terminate called without an active exception") in 6 of 8 runs; the groups are
    now closed at exit, their queued collectives finished first. That still aborted 6 of 60 runs:
    a gloo thread freed the finished all-to-all's work during the teardown (under gdb); the process
    groups lowcomm initialized are now destroyed at exit while the interpreter runs (0 of 120).
    Two runs: both must exit 0."""
    sc = {
        "name": "exit",
        "steps": 4,  # the round sent at step 4 is due at step 5: in flight at the end
        "natural_exit": True,
        "diloco": {"sync_every": 4, "overlap": 1},
    }
    for attempt in range(2):
        res = _launch(tmp_path, [sc], replicas=2)
        assert res.returncode == 0 and "terminate called" not in res.stderr, (attempt, res.stderr[-2000:])
        assert "exiting with collectives" not in res.stderr  # the round finished: nothing given up


def test_link_parsing_and_delay():
    assert parse_bandwidth("100Mbit") == 1e8 and parse_bandwidth("2MB") == 16e6
    assert parse_duration("20ms") == pytest.approx(0.02)
    link = LinkEmulator.parse("100Mbit", "20ms")
    assert link.delay(1_250_000) == pytest.approx(0.02 + 0.1)
    with pytest.raises(ValueError, match="bandwidth '100 apples'"):
        parse_bandwidth("100 apples")
    with pytest.raises(ValueError, match="duration"):
        parse_duration("fast")


@pytest.mark.parametrize("mode", ["diloco", "dp"])
def test_trainer_under_launch_matches_the_local_trainer(tmp_path, mode):
    """`lowcomm train` runs unchanged under `lowcomm launch` and gives the same global parameters
    (DP: the same model, its gradient buckets reduced during the backward in one case and after
    it in the other)."""
    corpus = write_corpus(tmp_path / "corpus")
    args = [
        "--mode",
        mode,
        "--corpus",
        corpus,
        *TINY_FLAGS,
        "--steps",
        "6",
        "--sync-every",
        "3",
        "--codec",
        "e3m0",
        "--fragments",
        "2",
        "--overlap",
        "1",
        "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    dist_run = subprocess.run(
        launch_train(2, *args, "--run-dir", str(tmp_path / "d"), start="forkserver"),
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert dist_run.returncode == 0, dist_run.stderr[-3000:]
    local = subprocess.run(
        [
            sys.executable,
            "-m",
            "lowcomm",
            "train",
            *args,
            "--replicas",
            "2",
            "--run-dir",
            str(tmp_path / "l"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert local.returncode == 0, local.stderr[-3000:]
    d = json.loads((tmp_path / "d" / "summary.json").read_text())
    lo = json.loads((tmp_path / "l" / "summary.json").read_text())
    assert d["global_params_sha256"] == lo["global_params_sha256"]
    assert (d["global_params_sha256"] is None) == (mode == "dp")
    assert d["final_eval_loss"] == lo["final_eval_loss"]
    assert d["bytes_sent_per_replica"] == lo["bytes_sent_per_replica"]


def test_trainer_replicas_configured_apart_exit_with_the_refusal_code(tmp_path):
    """Under `lowcomm launch`, replicas of `lowcomm train` given different codecs refuse the job
    with exit code 2 and one line naming both values (the process leaves with its group open
    instead of tearing it down beside a peer that is leaving too, which could abort it)."""
    corpus = write_corpus(tmp_path / "corpus")
    train = [sys.executable, "-m", "lowcomm", "train", "--corpus", corpus, *TINY_FLAGS]
    train += ["--mode", "diloco", "--steps", "4", "--sync-every", "2", "--quiet"]
    script = '[ "$RANK" = 1 ] && c=e3m0 || c=int8; exec "$@" --codec $c --run-dir "$RUN_DIR$RANK"'
    cmd = [sys.executable, "-m", "lowcomm", "launch", "--replicas", "2", "--", "sh", "-c", script, "sh"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RUN_DIR": str(tmp_path / "run")}
    res = subprocess.run(cmd + train, capture_output=True, text=True, timeout=180, env=env)
    assert res.returncode == 2, res.stderr[-3000:]
    refusals = [line for line in res.stderr.splitlines() if line.startswith("lowcomm: error:")]
    assert refusals and all("int8" in r and "e3m0" in r for r in refusals), res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]


def test_a_store_barrier_waits_for_every_process_and_names_those_that_came_on_a_time_out():
    import threading

    from lowcomm.runtime.trainer.topology import store_barrier

    store = torch.distributed.HashStore()
    done = []
    threads = [
        threading.Thread(target=lambda: (store_barrier(store, 3, "k", 30), done.append(1))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert done == [1, 1, 1]
    with pytest.raises(TimeoutError, match=r"^1 of 2 processes reached alone in 0.2 s$"):
        store_barrier(store, 2, "alone", 0.2)


def test_every_process_of_a_start_of_the_job_gets_one_new_round_from_a_store_of_earlier_starts():
    """torchrun's store outlives a restart with the keys of the starts before, and its restart
    counts differ between nodes; job_round numbers each start the same on every process, whatever
    the order they come in and whatever an earlier start left (a start cut short by a process
    that never came included)."""
    import random
    import threading

    from lowcomm.comm.distributed import job_round

    store = torch.distributed.HashStore()  # (one store for every start, as torchrun's agents keep)

    def start(ranks, timeout_s=30.0):
        got, errors = {}, {}

        def run(r):
            time.sleep(random.random() * 0.05)  # (any order: a rank may say hello before rank 0 counts)
            try:
                got[r] = job_round(store, r, 3, timeout_s)
            except TimeoutError as e:
                errors[r] = str(e)

        threads = [threading.Thread(target=run, args=(r,)) for r in ranks]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return got, errors

    assert start(range(3)) == ({0: 1, 1: 1, 2: 1}, {})
    assert start(range(3)) == ({0: 2, 1: 2, 2: 2}, {})
    got, errors = start([0, 1], timeout_s=0.5)  # rank 2 never came (killed as it started)
    assert errors == {0: "rank 2 of the job did not come within 0.5 s"} and got == {1: 3}
    assert start(range(3)) == ({0: 4, 1: 4, 2: 4}, {})
    got, errors = start([1, 2], timeout_s=0.3)  # rank 0 never came: no stale answer is taken
    assert got == {} and set(errors.values()) == {"rank 0 of the job did not answer within 0.3 s"}


def test_a_stop_agreement_stops_without_a_process_that_is_gone_but_waits_for_a_live_one(monkeypatch):
    """A process killed (the launcher, or torchrun, then stops the others with a SIGTERM) gives
    no step: the others waited the agreement's timeout (15 s), and under torchrun, whose SIGTERM
    comes 30 s before its SIGKILL, a restart cost 20 s. Each process's thread beats in the store;
    a process whose beat stands still is gone, and the others stop without it, knowing which
    (and a checkpoint barrier gives up on it too). A live process that has run ahead is waited
    for, and its step is the job's."""
    import threading

    from lowcomm.runtime.trainer.topology import StopAgreement, store_barrier

    monkeypatch.setattr(StopAgreement, "POLL_S", 0.05)
    monkeypatch.setattr(StopAgreement, "GONE_S", 0.5)
    monkeypatch.setattr(StopAgreement, "DEAD_S", 1.5)
    monkeypatch.setattr(StopAgreement, "LOOK_S", 0.02)
    store = torch.distributed.HashStore()
    stops = [threading.Event() for _ in range(3)]
    # (timeout_s: only a beat that stands still can end these waits before a minute)
    a = [StopAgreement(store, r, 3, stops[r], "job", timeout_s=60) for r in range(3)]
    try:
        assert a[1].step_ended(6) is None  # rank 1 ran ahead: it can stop at 7 at the earliest
        a[2]._ended.set()  # rank 2 is killed: its beat stands still
        # while no stop is asked, a still beat is a process stopped a while (DEAD_S before it is gone)
        t0 = time.monotonic()
        assert a[0].gone() == []
        with pytest.raises(TimeoutError, match=r"^rank 2 gone before ckpt/6: .* stood still for 1.5 s"):
            store_barrier(store, 3, "ckpt/6", 60, agreement=a[0])
        assert 1.4 < time.monotonic() - t0 < 30
        stops[0].set()  # (SIGTERM)
        t0 = time.monotonic()
        assert a[0].step_ended(5) == 5 and a[0].lost == [2] and not a[0].agreed
        assert a[0].apart == "rank 2 gone"
        assert time.monotonic() - t0 < 30
        assert stops[1].wait(5) and a[1].step_ended(7) == 7 and a[1].lost == [2]  # (told by rank 0's word)
        with pytest.raises(TimeoutError, match=r"^rank 2 gone before ckpt/7: its count in the job's store"):
            store_barrier(store, 3, "ckpt/7", 60, agreement=a[1])
    finally:
        for x in a:
            x._ended.set()
    store = torch.distributed.HashStore()
    stops = [threading.Event() for _ in range(2)]
    a = [StopAgreement(store, r, 2, stops[r], "job", timeout_s=60) for r in range(2)]
    try:
        assert a[1].step_ended(8) is None
        stops[0].set()
        assert a[0].step_ended(5) == 9 and a[0].agreed and a[0].lost == []  # (rank 1 gives 9 from its thread)
        assert a[1].step_ended(9) == 9 and a[1].agreed and a[1].apart is None
    finally:
        closing = [threading.Thread(target=x.close) for x in a]  # (each waits for the other's)
        for t in closing:
            t.start()
        for t in closing:
            t.join(30)

    # a run that finished: rank 0, which hosts the job's store under lowcomm launch and srun,
    # leaves only after every other process's last word to it (one run in three of 4 loaded
    # processes logged torch's C++ stack trace from a process whose store had gone, exit 0)
    store = torch.distributed.HashStore()
    a = [StopAgreement(store, r, 2, threading.Event(), "end", timeout_s=60) for r in range(2)]
    first = threading.Thread(target=a[0].close, args=(True,))
    first.start()
    time.sleep(0.3)
    assert first.is_alive()  # rank 0 waits for rank 1's close
    a[1].close(True)
    first.join(5)
    assert not first.is_alive() and store.add("end/left", 0) == 2

    class Gone:  # the job's store, hosted by rank 0 (lowcomm launch), after rank 0 was killed
        def __getattr__(self, name):
            def fail(*args):
                raise RuntimeError("Broken pipe")

            return fail

    stop = threading.Event()
    alone = StopAgreement(Gone(), 1, 2, stop, "job", timeout_s=60)
    stop.set()
    # (it raised out of step_ended, a traceback on the survivor, the launcher's SIGTERM unheard)
    assert alone.step_ended(4) == 4 and not alone.agreed and alone.lost == []
    assert alone.apart == "the job's store did not answer: Broken pipe"
    alone._thread.join(5)  # its thread asks no more of a store that is gone, and says why
    assert not alone._thread.is_alive() and alone.store_lost == "Broken pipe"
    alone.finishing(4)  # (nor from here)
    alone.close()


def test_a_two_node_torchrun_diloco_job_killed_between_rounds_restarts_from_a_step_all_hold(tmp_path):
    """Two torchrun nodes on this machine (an agent each, one process each), --max-restarts 1,
    DiLoCo with a round every 50 steps, a checkpoint every 10 steps; rank 1 is killed at step 75.

    - Rank 0 ran on toward the round at 100, writing its checkpoints of 80 and 90 over those of 60
      and 70, so the restarted job found no step both held ("rank 0 [90, 80], rank 1 [70, 60]").
      The processes now write a step's checkpoints once all of them reached it: the job resumes
      at 70.
    - The agent's SIGTERM to rank 0 is answered at once: rank 0 finds rank 1 gone and stops
      without it (it waited 20 s, then left saying its step "did not end").
    - The restarted job met in the agents' store, which keeps the start before's keys: gloo read a
      dead process's address and the restart failed or hung, 4 times in 6 (torch 2.13). Keyed by
      the restart count instead, the two nodes never met: torchrun counts the restart on the node
      whose process died, not on the other (a membership change). Each start is now numbered in
      the store (comm.distributed.job_round), and the records count the restart.
    """
    from helpers import torchrun

    from lowcomm.runtime import read_jsonl

    corpus = write_corpus(tmp_path / "corpus")
    args = [*TINY_FLAGS, "--corpus", corpus, "--steps", "120", "--sync-every", "50", "--eval-every", "0"]
    args += ["--checkpoint-every", "10", "--resume", "auto", "--quiet", "--run-dir", str(tmp_path / "r")]
    faults = {"faults": [{"kind": "kill", "target": "rank:1", "at_step": 75}]}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOWCOMM_FAULTS": json.dumps(faults)}
    nodes = torchrun(1, "--max-restarts", "1", "-m", "lowcomm", "train", *args, nodes=2, timeout=240, env=env)
    err = "".join(n.stderr for n in nodes)
    assert [n.returncode for n in nodes] == [0, 0], err[-3000:]
    events = read_jsonl(tmp_path / "r" / "events.jsonl")
    (stopped,) = [e for e in events if e["kind"] == "stopped"]
    assert stopped["lost"] == [1] and stopped["checkpoint"] is None, stopped
    line = f"lowcomm: terminated (SIGTERM): stopped at the end of step {stopped['step']} "
    line += "without the job's other processes (rank 1 gone); no checkpoint of this step"
    assert line in err and "did not end within" not in err, err[-3000:]
    marks = [(e["what"], e["step"]) for e in events if e["kind"] == "checkpoint"]
    written = [("written", s) for s in range(10, 80, 10)]
    assert marks[: marks.index(("resumed", 70))] in (written, [*written, ("skipped", 80)]), str(marks)
    assert [(e["attempt"], e["step"]) for e in events if e["kind"] == "restart"] == [(1, 70)]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["steps_run"] == 50
    assert "connectFullMesh" not in err


@pytest.mark.parametrize("lost", ["a process", "the store's node"])
def test_a_two_node_torchrun_job_that_loses_a_process_or_its_store_fails_at_once_in_one_line(tmp_path, lost):
    """Two torchrun nodes, no restarts left, DiLoCo with its one round at step 200.

    - A process killed at step 75: the other one found it gone at the checkpoint of 80, skipped
      it with a warning, and trained on without checkpoints, a warning at each, until the round
      at 200 failed. On a real job (a round every few hundred steps) that was minutes of work no
      checkpoint kept. It now fails at 80, in one line that says why.
    - Node 0 killed whole (its agent hosts the job's store, and its process): the process of node
      1 trained on too, a C++ stack trace from torch's store client for every call, and named
      every replica, itself among them, as never having entered the collective that failed.
      Its stop agreement's thread finds the store gone within a second; the process fails at
      the end of that step (or at its checkpoint), saying so."""
    from helpers import kill_tree, torchrun

    corpus = write_corpus(tmp_path / "corpus")
    args = [*TINY_FLAGS, "--corpus", corpus, "--steps", "4000", "--sync-every", "200", "--eval-every", "0"]
    args += ["--checkpoint-every", "10", "--resume", "auto", "--quiet", "--run-dir", str(tmp_path / "r")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    during = None
    if lost == "a process":
        env["LOWCOMM_FAULTS"] = json.dumps({"faults": [{"kind": "kill", "target": "rank:1", "at_step": 75}]})
    else:

        def during(agents):  # node 0 goes once node 1's process has written its checkpoint of 30
            deadline = time.monotonic() + 120
            while not (tmp_path / "r" / "checkpoint-rank1.prev.lcs").exists():
                assert time.monotonic() < deadline and agents[1].poll() is None, "node 1 never got to step 20"
                time.sleep(0.05)
            kill_tree(agents[0].pid)

    nodes = torchrun(
        1,
        "--max-restarts",
        "0",
        "-m",
        "lowcomm",
        "train",
        *args,
        nodes=2,
        timeout=120,
        env=env,
        during=during,
    )
    err = nodes[0].stderr if lost == "a process" else nodes[1].stderr
    lines = [line for line in err.splitlines() if line.startswith("lowcomm: rank")]
    assert nodes[1].returncode != 0 and len(lines) == 1, (nodes[1].returncode, lines, err[-3000:])
    if lost == "a process":
        assert nodes[0].returncode != 0
        want = "lowcomm: rank 0: step 80: its checkpoint's barrier failed: "
        want += "a process of the job never reached it "
        want += "(rank 1 gone before lowcomm/checkpoint/80: its count in the job's store stood still for 10 s"
        assert lines[0].startswith(want), lines[0]
        assert "not written" not in err, err[-3000:]
    else:
        # torch's store client logs a C++ stack trace at each call to a store that is gone: the
        # thread's, and one from the step at most (the agent's own are torch's, not counted)
        traces = [line for line in err.splitlines() if line.startswith("[rank1]:") and "TCPStore.cpp" in line]
        assert len(traces) <= 2, err[-3000:]
        if lines[0].startswith("lowcomm: rank 1: terminated (SIGTERM): "):  # (its agent, which lost the
            # rendezvous with node 0, stopped it first: a race the process wins as a rule)
            assert "without the job's other processes (the job's store did not answer: " in lines[0], lines[0]
            return
        assert lines[0].startswith("lowcomm: rank 1: step "), lines[0]
        assert "the job's store stopped answering (" in lines[0], lines[0]
        assert "its host is gone (torchrun's agent on the job's first node" in lines[0], lines[0]
    assert lines[0].endswith(
        "the job cannot go on without it: a restart (--max-restarts) resumes from the last step every "
        "process checkpointed"
    ), lines[0]


def test_a_static_job_resumes_with_fewer_then_more_replicas_from_replica_0_s_checkpoint(tmp_path):
    """A job of 2 processes (DiLoCo, a round every 25 steps, a checkpoint every 10) stops at 60;
    it continues as a job of 1, then of 3 (``torchrun --nnodes 1:3`` that lost a node, and got
    two back). With one process, under a launcher, the job had simulated ``--replicas`` (4 by
    default) from step 0, its checkpoint-rank0.lcs unread; with other sizes the checkpoints
    were of other replicas: refused. Each process now resumes from replica 0's checkpoint at
    its step, every replica at the global parameters, each reading its own data stream from that
    step; the replicas end on the same global parameters."""
    from lowcomm.runtime import read_jsonl

    corpus = write_corpus(tmp_path / "corpus")
    run = ["--run-dir", str(tmp_path / "r"), "--resume", "auto", "--checkpoint-every", "10"]
    args = [*TINY_FLAGS, "--corpus", corpus, "--sync-every", "25", "--eval-every", "0", "--quiet", *run]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = []
    for replicas, steps in ((2, 60), (1, 80), (3, 100)):
        cmd = launch_train(replicas, *args, "--steps", str(steps), start="forkserver")
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        outs.append(res.stderr)
    events = read_jsonl(tmp_path / "r" / "events.jsonl")
    resumed = [(e["step"], e.get("from_world_size")) for e in events if e.get("what") == "resumed"]
    assert resumed == [(60, 2), (80, 1)], resumed
    warned = "resuming at step 60 from replica 0's checkpoint(s), written by a job of 2 process(es); "
    warned += "this one has 1: every replica starts from the global parameters of that step"
    assert warned in outs[1] and "written by a job of 1 process(es); this one has 3" in outs[2], outs[1:]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["replicas"] == 3 and summary["steps_run"] == 20, summary
    # (rank 0's rounds, the records' replica: the schedule goes on, 75 with one replica, 100 with
    # three; each part of the run ended with a final round, which its checkpoint was written before)
    rounds = [(e["send_step"], e["final"]) for e in events if e["kind"] == "round"]
    assert rounds == [(25, False), (50, False), (60, True), (75, False), (80, True), (100, False)], rounds
    changed = [e["changed"] for e in events if e["kind"] == "config_changed"]
    assert [c["world_size"] for c in changed] == [[2, 1], [2, 3]], changed  # (against config.json's)


def test_a_torchrun_job_that_loses_a_node_whole_goes_on_with_the_node_it_has(tmp_path):
    """``torchrun --nnodes 1:2``, one process a node, --max-restarts 1; node 1 (its agent and its
    process) is killed once it checkpointed step 30. Node 0's process trained on without
    checkpoints until the next round's collective failed; torchrun then restarted it as a job of
    one process, which simulated ``--replicas`` (4) from step 0. It now fails at its next
    checkpoint, in one line, and the job of one process resumes from its checkpoint (replica 0's)
    and ends."""
    from helpers import kill_tree, torchrun

    from lowcomm.runtime import read_jsonl

    corpus = write_corpus(tmp_path / "corpus")
    # (a round at every checkpoint: it comes first, and its collective fails at once)
    args = [*TINY_FLAGS, "--corpus", corpus, "--steps", "800", "--sync-every", "10", "--eval-every", "0"]
    args += ["--checkpoint-every", "10", "--resume", "auto", "--quiet", "--run-dir", str(tmp_path / "r")]

    def during(agents):
        deadline = time.monotonic() + 120
        while not (tmp_path / "r" / "checkpoint-rank1.prev.lcs").exists():
            assert time.monotonic() < deadline and agents[1].poll() is None, "node 1 never got to step 20"
            time.sleep(0.05)
        kill_tree(agents[1].pid)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = torchrun(
        1, "--max-restarts", "1", "-m", "lowcomm", "train", *args,
        nodes=2, min_nodes=1, timeout=180, env=env, during=during,
    )  # fmt: skip
    err = nodes[0].stderr
    assert nodes[0].returncode == 0, err[-3000:]
    (failed,) = [line for line in err.splitlines() if line.startswith("lowcomm: rank")]
    barrier = "its checkpoint's barrier failed: a process of the job never reached it (rank 1 gone"
    # (or the round's collective failed first: rank 1 never entered it, or was killed inside it,
    # when gloo names no missing replica; one line either way)
    collective = "lowcomm: rank 0: outer collective #"
    collective_failed = failed.startswith(collective) and "of group 'outer0' failed on replica 0: " in failed
    assert barrier in failed or collective_failed, failed
    assert "never entered it" not in failed or "replica(s) [1] never entered it" in failed, failed
    events = read_jsonl(tmp_path / "r" / "events.jsonl")
    (resumed,) = [e for e in events if e.get("what") == "resumed"]
    assert resumed["from_world_size"] == 2 and resumed["path"].endswith("checkpoint-rank0.lcs"), resumed
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["replicas"] == 1 and summary["steps_run"] == 800 - resumed["step"], summary


def test_a_hung_process_fails_its_job_at_the_next_checkpoint_and_its_output_ends_with_the_job(tmp_path):
    """`hang` stops rank 1 whole (SIGSTOP) for 120 s at step 75, no restarts. Rank 0 finds its beat
    still (10 s) at the checkpoint of 80 and fails there in one line; the launcher kills rank 1. The
    helper process that was to continue rank 1 held the job's output open (who read it to its
    end waited the 120 s) and, rank 1 gone, printed a traceback (ProcessLookupError)."""
    corpus = write_corpus(tmp_path / "corpus")
    args = [*TINY_FLAGS, "--corpus", corpus, "--steps", "400", "--sync-every", "200", "--eval-every", "0"]
    args += ["--checkpoint-every", "10", "--resume", "auto", "--quiet", "--run-dir", str(tmp_path / "r")]
    faults = {"faults": [{"kind": "hang", "target": "rank:1", "at_step": 75, "duration": 120}]}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOWCOMM_FAULTS": json.dumps(faults)}
    t0 = time.monotonic()
    res = subprocess.run(
        launch_train(2, *args, start="forkserver"), capture_output=True, text=True, timeout=240, env=env
    )
    took = time.monotonic() - t0
    assert res.returncode == 1, res.stderr[-3000:]
    (line,) = [x for x in res.stderr.splitlines() if x.startswith("lowcomm: rank")]
    assert line.startswith("lowcomm: rank 0: step 80: its checkpoint's barrier failed: "), line
    assert "rank 1 gone before lowcomm/checkpoint/80" in line, line
    assert "Traceback" not in res.stderr and took < 90, (took, res.stderr[-3000:])


def test_a_collective_s_failure_is_told_from_the_model_s_own_error():
    """DDP's collectives fail with gloo's RuntimeError (or a torch.distributed error); the
    trainer names those as the replica's DDP failing, and lets the model's own errors through."""
    from lowcomm.comm.distributed import communication_failed

    gloo = "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer"
    assert communication_failed(RuntimeError(gloo))
    if hasattr(torch.distributed, "DistBackendError"):
        assert communication_failed(torch.distributed.DistBackendError("NCCL error: unhandled system error"))
    assert not communication_failed(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 9x8)"))
    assert not communication_failed(torch.cuda.OutOfMemoryError("CUDA out of memory"))


def test_a_failed_collective_whose_store_is_gone_names_no_replica():
    """A collective that failed with the job's store gone (the node that hosted it lost) named
    every replica, itself among them, as never having entered it, and asked the dead store once
    per replica (each call logs torch's C++ stack trace). It now says the store did not answer,
    after one call; with the store up, it names those that never entered the collective."""
    from lowcomm.comm.distributed import DistributedGroup

    class Store:
        def __init__(self, entered=(), gone=False):
            self.entered, self.gone, self.calls = set(entered), gone, 0

        def check(self, keys):
            self.calls += 1
            if self.gone:
                raise RuntimeError("Connection reset by peer")
            return all(k in self.entered for k in keys)

    group = object.__new__(DistributedGroup)  # (the parts _describe_failure reads: no process group)
    group.name, group._rank, group._size = "outer0", 1, 3
    group.store = Store(gone=True)
    msg = group._describe_failure(4, "Connection closed by peer")
    assert msg == (
        "outer collective #4 of group 'outer0' failed on replica 1: Connection closed by peer; the job's "
        "store did not answer either (Connection reset by peer): its host is gone"
    )
    assert group.store.calls == 1
    assert group.missing(4) == [0, 1, 2]  # (the elastic group's suspects, as before)
    group.store = Store(entered={"lowcomm/outer0/4/1", "lowcomm/outer0/4/2"})
    never = "; replica(s) [0] never entered it (dead, hung or partitioned)"
    assert group._describe_failure(4, "timeout").endswith(never)


def test_a_job_of_two_process_replicas_that_loses_a_process_restarts_without_a_traceback(tmp_path):
    """Two replicas of two processes each (DDP inside a replica), rank 3 killed at step 35 under
    --max-restarts 1. Its replica partner, rank 2, failed in DDP's all-reduce with gloo's
    RuntimeError and a traceback (so did rank 0, when rank 1 stopped before it); it now says what
    failed in one line. The job resumes at 30."""
    from lowcomm.runtime import read_jsonl

    corpus = write_corpus(tmp_path / "corpus")
    args = [*TINY_FLAGS, "--corpus", corpus, "--steps", "60", "--sync-every", "20", "--eval-every", "0"]
    args += ["--checkpoint-every", "10", "--resume", "auto", "--quiet", "--run-dir", str(tmp_path / "r")]
    cmd = launch_train(2, *args, start="forkserver")
    cmd[cmd.index("--start") : cmd.index("--start")] = ["--procs-per-replica", "2", "--max-restarts", "1"]
    faults = {"faults": [{"kind": "kill", "target": "rank:3", "at_step": 35}]}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOWCOMM_FAULTS": json.dumps(faults)}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    # (torch's TCPStore client logs a C++ backtrace, not a traceback, when rank 0, the store's
    # host, left first: a failing job's processes use the store to name who never came)
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "the all-reduce of the replica's gradients (DDP) failed" in res.stderr, res.stderr[-3000:]
    # (ranks 0 and 1 fail in their round at 40, or stop, finding ranks 2 and 3 gone: not told that
    # replica 1 "finished", since its processes closed their groups after a failure)
    assert "finished after" not in res.stderr, res.stderr[-3000:]
    events = read_jsonl(tmp_path / "r" / "events.jsonl")
    assert [e["step"] for e in events if e.get("what") == "resumed"] == [30]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["steps_run"] == 30


def test_a_launched_job_under_a_fault_plan_restarts_resumes_bit_for_bit_and_is_reported(tmp_path):
    """`lowcomm chaos --static`: two processes of `lowcomm launch` write their checkpoints every 10
    steps, fault-free and under a plan with `--max-restarts 2`: rank 1's write at step 30 fails (it
    keeps step 20's), then rank 1 is killed at step 37. The launcher stops rank 0 and starts the
    job again; both resume from the newest step both hold (20: rank 0 passes over its own 30),
    neither fault fires again. Then rank 0 is preempted (SIGTERM) at step 50: both processes stop
    at one step S, each writing its checkpoint there, and the job is started again from S, no step
    redone. The run ends on the fault-free run's bits. The report names the faults (rank, step),
    the restarts (resumed at 20 after reaching 37: 17 steps redone; resumed at S after reaching S)
    and data lost 0; an --out holding that run is refused, nothing in it replaced."""
    from lowcomm.runtime import read_jsonl, timeline
    from lowcomm.runtime.faults import FaultPlan
    from lowcomm.runtime.faults.static_chaos import run_static_chaos

    corpus = write_corpus(tmp_path / "corpus")
    args = [*TINY_FLAGS, "--corpus", corpus, "--steps", "80", "--sync-every", "4", "--fragments", "2"]
    args += ["--overlap", "1", "--codec", "e3m0", "--eval-every", "40", "--checkpoint-every", "10"]
    faults = [
        {"kind": "checkpoint-fail", "target": "rank:1", "at_step": 30},
        {"kind": "kill", "target": "rank:1", "at_step": 37},
        {"kind": "preempt", "target": "rank:0", "at_step": 50},
    ]
    plan = FaultPlan.from_dict({"faults": faults})
    out = tmp_path / "chaos"
    r = run_static_chaos(plan, 2, out, args, max_restarts=2, timeout=240, start="forkserver")
    log = (out / "chaos" / "launcher.log").read_text()
    assert r["chaos_exit_code"] == 0 and r["reference_exit_code"] == 0, log[-3000:]
    assert log.count("restarting it (restart 1 of 2)") == 1 and log.count("(restart 2 of 2)") == 1
    assert "the job ended with exit code 0 after 2 restart(s)" in log
    assert "checkpoint at step 30 failed (the previous one is intact)" in log
    # each process's lines in its own log of each attempt, and in the launcher's behind its rank
    logs = out / "chaos" / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["attempt0", "attempt1", "attempt2"]
    assert "checkpoint at step 30 failed" in (logs / "attempt0" / "rank1.log").read_text()
    assert (
        "[rank 1]: " in log
        and "the previous one is intact" not in (logs / "attempt0" / "rank0.log").read_text()
    )
    fired = [(f["id"], f["kind"], f["rank"], f["step"]) for f in r["faults"]]
    assert fired == [(0, "checkpoint-fail", 1, 30), (1, "kill", 1, 37), (2, "preempt", 0, 50)]
    events = read_jsonl(out / "chaos" / "events.jsonl")
    (stopped,) = [e["step"] for e in events if e["kind"] == "stopped"]  # (the end of step 50 or soon after)
    assert 50 <= stopped < 80
    assert r["restarts"] == [
        {"attempt": 1, "resumed_at": 20, "reached": 37, "steps_redone": 17},
        {"attempt": 2, "resumed_at": stopped, "reached": stopped, "steps_redone": 0},
    ]
    assert [e["step"] for e in events if e.get("what") == "resumed"] == [20, stopped]
    # the records keep the killed attempt's steps after 20, redone after the resume; the run's
    # history (timeline) has each step once
    raw = [e["step"] for e in events if e["kind"] == "step"]
    history = [e["step"] for e in timeline(out / "chaos") if e["kind"] == "step"]
    assert len(raw) > len(history) and history == sorted(set(history)) and history[-1] == 80
    chaos, ref = (json.loads((out / d / "summary.json").read_text()) for d in ("chaos", "reference"))
    assert chaos["steps_run"] == 80 - stopped and ref["steps_run"] == 80
    assert chaos["global_params_sha256"] == ref["global_params_sha256"] and r["bit_identical"]
    assert r["data_lost"] == 0 and r["final_loss_delta"] == 0.0
    md = (out / "report.md").read_text()
    assert "bit for bit: **data lost: 0**" in md and "| 1 | 20 | 37 | 17 |" in md
    assert f"| 2 | {stopped} | {stopped} | 0 |" in md
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(ValueError, match=r"holds an earlier run \(reference/\)"):
        run_static_chaos(plan, 2, out, args, max_restarts=2)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_a_cuda_rounds_wait_is_timed_on_the_training_stream(monkeypatch):
    """A CUDA buffer's wait: an event on the caller's stream as the wait begins, the stream made
    to wait for the communication stream's ``done`` event, then a second event after that on the
    same stream; the GPU's time between the two is the round's device wait. Checked on CPU with
    stand-ins for the stream and the events, in the order the calls reach them."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    from lowcomm.comm.distributed import _DistWork
    from lowcomm.comm.group import ReduceStats, device_wait_s

    calls = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.ms = None

        def record(self, stream):
            calls.append(("record", stream))
            self.ms = 5.0 * len(calls)

        def elapsed_time(self, end):
            return end.ms - self.ms

    class Stream:
        def wait_event(self, event):
            calls.append(("wait_event", event))

    stream = Stream()
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)

    class Result:  # a CUDA result's stand-in
        device = "cuda:0"

        def record_stream(self, s):
            calls.append(("record_stream", s))

    done, result = object(), Result()
    future = Future()
    future.set_result((result, torch.zeros(1), done))
    group = SimpleNamespace(timeout=None, store=None)
    work = _DistWork(future, group, 0, ReduceStats(), device="cuda:0")
    assert work.wait() is result
    assert [c[0] for c in calls] == ["record", "wait_event", "record_stream", "record"]
    assert calls[1][1] is done and all(c[1] is stream for c in calls if c[0] != "wait_event")
    assert device_wait_s(work.stats) == pytest.approx((20.0 - 5.0) / 1e3)
    cpu = Future()
    cpu.set_result((torch.zeros(1), torch.zeros(1), None))
    plain = _DistWork(cpu, group, 1, ReduceStats())
    plain.wait()
    assert plain.stats.device_events is None and device_wait_s(plain.stats) is None


@pytest.mark.parametrize(
    "nodes, first",
    [
        ("gnode[10,20,25,37]", "gnode10"),
        ("node[001-004,007],gpu5", "node001"),
        ("rack1-n[5-8],x9", "rack1-n5"),
        ("r[1-2]n[03-04]", "r1n03"),
        ("login1,login2", "login1"),
        ("localhost", "localhost"),
    ],
)
def test_the_first_host_of_a_slurm_hostlist(nodes, first):
    from lowcomm.comm.slurm import first_host

    assert first_host(nodes) == first


def test_a_task_of_an_srun_step_gets_a_launchers_variables_and_nothing_else_does():
    """What torchrun would have set, from SLURM's variables of the step (not of the allocation);
    a batch script's own process (no step), a step of one task, torchrun under srun (RANK set)
    and a user's MASTER_ADDR / MASTER_PORT are left as they are; SLURM's values that are not
    SLURM's form are refused by name."""
    from lowcomm.comm.slurm import srun_env, tasks_per_node

    task = {
        "SLURM_JOB_ID": "31337",
        "SLURM_STEP_ID": "2",
        "SLURM_NTASKS": "16",  # the allocation's; the step is 11 tasks
        "SLURM_STEP_NUM_TASKS": "11",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2),3",
        "SLURM_STEP_NODELIST": "gpu[003-004,9]",
        "SLURM_PROCID": "9",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "2",
    }
    assert tasks_per_node("4(x2),3") == [4, 4, 3]
    assert srun_env(task) == {
        "RANK": "9",
        "WORLD_SIZE": "11",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "3",
        "GROUP_RANK": "2",
        "NODE_RANK": "2",
        "MASTER_ADDR": "gpu003",
        "MASTER_PORT": str(10000 + (31337 + 2) % 20000),
    }
    mine = srun_env({**task, "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29400"})
    assert (mine["MASTER_ADDR"], mine["MASTER_PORT"]) == ("10.0.0.7", "29400")
    batch = {k: v for k, v in task.items() if not k.startswith("SLURM_STEP")}
    assert srun_env(batch) is None  # sbatch's own process: SLURM_PROCID 0 of SLURM_NTASKS, no step
    assert srun_env({**task, "SLURM_STEP_NUM_TASKS": "1"}) is None
    assert srun_env({**task, "RANK": "0", "WORLD_SIZE": "2"}) is None  # srun torchrun
    assert srun_env({**task, "WORLD_SIZE": "1"}) is None  # tasks that each run a job of their own
    assert srun_env({**task, "SLURM_PTY_PORT": "40123"}) is None  # the shell of srun --pty -n 4 bash
    with pytest.raises(ValueError, match=r"^SLURM_PROCID='': srun sets it to a whole number in each task$"):
        srun_env({**task, "SLURM_PROCID": ""})
    with pytest.raises(ValueError, match=r"SLURM_STEP_TASKS_PER_NODE='4x2' is not SLURM's form"):
        srun_env({**task, "SLURM_STEP_TASKS_PER_NODE": "4x2"})
    with pytest.raises(ValueError, match=r"SLURM_STEP_NODELIST='gpu\[003' is not a SLURM hostlist"):
        srun_env({**task, "SLURM_STEP_NODELIST": "gpu[003"})
    # task 0 hosts the rendezvous: on another node than the first (not a block distribution), it
    # says so, where the others would wait on the first node until their timeout
    first = {**task, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    assert srun_env({**first, "SLURMD_NODENAME": "gpu003"})["MASTER_ADDR"] == "gpu003"
    with pytest.raises(ValueError, match=r"^task 0 runs on gpu009, not on the step's first node gpu003 "):
        srun_env({**first, "SLURMD_NODENAME": "gpu009"})
    assert srun_env({**first, "SLURMD_NODENAME": "gpu009", "MASTER_ADDR": "gpu009"})["RANK"] == "0"


def test_srun_tasks_without_torchrun_train_as_the_replicas_of_one_job(tmp_path):
    """``srun -n 2 lowcomm train`` (no torchrun): each task took itself for a lone process and
    trained 4 simulated replicas, the second refused by the run directory's lock. The tasks are
    now the job's two replicas (their variables as srun sets them, on this machine); so are they
    for the plain API's ``init_from_torchrun()``."""
    corpus = write_corpus(tmp_path / "corpus", lines=400)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lowcomm", "train", "--steps", "8", "--sync-every", "4", "--corpus", corpus]
    done = srun_tasks([*cmd, *TINY_FLAGS, "--run-dir", str(run)], tmp_path)
    assert [d.returncode for d in done] == [0, 0], [d.stderr[-2000:] for d in done]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["replicas"] == 2 and summary["rounds"] == 2 and summary["bytes_sent_per_replica"] > 0
    assert "records in" in done[0].stdout and done[1].stdout == ""  # one job: rank 0 writes the records
    # the plain API's entry: lowcomm.init_from_torchrun() in a task of the step
    body = "import lowcomm; t = lowcomm.init_from_torchrun(); print(t.replica, t.num_replicas, t.outer.size)"
    done = srun_tasks([sys.executable, "-c", body], tmp_path)
    assert [d.stdout.split() for d in done] == [["0", "2", "2"], ["1", "2", "2"]], [d.stderr for d in done]
