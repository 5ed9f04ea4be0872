"""Fault plans, guards and checkpoints: unit checks, then real elastic jobs on 127.0.0.1."""

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from helpers import TINY_FLAGS, write_corpus

from lowcomm.comm.reduce import Sealer, screen_norms
from lowcomm.runtime.elastic import LocalJob, pace
from lowcomm.runtime.elastic.transfer import CorruptStateError, load_state, pack, save_state, unpack
from lowcomm.runtime.faults import KINDS, FaultInjector, FaultPlan, InjectedFault, failing_opener
from lowcomm.runtime.statefile import MAGIC

WORKERS = ["w0", "w1", "w2", "w3"]


def test_the_example_plan_loads_and_random_targets_are_drawn_from_the_seed(tmp_path):
    p = tmp_path / "plan.toml"
    p.write_text(
        'seed = 7\n[[faults]]\nkind = "kill"\ntarget = "worker:1"\nat_step = 60\n'
        '[[faults]]\nkind = "corrupt"\ntarget = "random"\nat_round = 3\n'
    )
    plan = FaultPlan.load(p)
    a = plan.check(WORKERS, steps=100)
    b = FaultPlan.load(p).check(WORKERS, steps=100)
    assert a.faults[0].target == "worker:w1" and a.faults[0].hook == "before_step"
    assert a.faults[1].target == b.faults[1].target and a.faults[1].target.startswith("worker:w")
    assert a.faults[1].hook == "during_collective"
    # a plan that does not parse is named, with where it stops (was json's bare message)
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    with pytest.raises(ValueError, match=r"fault plan '.*bad.json' is not valid JSON: Expecting value"):
        FaultPlan.load(bad)
    with pytest.raises(ValueError, match=r"fault plan \(inline JSON\) is not valid JSON"):
        FaultPlan.load('{"seed": 0, "faults": [')
    with pytest.raises(FileNotFoundError, match=r"fault plan '.*nope.toml' does not exist"):
        FaultPlan.load(tmp_path / "nope.toml")
    # a plan that parses but is wrong names its file too (a $LOWCOMM_FAULTS of several jobs')
    (tmp_path / "wrong.json").write_text('{"faults": [{"kind": "kill"}], "train": {}}')
    with pytest.raises(ValueError, match=r"^fault plan '.*wrong.json': unknown key\(s\) \['train'\]"):
        FaultPlan.load(tmp_path / "wrong.json")
    (tmp_path / "wrong.json").write_text('{"faults": [{"kind": "kill"}]}')
    with pytest.raises(ValueError, match=r"^fault plan '.*wrong.json': fault 0: target must be a string"):
        FaultPlan.load(tmp_path / "wrong.json")


@pytest.mark.parametrize(
    "fault, message",
    [
        ({"kind": "explode", "target": "worker:1", "at_step": 3}, "kind='explode' is not allowed"),
        ({"kind": "kill", "target": "worker:9", "at_step": 3}, "names no worker"),
        ({"kind": "kill", "target": "replica:4", "at_step": 3}, r"out of range: replica in \[0, 3\]"),
        ({"kind": "kill", "target": "worker:1", "at_step": 500}, "past the job's last step 100"),
        ({"kind": "kill", "target": "worker:1", "at_step": 0}, "at_step=0 must be an int >= 1"),
        ({"kind": "kill", "target": "worker:1", "probability": 1.5}, r"probability=1.5 must be in \(0, 1\]"),
        ({"kind": "kill", "target": "worker:1"}, "exactly one trigger"),
        ({"kind": "corrupt", "target": "worker:1", "at_step": 4}, "use at_round"),
        ({"kind": "kill", "target": "coordinator", "at_step": 4}, "coordinator-kill"),
        ({"kind": "slow-link", "target": "worker:1", "at_step": 4}, "needs bandwidth"),
        ({"kind": "kill", "target": "worker:1", "at_step": 4, "colour": "red"}, "unknown key"),
        # a fault that would never fire, a string taken for true, a bool taken for a second
        ({"kind": "kill", "target": "worker:1", "at_time": float("inf")}, "at_time=inf must be seconds >= 0"),
        (
            {"kind": "kill", "target": "worker:1", "at_step": 4, "restart": "no"},
            "restart='no' must be true or",
        ),
        ({"kind": "hang", "target": "worker:1", "at_step": 4, "duration": True}, "duration=True must be sec"),
        # SIGTERM ends a step: a preempt at a round (or inside one) would never fire
        ({"kind": "preempt", "target": "worker:1", "at_round": 2}, "comes at a step: use at_step"),
        (
            {"kind": "preempt", "target": "worker:1", "at_step": 2, "where": "during_collective"},
            r"where='during_collective'; allowed: \['before_step', 'after_step'\]",
        ),
    ],
)
def test_a_bad_plan_is_refused_before_the_job_starts(fault, message):
    with pytest.raises(ValueError, match=message):
        FaultPlan.from_dict({"seed": 1, "faults": [fault]}).check(WORKERS, steps=100)


@pytest.mark.parametrize(
    "fault, message",
    [
        ({"kind": "corrupt", "target": "rank:1", "at_round": 2}, r"kind='corrupt' needs an elastic job"),
        (
            {"kind": "partition", "target": "rank:1", "at_step": 2},
            r"a static job \(launch/torchrun\) injects",
        ),
        (
            {"kind": "kill", "target": "rank:1", "at_round": 2},
            "at_round needs an elastic job's numbered rounds",
        ),
        (
            {"kind": "kill", "target": "rank:1", "at_time": 0, "where": "during_transfer"},
            "where='during_transfer'",
        ),
        ({"kind": "kill", "target": "rank:4", "at_step": 2}, r"out of range: rank in \[0, 3\]"),
        ({"kind": "kill", "target": "replica:2", "at_step": 2}, r"out of range: replica in \[0, 1\]"),
        ({"kind": "hang", "target": "rank:0", "at_step": 101}, "past the job's last step 100"),
        (
            {"kind": "kill", "target": "rank:0", "at_step": 5, "restart": False},
            "restarted, all of it, by its",
        ),
    ],
)
def test_a_static_job_refuses_what_only_an_elastic_job_can_inject(fault, message):
    with pytest.raises(ValueError, match=message):
        FaultPlan.from_dict({"seed": 1, "faults": [fault]}).check_static(4, 2, steps=100)


def test_a_static_job_s_targets_are_its_ranks():
    faults = [
        {"kind": "kill", "target": t, "at_step": 3} for t in ("rank:3", "worker:2", "replica:1", "random")
    ]
    plan = FaultPlan.from_dict({"seed": 1, "faults": faults}).check_static(4, 2, steps=10)
    targets = [f.target for f in plan.faults]
    assert targets[:3] == ["worker:3", "worker:2", "worker:2"]  # replica 1 of 2 processes: rank 2
    assert targets[3] in {f"worker:{r}" for r in range(4)}


@pytest.mark.parametrize(
    "kw,flags,message",
    [
        ({}, ["--run-dir", "x"], r"sets \['--run-dir', '--resume', '--overwrite', '--coordinator'\] itself"),
        ({}, ["--resume=auto"], r"remove \['--resume=auto'\]"),
        ({"max_restarts": -1}, [], r"max_restarts=-1 is not allowed: an int >= 0"),
        ({"replicas": 0}, [], r"replicas=0 is not allowed: an int >= 1"),
        ({"replicas": 600, "procs_per_replica": 2}, [], r"replicas=600 is not allowed: at most 512 with"),
        ({"timeout": float("inf")}, [], r"timeout=inf is not allowed"),
        ({"timeout": True}, [], r"timeout=True is not allowed"),
        (
            {"plan": {"kind": "corrupt", "target": "rank:1", "at_round": 2}},
            [],
            r"kind='corrupt' needs an elastic",
        ),
        ({"plan": {"kind": "kill", "target": "rank:2", "at_step": 2}}, [], r"out of range: rank in \[0, 1\]"),
    ],
)
def test_static_chaos_refuses_bad_input_before_starting_anything(tmp_path, kw, flags, message):
    """`lowcomm chaos --static`: a flag it sets itself, a bad count or timeout, a fault a static job
    of two ranks cannot serve: one line each, before any process or folder."""
    from lowcomm.runtime.faults.static_chaos import run_static_chaos

    fault = kw.pop("plan", {"kind": "kill", "target": "rank:1", "at_step": 2})
    plan = FaultPlan.from_dict({"faults": [fault]})
    args = {"replicas": 2, "out": tmp_path / "out", "flags": [*flags, "--steps", "8"], **kw}
    with pytest.raises(ValueError, match=message):
        run_static_chaos(plan, **args)
    assert not (tmp_path / "out").exists()


FLAG_CASES = [
    ("kind=kill,target=worker:0,at_step=2", "kill", "before_step"),
    ("kind=kill,target=worker:0,at_round=3", "kill", "during_collective"),
    ("kind=preempt,target=worker:2,at_step=3", "preempt", "before_step"),
    ("kind=hang,target=worker:1,at_step=2,duration=1.5", "hang", "before_step"),
    ("kind=delay,target=worker:0,at_step=2,delay=0.1,duration=1", "delay", "before_step"),
    ("kind=slow-link,target=worker:2,at_time=1,latency=50ms,bandwidth=10Mbit", "slow-link", "before_step"),
    ("kind=drop-round,target=random,at_round=1", "drop-round", "during_collective"),
    ("kind=corrupt,target=replica:1,at_round=2,nbytes=4", "corrupt", "during_collective"),
    ("kind=nan,target=rank:3,at_round=0", "nan", "before_collective"),
    ("kind=partition,target=worker:1,at_step=5,direction=coordinator", "partition", "before_step"),
    ("kind=coordinator-kill,target=coordinator,at_time=3", "coordinator-kill", None),
    ("kind=checkpoint-fail,target=worker:0,at_step=4", "checkpoint-fail", "checkpoint_write"),
    ("kind=kill,target=worker:0,at_time=0,where=during_transfer,restart=false", "kill", "during_transfer"),
]


@pytest.mark.parametrize("flag, kind, hook", FLAG_CASES)
def test_every_kind_parses_from_flags_to_its_hook(flag, kind, hook):
    (f,) = FaultPlan.from_flags([flag], seed=5).check(WORKERS, steps=100).faults
    assert (f.kind, f.hook) == (kind, hook)
    assert f.target == "coordinator" if kind == "coordinator-kill" else f.target.startswith("worker:w")
    values = dict(part.split("=", 1) for part in flag.split(","))
    for key in ("duration", "delay", "nbytes", "at_step", "at_round", "at_time"):
        if key in values:  # numbers arrive as numbers, not strings
            assert getattr(f, key) == float(values[key])
    for key in ("latency", "bandwidth", "direction"):
        if key in values:
            assert getattr(f, key) == values[key]
    if "restart" in values:
        assert f.restart is False


def test_the_flag_cases_cover_every_kind_and_a_malformed_flag_is_refused():
    assert {kind for _, kind, _ in FLAG_CASES} == set(KINDS)  # a new kind needs a case above
    with pytest.raises(ValueError, match="write key=value pairs"):
        FaultPlan.from_flags(["kind=kill,target=worker:0,oops"])


def test_probability_triggers_replay_the_same_for_a_seed():
    plan = FaultPlan.from_dict(
        {"seed": 3, "faults": [{"kind": "delay", "target": "worker:w0", "probability": 0.05, "delay": 0}]}
    ).check(["w0"])

    def first_firing():
        inj = FaultInjector(plan, "w0")
        for step in range(1, 1000):
            inj.before_step(step)
            if inj.fired:
                return step

    assert first_firing() == first_firing() is not None


def test_screening_excludes_non_finite_and_outlying_contributions_by_one_rule():
    assert screen_norms([1.0, 1.1, 0.9, 1.0]) == {}
    out = screen_norms([1.0, float("nan"), 0.9, 50.0])
    assert set(out) == {1, 3} and "non-finite" in out[1] and "outlier" in out[3]
    assert screen_norms([1.0, 100.0]) == {}  # two replicas: no majority to call an outlier


def test_sealed_payloads_detect_a_flipped_byte_and_a_stranger_s_seal():
    key = bytes(range(32))
    p = torch.arange(40, dtype=torch.uint8)
    s = Sealer(key).seal(p)
    assert torch.equal(Sealer(key).unseal(s), p) and s.numel() == 40 + Sealer.TAG
    damaged = s.clone()
    damaged[5] ^= 0xFF
    assert Sealer(key).unseal(damaged) is None
    assert Sealer(bytes(32)).unseal(s) is None  # sealed by someone without the job key
    with pytest.raises(ValueError, match="job key"):
        Sealer(b"short")


def test_state_round_trips_and_any_corruption_is_refused(tmp_path):
    state = {
        "a": torch.randn(5, 3),
        3: [torch.arange(4), {"x": 1.5, "b": torch.ones(2, dtype=torch.bfloat16)}],
    }
    header, flat = pack(state)
    back = unpack(header, flat)
    assert torch.equal(back["a"], state["a"]) and torch.equal(back[3][1]["b"], state[3][1]["b"])
    bad = flat.clone()
    bad[7] ^= 1
    with pytest.raises(CorruptStateError, match="SHA-256"):
        unpack(header, bad)
    with pytest.raises(CorruptStateError, match="bytes"):
        unpack(header, flat[:-1])


def test_a_state_file_is_written_and_read_a_tensor_at_a_time_in_pack_s_format(tmp_path):
    """save_state writes each tensor from where it is and load_state reads each into its own
    memory: a 384 MB state took +771 MB to write and +1153 MB to read (benchmarks/state_memory.py).
    The file is pack's bytes behind a magic and a length, as before: an older lowcomm's loads."""
    state = {
        "w": torch.randn(5, 3),
        "flag": torch.tensor(True),
        "half": torch.ones(3, dtype=torch.bfloat16),
        "none": torch.empty(0, 4),
        "step": torch.tensor(7),
        "meta": [1, "x", None, 2.5],
    }
    path = tmp_path / "s.lcs"
    written = save_state(path, state)
    header, flat = pack(state)
    assert path.read_bytes() == MAGIC + struct.pack("<Q", len(header)) + header + flat.numpy().tobytes()
    assert written == path.stat().st_size
    back = load_state(path)
    assert back["meta"] == state["meta"] and set(back) == set(state)
    for k in ("w", "flag", "half", "none", "step"):
        assert back[k].dtype == state[k].dtype and torch.equal(back[k], state[k]), k
        assert back[k].untyped_storage().nbytes() == state[k].numel() * state[k].element_size(), k
    # a header whose tensors share bytes (pack never writes one) is refused before the checksum
    h = json.loads(header)
    h["tensors"][1]["offset"] = 0
    forged = json.dumps(h, separators=(",", ":")).encode()
    path.write_bytes(MAGIC + struct.pack("<Q", len(forged)) + forged + flat.numpy().tobytes())
    with pytest.raises(CorruptStateError, match=r"s\.lcs: tensor 1 overlaps the one before it"):
        load_state(path)
    del h["sha256"]  # (it raised a KeyError)
    forged = json.dumps(h, separators=(",", ":")).encode()
    path.write_bytes(MAGIC + struct.pack("<Q", len(forged)) + forged + flat.numpy().tobytes())
    with pytest.raises(CorruptStateError, match=r"s\.lcs: the header has no SHA-256 of the bytes or no tree"):
        load_state(path)


def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(tmp_path):
    path = tmp_path / "checkpoint.lcs"
    save_state(path, {"step": 40, "w": torch.full((100,), 4.0)})
    with pytest.raises(InjectedFault, match="injected checkpoint write failure after 100 bytes"):
        save_state(path, {"step": 80, "w": torch.full((100,), 8.0)}, opener=failing_opener(100))
    back = load_state(path)
    assert back["step"] == 40 and torch.equal(back["w"], torch.full((100,), 4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.lcs"]  # no temporary left behind
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptStateError, match="checkpoint.lcs"):
        load_state(path)


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")


def _flags(corpus, *extra):
    return [*TINY_FLAGS, "--corpus", corpus, "--sync-every", "10", "--eval-every", "0", *extra]


def test_corrupt_and_nan_contributions_are_excluded_and_named_on_every_worker(tmp_path, corpus):
    job = LocalJob(
        tmp_path / "job", _flags(corpus, "--steps", "100"), ["--min-workers", "4"], start="forkserver"
    )
    try:
        job.start_coordinator()
        faults = [
            {"kind": "corrupt", "target": "worker:w1", "at_round": 3, "nbytes": 4},
            {"kind": "nan", "target": "worker:w2", "at_round": 5},
        ]
        for w in WORKERS:
            job.start_worker(w, pace(WORKERS, delay=0.01, extra=faults))
        assert job.wait_workers(WORKERS, 150) == dict.fromkeys(WORKERS, 0), job.logs()
        digests = {job.summary(w)["global_params_sha256"] for w in WORKERS}
        assert len(digests) == 1
        for w in WORKERS:
            ex = {e["round"]: e["contributions"] for e in job.events(w, "excluded")}
            assert set(ex) == {3, 5}, ex
            assert list(ex[3]) == ["w1"] and "corrupt payload" in ex[3]["w1"]
            assert list(ex[5]) == ["w2"] and "non-finite" in ex[5]["w2"]
        assert math.isfinite(job.summary("w0")["final_eval_loss"])
    finally:
        job.close()


_LOSE_ALL = ("--steps", "120", "--checkpoint-every", "40")


@pytest.fixture(scope="module")
def lose_all_reference(tmp_path_factory):
    """The fault-free job's summary (worker w0's), run once for both cases below (the same
    corpus, written again; the same flags)."""
    tmp = tmp_path_factory.mktemp("lose_all_ref")
    names = WORKERS[:3]
    ref = LocalJob(
        tmp / "ref",
        _flags(write_corpus(tmp / "corpus"), *_LOSE_ALL),
        ["--min-workers", "3"],
        start="forkserver",
    )
    try:
        ref.start_coordinator()
        for w in names:
            ref.start_worker(w)
        assert ref.wait_workers(names, 120) == dict.fromkeys(names, 0), ref.logs()
    finally:
        ref.close()
    return ref.summary("w0")


@pytest.mark.parametrize("coordinator", ["restarted", "alive"])
def test_a_job_that_loses_every_worker_resumes_exactly_from_its_last_good_checkpoint(
    tmp_path, corpus, coordinator, lose_all_reference
):
    """Every worker's write at step 80 fails, then every worker is killed at step 100; they come
    back with --resume auto, to a new coordinator or to the one that lived on (it had committed
    later rounds than their checkpoints hold: the newest checkpoint wins and its round is rolled
    back to). Either way the job ends bit for bit where the fault-free one ends."""
    names = WORKERS[:3]
    flags = _flags(corpus, *_LOSE_ALL)
    want = lose_all_reference

    job = LocalJob(tmp_path / "job", flags, ["--min-workers", "3"], start="forkserver")
    try:
        job.start_coordinator()
        # every worker's write at step 80 fails part way, then every worker is killed at step 100
        faults = [
            *({"kind": "checkpoint-fail", "target": f"worker:{w}", "at_step": 80} for w in names),
            *({"kind": "kill", "target": f"worker:{w}", "at_step": 100, "restart": False} for w in names),
        ]
        for w in names:
            job.start_worker(w, {"seed": 0, "faults": faults})
        assert job.wait_workers(names, 120) == dict.fromkeys(names, -9)
        for w in names:  # the failed write left the previous checkpoint (step 40) intact and loadable
            ckpt = [(e["what"], e["step"]) for e in job.events(w, "checkpoint")]
            assert ckpt == [("written", 40), ("failed", 80)], ckpt
            assert load_state(job.tmp / "runs" / w / "checkpoint.lcs")["diloco"]["step"] == 40
            assert [p.name for p in (job.tmp / "runs" / w).glob("checkpoint*")] == ["checkpoint.lcs"]
        if coordinator == "restarted":  # a new coordinator, a new start
            job.coord.kill()
            job.coord.wait(10)
            job.start_coordinator()
        else:  # the coordinator lived: it must let the checkpoints win instead of waiting for a donor
            job.wait_until(lambda st: st["total"] == 0, 60, "the killed workers to expire")
        for w in names:
            job.start_worker(w, extra=["--resume", "auto"])
        assert job.wait_workers(names, 120) == dict.fromkeys(names, 0), job.logs()
        for w in names:  # each continued from its checkpoint: 80 steps run, not 120
            assert [e["step"] for e in job.events(w, "checkpoint") if e["what"] == "resumed"] == [40]
            assert job.summary(w)["steps_run"] == 80 and job.summary(w)["transfers_in"] == []
        got = {job.summary(w)["global_params_sha256"] for w in names}
        assert got == {want["global_params_sha256"]}
        for w in names:  # what each sent and trained before its checkpoint counts too
            s = job.summary(w)
            assert s["bytes_sent_per_replica"] == want["bytes_sent_per_replica"], w
            assert s["rounds"] == want["rounds"], w
            assert (s["tokens"], s["flops"]) == (want["tokens"], want["flops"]), w
        if coordinator == "alive":
            log = "".join(p.read_text() for p in job.tmp.glob("coordinator-*.log"))
            assert "no member holds the job's state" in log and "rolled back from" in log
    finally:
        job.close()


def test_lowcomm_chaos_writes_a_survival_report_with_no_data_lost(tmp_path, corpus):
    import json
    import subprocess
    import sys

    plan = tmp_path / "plan.toml"
    plan.write_text(
        'seed = 7\n[[faults]]\nkind = "kill"\ntarget = "worker:1"\nat_step = 60\n'
        '[[faults]]\nkind = "corrupt"\ntarget = "worker:2"\nat_round = 3\n'
        '[[faults]]\nkind = "coordinator-kill"\ntarget = "coordinator"\nat_time = 3\n'
        '[[faults]]\nkind = "preempt"\ntarget = "worker:0"\nat_step = 100\n'
        + "".join(  # pace the job so that the restarted w1 rejoins before the end
            f'[[faults]]\nkind = "delay"\ntarget = "worker:{w}"\nat_step = 1\ndelay = 0.04\nduration = 3600\n'
            for w in range(3)
        )
    )
    out = tmp_path / "chaos"
    cmd = [
        sys.executable,
        "-m",
        "lowcomm",
        "chaos",
        "--plan",
        str(plan),
        "--replicas",
        "3",
        "--out",
        str(out),
        "--start",  # (forked from a server that imported torch once; exec: the hardening tests)
        "forkserver",
        "--",
        *_flags(corpus, "--steps", "200", "--eval-every", "50", "--checkpoint-every", "50"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    # a bar per run while it runs: rounds, members, faults injected
    assert "fault-free: 100%" in r.stderr and "/20 [" in r.stderr and "faults=" in r.stderr, r.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["data_lost"] == 0 and report["faults_injected"] == 7 and report["loss_plot"] == "loss.png"
    assert math.isfinite(report["final_loss_delta"])
    by_kind = {f["kind"]: f for f in report["faults"]}
    assert by_kind["corrupt"]["contributions_excluded"][0]["round"] == 3
    assert by_kind["kill"]["recovered_after_s"] is not None  # w1 restarted and the job went on
    # w0 ended its step and left when SIGTERM came, was restarted and rejoined (back at once under a
    # new incarnation, it may never be reported lost: no detection is asserted, as for the kill)
    assert by_kind["preempt"]["recovered_after_s"] is not None
    w0 = [json.loads(line) for line in (out / "chaos" / "runs" / "w0" / "events.jsonl").open()]
    (stopped,) = [e for e in w0 if e["kind"] == "stopped"]  # (the end of step 100, or soon after)
    assert 100 <= stopped["step"] < 200
    # it wrote its checkpoint of that step (no round is in flight at a step's end without overlap)
    ckpt = str((out / "chaos" / "runs" / "w0" / "checkpoint.lcs").resolve())
    assert stopped["checkpoint"] is not None and Path(stopped["checkpoint"]).resolve() == Path(ckpt)
    assert ("written", stopped["step"]) in [(e["what"], e["step"]) for e in w0 if e["kind"] == "checkpoint"]
    said = (
        f"lowcomm: terminated (SIGTERM): left the job at the end of step {stopped['step']}; the others go on"
    )
    assert said in "".join(p.read_text() for p in (out / "chaos").glob("w0-*.log"))
    # it told the coordinator it left (the coordinator did not wait out its heartbeat deadline)
    coordinator = "".join(p.read_text() for p in (out / "chaos").glob("coordinator-*.log")).splitlines()
    assert not [line for line in coordinator if "missed their heartbeat deadline" in line and "w0" in line]
    coord = by_kind["coordinator-kill"]  # killed and restarted by the runner; the workers re-registered
    assert coord["worker"] == "coordinator" and coord["detected_after_s"] is not None
    assert coord["recovered_after_s"] is not None
    assert by_kind["delay"]["lasted_s"] == pytest.approx(3600, abs=1)
    assert by_kind["delay"]["recovered_after_s"] is None  # the pacing delays outlast the job
    assert sorted(report["workers_finished"]) == ["w0", "w1", "w2"]
    assert (out / "loss.png").stat().st_size > 0 and "data lost: 0" in (out / "report.md").read_text()
    # nothing outlives the runner: no worker of the run, no coordinator on its endpoints
    endpoints = {p.read_text().splitlines()[0].split()[-1] for p in out.glob("*/coordinator-*.log")}
    assert len(endpoints) == 2 and _processes_mentioning(str(out), *endpoints) == []


def test_chaos_without_matplotlib_says_so_before_the_runs_and_reports_without_the_plot(
    tmp_path, monkeypatch, caplog
):
    """`lowcomm chaos` with only the [elastic] extra: the missing plot is named before the two runs
    (which take minutes) instead of failing after them, and report.md says why it has no plot."""
    import sys

    from lowcomm.runtime.faults import FaultPlan, chaos
    from lowcomm.runtime.faults.report import markdown

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed

    class Started(Exception):
        pass

    def first_run(*a, **k):  # the reference run would start here
        raise Started

    monkeypatch.setattr(chaos, "_run", first_run)
    with caplog.at_level("WARNING", logger="lowcomm.runtime.faults.chaos"), pytest.raises(Started):
        chaos.run_chaos(FaultPlan(0, []), 2, tmp_path / "out", ["--steps", "20"])
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [
        "plotting a fault report needs matplotlib, which is not installed: pip install 'lowcomm[scaling]'; "
        "the report will be written without loss.png"
    ]
    r = {"replicas": 2, "faults_injected": 0, "faults_planned": 0, "data_lost": 0, "chaos_final_loss": 2.0}
    r.update(reference_final_loss=2.0, final_loss_delta=0.0, chaos_wall_s=1.0, reference_wall_s=1.0)
    r["faults"] = []
    r.update(loss_plot=None, loss_plot_missing=warned[0].split(";")[0])
    markdown(tmp_path / "report.md", r)
    text = (tmp_path / "report.md").read_text()
    assert "No loss plot: plotting a fault report needs matplotlib" in text and "loss.png" not in text


def test_the_loss_plot_marks_each_fault_in_its_kind_s_colour_with_the_kinds_counted(tmp_path, monkeypatch):
    """A soak's 200 faults were written as text along the top of loss.png, one red smear: each is
    now a line in its kind's colour, the kinds (with their counts) in the legend beside the
    curves, which are black (no fault kind's colour)."""
    import matplotlib.colors
    import matplotlib.figure

    from lowcomm.runtime.faults.report import plot

    drawn = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (drawn.append(fig), real(fig, *a, **k))
    )
    curves = {"fault-free": [(0, 3.0), (100, 2.0)], "under faults": [(0, 3.0), (100, 2.1)]}
    faults = [(10, "kill"), (20, "nan"), (30, "kill"), (40, "partition"), (50, "kill")]
    plot(tmp_path / "loss.png", curves, faults, "chaos run")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = drawn[0].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "fault-free", "under faults", "kill (3)", "nan (1)", "partition (1)",
    ]  # fmt: skip
    assert not ax.texts  # no label along the top
    marks = {}
    for line in ax.get_lines()[2:]:  # the faults' vertical lines, after the two curves
        marks.setdefault(matplotlib.colors.to_hex(line.get_color()), []).append(line.get_xdata()[0])
    assert sorted(marks.values()) == [[10, 30, 50], [20], [40]]  # one colour a kind
    assert {matplotlib.colors.to_hex(ln.get_color()) for ln in ax.get_lines()[:2]} == {"#000000"}


def _processes_mentioning(*needles: str) -> list[str]:
    found = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode() if d.name.isdigit() else ""
        except OSError:  # gone meanwhile
            continue
        found += [cmd] if any(n in cmd for n in needles) else []
    return found


def test_the_survival_report_attributes_each_detection_to_the_fault_that_caused_it():
    from lowcomm.runtime.faults.report import fault_entry

    def ev(wall, kind, **f):
        return {"wall": float(wall), "kind": kind, **f}

    pace = ev(0, "fault", id=0, fault="delay", worker="w1", ends_at=3600.0)
    kill = ev(10, "fault", id=1, fault="kill", worker="w1")
    cut = ev(20, "fault", id=2, fault="partition", worker="w2", ends_at=28.0)
    slow = ev(40, "fault", id=3, fault="slow-link", worker="w0", ends_at=42.0)
    events = {
        "w0": [
            ev(5, "round"),
            ev(11, "round_redone", round=3, members=["w0", "w1", "w2"], suspects=[]),
            ev(12, "membership", what="lost", worker="w1"),
            ev(13, "round"),
            ev(25, "round_redone", round=7, members=["w0", "w2"], suspects=["w2"]),
            ev(26, "round"),
            ev(41, "round"),
            ev(43, "round"),
        ],
        "w1": [ev(14, "membership", what="resync"), ev(15, "round")],
        "w2": [ev(25.5, "membership", what="resync"), ev(29, "round"), ev(30, "round")],
    }
    entry = {
        f["id"]: fault_entry(f, events, 0.0, u) for f, u in ((pace, 10.0), (kill, 99), (cut, 99), (slow, 99))
    }
    # w1's resync at 14 follows its kill at 10, not its pacing delay (whose watch the kill ended)
    assert entry[0]["detected_after_s"] is None and entry[0]["recovered_after_s"] is None
    assert entry[0]["rounds_redone"] == 0 and entry[1]["rounds_redone"] == 1
    assert (
        entry[1]["detected_after_s"] == 1.0 and entry[1]["recovered_after_s"] == 3.0
    )  # redo with w1; round at 13
    assert entry[2]["detected_after_s"] == 5.0 and entry[2]["rounds_redone"] == 1  # named missing by w0
    assert (
        entry[2]["recovered_after_s"] == 9.0 and entry[2]["lasted_s"] == 8.0
    )  # w2's own round after it ended
    assert entry[3]["detected_after_s"] is None and entry[3]["recovered_after_s"] == 3.0


def _transfer(sender_key: bytes, receiver_key: bytes, state: dict | None, packed=None):
    """A state transfer between two gloo ranks (threads of this process, on 127.0.0.1) of
    ``state``, or of ``packed``: a header, the tensors and their bytes' count."""
    import datetime
    import threading

    import torch.distributed as dist

    from lowcomm.runtime.elastic.transfer import recv_state, send_signed, send_state

    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    out = {}

    def rank(r):
        store = dist.PrefixStore("x/", dist.TCPStore("127.0.0.1", master.port, is_master=False))
        pg = dist.ProcessGroupGloo(store, r, 2, datetime.timedelta(seconds=30))
        try:
            if r == 0:
                if packed is None:
                    out["ack"] = send_state(pg, state, dst=1, key=sender_key)
                else:
                    out["ack"] = send_signed(pg, *packed, dst=1, key=sender_key)
            else:
                out["state"] = recv_state(pg, 0, receiver_key)
        except Exception as e:
            out[f"error{r}"] = e

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_a_state_transfer_from_a_stranger_is_refused_before_it_is_used():
    from lowcomm.runtime.elastic.transfer import ForgedStateError

    key = bytes(range(32))
    state = {"diloco": {"w": torch.full((64,), 3.0)}, "round": 7}
    ok = _transfer(key, key, state)
    assert ok["ack"] is True and torch.equal(ok["state"]["diloco"]["w"], state["diloco"]["w"])
    forged = _transfer(bytes(32), key, state)  # a process without the job key sends it
    assert isinstance(forged["error1"], ForgedStateError) and "state" not in forged
    assert forged["ack"] is False  # the sender learns it was refused


def test_a_donor_sends_the_tensors_where_they_are_in_messages_of_one_staging_buffer():
    """The donor packed the whole state into one buffer before it sent it (a copy of the state,
    in host memory even for a GPU's). Now the header is pack's, its SHA-256 hashed a piece at a
    time, and the bytes are pack's, in messages of exactly the size asked (the last shorter),
    each copied into one staging buffer as it goes."""
    from lowcomm.runtime.statefile import messages, signed

    state = {
        "w": torch.arange(70, dtype=torch.float32),
        "t": torch.arange(12, dtype=torch.float64).reshape(3, 4).t(),  # (not contiguous)
        "flag": torch.tensor(True),
        "none": torch.empty(0, 2),
        "b": torch.ones(3, dtype=torch.bfloat16),
        "n": [1, "x"],
    }
    header, flat = pack(state)
    head, tensors, nbytes = signed(state)
    assert head == header and nbytes == flat.numel() == 280 + 96 + 1 + 6
    sent, at = [], set()
    for m in messages(tensors, nbytes, 100):
        sent.append(m.clone())
        at.add(m.data_ptr())
    assert [m.numel() for m in sent] == [100, 100, 100, 83] and len(at) == 1  # (one buffer)
    assert torch.equal(torch.cat(sent), flat)
    assert [m.numel() for m in messages(tensors, nbytes, 1000)] == [383]


def test_a_state_transfer_goes_in_messages_read_into_the_tensors_and_any_damage_is_named(monkeypatch):
    """The bytes go in messages of at most CHUNK_BYTES (here 100: tensors cross messages), each
    read into the tensors the joiner builds: it held the whole state twice (the bytes, then a
    copy of each tensor). A key holder's damaged state is a CorruptStateError, a stranger's a
    ForgedStateError even where its header is not one: the joiner reads the rest and the
    signature first, and the sender hears of the refusal either way."""
    from lowcomm.runtime.elastic import transfer

    monkeypatch.setattr(transfer, "CHUNK_BYTES", 100)
    key = bytes(range(32))
    state = {
        "w": torch.arange(70, dtype=torch.float32),
        "b": torch.ones(3, dtype=torch.bfloat16),
        "n": [1, "x"],
    }
    ok = _transfer(key, key, state)
    assert ok["ack"] is True and ok["state"]["n"] == [1, "x"]
    assert torch.equal(ok["state"]["w"], state["w"]) and torch.equal(ok["state"]["b"], state["b"])
    assert ok["state"]["w"].untyped_storage().nbytes() == 280  # (its own memory)
    header, flat = pack(state)
    damaged = flat.clone()
    damaged[150] ^= 1  # (in the second message)
    bad = _transfer(key, key, None, packed=(header, [damaged], damaged.numel()))
    assert isinstance(bad["error1"], CorruptStateError) and "SHA-256" in str(bad["error1"])
    assert bad["ack"] is False and "state" not in bad
    forged = _transfer(bytes(32), key, None, packed=(b"{not json", [flat], flat.numel()))
    assert isinstance(forged["error1"], transfer.ForgedStateError) and forged["ack"] is False


def test_a_lone_non_finite_contribution_is_excluded_not_made_the_job_s_state():
    """A round with one member (the others dead or cut off) screens its contribution like any
    other: a NaN pseudo-gradient becomes a zero mean, named, never the job's parameters (the soak
    run found a worker alone in a round poisoned by a nan fault)."""
    from lowcomm.comm import ReduceStats
    from lowcomm.comm.distributed import alone

    stats = ReduceStats()
    bad = torch.tensor([1.0, float("nan"), 2.0])
    mean, sent = alone(bad, stats, guarded=True)
    assert torch.equal(mean, torch.zeros(3)) and torch.equal(sent, torch.zeros(3))
    assert "non-finite" in stats.excluded[0]
    ok = torch.tensor([1.0, 2.0])
    mean, sent = alone(ok, ReduceStats(), guarded=True)
    assert torch.equal(mean, ok) and mean is not ok


def test_chaos_refuses_bad_counts_timeouts_and_worker_flags_before_any_run(tmp_path, monkeypatch):
    """A bad worker flag made every worker exit 2 in both runs, reported as every worker's data
    lost; 0 replicas reported 'data lost 0' with nothing run. All are refused, nothing started."""
    from lowcomm.runtime.faults import FaultPlan, chaos

    def never(*a, **k):
        raise AssertionError("a run started")

    monkeypatch.setattr(chaos, "_run", never)
    cases = [
        (dict(replicas=0), "replicas=0 is not allowed: an int >= 1"),
        (dict(replicas=True), "replicas=True is not allowed: an int >= 1"),  # was one replica, 'w0'
        (dict(replicas=10**20), "replicas=10+ is not allowed: at most 1024 processes"),  # it hung
        (dict(timeout=True), "timeout=True is not allowed: a finite number of seconds > 0"),
        (dict(timeout=float("nan")), "timeout=nan is not allowed: a finite number of seconds > 0"),
        (dict(flags=["--alpha", "3"]), r"alpha=3.0 is not allowed: a number in \[0, 1\]"),
        (dict(flags=["--steps=30", "--fault", "x"]), None),  # argparse: its usage line and exit 2
    ]
    for kw, match in cases:
        args = {"replicas": 2, "flags": ["--steps", "30"], "timeout": 60.0, **kw}
        if match is None:
            with pytest.raises(SystemExit) as e:
                chaos.run_chaos(
                    FaultPlan(0, []), args["replicas"], tmp_path / "out", args["flags"], args["timeout"]
                )
            assert e.value.code == 2
            continue
        with pytest.raises(ValueError, match=match):
            chaos.run_chaos(
                FaultPlan(0, []), args["replicas"], tmp_path / "out", args["flags"], args["timeout"]
            )
    assert not (tmp_path / "out").exists()
    # an earlier run's folder: its workers were refused their run directories, and the report
    # written over the earlier one said every worker's data was lost
    (tmp_path / "earlier" / "chaos").mkdir(parents=True)
    (tmp_path / "earlier" / "chaos" / "w0").mkdir()
    (tmp_path / "earlier" / "report.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holds an earlier run \(chaos/\): choose another --out"):
        chaos.run_chaos(FaultPlan(0, []), 2, tmp_path / "earlier", ["--steps", "30"], 60.0)
    assert (tmp_path / "earlier" / "report.json").read_text() == "{}"
    # a plan is checked against the steps the flags give, in either spelling
    plan = FaultPlan.from_dict(
        {"seed": 0, "faults": [{"kind": "kill", "target": "worker:w1", "at_step": 40}]}
    )
    with pytest.raises(ValueError, match="at_step"):
        chaos.run_chaos(plan, 2, tmp_path / "out", ["--steps=30"])
    from lowcomm.runtime.faults.static_chaos import run_static_chaos

    for run in (chaos.run_chaos, run_static_chaos):  # how the processes start
        with pytest.raises(ValueError, match=r"start='spawn' is not allowed: one of \['exec', 'forkse"):
            run(FaultPlan(0, []), 2, tmp_path / "out", ["--steps", "30"], start="spawn")
    assert not (tmp_path / "out").exists()


def test_the_chaos_bar_counts_no_rounds_before_the_first(tmp_path):
    """Before the job's first round the coordinator's status says round -1: the bar drew
    "-1/2000" and tqdm warned that it clamped its fraction. It shows 0 until a round is done."""
    import io
    import warnings
    from types import SimpleNamespace

    from tqdm import tqdm

    from lowcomm.runtime.faults.chaos import JobRun, _show

    statuses = iter([{"round": -1, "members": []}, {"round": 3, "members": [{}, {}]}])
    job = SimpleNamespace(status=lambda: next(statuses), run_dir=lambda w: tmp_path / w)
    run = JobRun(job, ["w0"])
    out = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (tqdm's TqdmWarning on a negative count)
        bar = tqdm(total=2000, file=out)
        _show(bar, run)
        assert bar.n == 0 and "-1/2000" not in out.getvalue()
        _show(bar, run)
        assert bar.n == 3 and "members=2" in out.getvalue()
        bar.close()


def test_a_job_whose_every_worker_is_preempted_resumes_from_the_steps_they_stopped_at(
    tmp_path, corpus, lose_all_reference
):
    """Every worker is sent SIGTERM at step 100 (a preempt fault): each ends its step, writes its
    checkpoint of it (its periodic ones are at 40 and 80) and leaves with 143. They come back with
    --resume auto, each from the step it stopped at, and the job ends bit for bit where the
    fault-free one ends."""
    names = WORKERS[:3]
    job = LocalJob(tmp_path / "job", _flags(corpus, *_LOSE_ALL), ["--min-workers", "3"], start="forkserver")
    try:
        job.start_coordinator()
        faults = [
            {"kind": "preempt", "target": f"worker:{w}", "at_step": 100, "restart": False} for w in names
        ]
        for w in names:
            job.start_worker(w, {"seed": 0, "faults": faults})
        assert job.wait_workers(names, 120) == dict.fromkeys(names, 143), job.logs()
        stopped = {w: job.events(w, "stopped")[0] for w in names}
        for w, e in stopped.items():  # (the end of step 100, or soon after; no round in flight)
            assert e["checkpoint"] == str(job.run_dir(w) / "checkpoint.lcs") and 100 <= e["step"] < 120, e
        for w in names:
            job.start_worker(w, extra=["--resume", "auto"])
        assert job.wait_workers(names, 120) == dict.fromkeys(names, 0), job.logs()
        resumed = {
            w: [e["step"] for e in job.events(w, "checkpoint") if e["what"] == "resumed"] for w in names
        }
        assert resumed == {w: [e["step"]] for w, e in stopped.items()}, (stopped, resumed)
        assert all(job.summary(w)["steps_run"] == 120 - stopped[w]["step"] for w in names)
        got = {job.summary(w)["global_params_sha256"] for w in names}
        assert got == {lose_all_reference["global_params_sha256"]}
    finally:
        job.close()
