"""The trainer's speed paths, on CPU: bf16 autocast, batched replicas, torch.compile, bucketed DP,
loss reads without host syncs, and the records that report speed."""

import copy
import functools
import json
import math
import os
from pathlib import Path

import pytest
import torch
from helpers import load_benchmark, needs_triton, write_corpus

import lowcomm
from lowcomm.lm import GPT, GPTConfig
from lowcomm.runtime import TrainConfig, read_jsonl, timeline, train
from lowcomm.runtime.trainer import build
from lowcomm.runtime.trainer import sync as sync_module

TINY = dict(model_dim=16, layers=2, heads=2, seq_len=16, batch_size=2, eval_batches=2, threads=1, warmup=2)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _run(tmp_path, corpus_dir, name, **kw):
    cfg = TrainConfig.from_flat(corpus=corpus_dir, run_dir=str(tmp_path / name), **{**TINY, **kw})
    return train(cfg, progress=False)


@pytest.mark.parametrize(
    "kw,label",
    [
        (dict(mode="dp"), "dp M=2"),
        (dict(fragments=1), "diloco M=2"),
        (dict(fragments=2), "streaming P=2 M=2"),
    ],
)
def test_the_progress_bar_names_the_run_as_users_know_it(tmp_path, corpus_dir, capsys, kw, label):
    """Streaming DiLoCo (DiLoCo in fragments) is named so on the bar, with its fragment count, not
    as plain DiLoCo; the bar shows tokens/s."""
    cfg = TrainConfig.from_flat(
        corpus=corpus_dir,
        run_dir=str(tmp_path / "r"),
        **{**TINY, "replicas": 2, "steps": 2, "eval_every": 0, **kw},
    )
    train(cfg, progress=True)
    err = capsys.readouterr().err
    assert f"{label}:" in err and "tok_s=" in err, err[-500:]
    assert "streaming" not in err or label.startswith("streaming")


def test_batched_replicas_match_sequential_ones_to_rounding(tmp_path, corpus_dir):
    kw = dict(replicas=3, steps=12, sync_every=4, fragments=2, overlap=1, codec="int8", eval_every=6, lr=1e-2)
    seq = _run(tmp_path, corpus_dir, "seq", replica_batching="sequential", **kw)
    bat = _run(tmp_path, corpus_dir, "bat", replica_batching="batched", **kw)
    assert (seq["replica_batching"], bat["replica_batching"]) == ("sequential", "batched")
    assert bat["final_eval_loss"] == pytest.approx(seq["final_eval_loss"], rel=1e-3)
    assert bat["bytes_sent_per_replica"] == seq["bytes_sent_per_replica"]
    assert (
        bat["rounds"] == seq["rounds"] == 6
    )  # fragment 0 at 4, 8, 12; fragment 1 at 6, 10 and the final sync
    ev = {n: read_jsonl(tmp_path / n / "events.jsonl") for n in ("seq", "bat")}
    kinds = {n: [(e["kind"], e.get("step"), e.get("replica")) for e in ev[n]] for n in ev}
    assert kinds["seq"] == kinds["bat"]  # the same records, in the same order
    losses = {n: [e["loss"] for e in ev[n] if e["kind"] == "step"] for n in ev}
    assert losses["bat"] == pytest.approx(losses["seq"], rel=1e-3)


def test_batched_dp_matches_sequential_dp(tmp_path, corpus_dir, monkeypatch):
    """Batched DP replicas in one process share one set of parameters (one slice a stack) and take
    the gradient of their mean loss: the step losses (the replicas' mean) and the final loss of the
    sequential path (its gradients averaged through the in-process collective) to rounding, and
    the bytes that collective counts, at DDP's bucket size and at buckets of a few parameters."""
    shapes = []
    real = build.BatchedReplicas.fill_missing_gradients
    monkeypatch.setattr(
        build.BatchedReplicas,
        "fill_missing_gradients",
        lambda self: shapes.append({p.shape[0] for p in self.params.values()}) or real(self),
    )
    kw = dict(mode="dp", replicas=3, steps=6)
    seq = _run(tmp_path, corpus_dir, "seq", replica_batching="sequential", **kw)
    assert shapes == []
    bat = _run(tmp_path, corpus_dir, "bat", replica_batching="batched", **kw)
    assert shapes == [{1}] * 6  # one slice, every step
    assert bat["final_eval_loss"] == pytest.approx(seq["final_eval_loss"], rel=1e-4)
    assert bat["bytes_sent_per_replica"] == seq["bytes_sent_per_replica"]
    losses = {
        n: [e["loss"] for e in read_jsonl(tmp_path / n / "events.jsonl") if e["kind"] == "step"]
        for n in ("seq", "bat")
    }
    assert len(losses["bat"]) == 6 and losses["bat"] == pytest.approx(losses["seq"], rel=1e-4)
    original = sync_module.DataParallel.__init__
    monkeypatch.setattr(
        sync_module.DataParallel, "__init__", functools.partialmethod(original, bucket_bytes=4096)
    )
    small = {
        b: _run(tmp_path, corpus_dir, f"{b}4k", replica_batching=b, **kw) for b in ("sequential", "batched")
    }
    assert small["batched"]["bytes_sent_per_replica"] == small["sequential"]["bytes_sent_per_replica"]


def test_shared_dp_replicas_load_a_checkpoint_of_one_slice_each_and_refuse_one_that_differs(corpus_dir):
    """A DP checkpoint written when every batched replica had a slice of its own (equal slices)
    loads into the shared set, bit for bit; one whose replicas differ is refused by name."""
    from lowcomm.lm import load_corpus

    cfg = TrainConfig.from_flat(corpus=corpus_dir, mode="dp", replicas=3, replica_batching="batched", **TINY)
    corpus = load_corpus(cfg.data.corpus)

    def make():
        return build.BatchedReplicas(
            build.build_model(cfg, corpus.vocab_size), cfg, corpus, [0, 1, 2], torch.device("cpu")
        )

    def step(r):
        r.forward_backward()
        r.fill_missing_gradients()
        r.update()

    reps = make()
    for _ in range(2):
        step(reps)
    state = copy.deepcopy(reps.state_dict())
    assert len(state["models"]) == 3 and all(t.shape[0] == 1 for t in reps.params.values())
    old = copy.deepcopy(state)  # as written with a slice a replica: every state tensor 3 alike
    for st in old["inner"][0]["state"].values():
        for k in ("exp_avg", "exp_avg_sq"):
            st[k] = st[k].expand(3, *st[k].shape[1:]).clone()
    step(reps)  # where both checkpoints must lead, bit for bit
    for written in (state, old):
        other = make()
        other.load_state_dict(copy.deepcopy(written))
        assert all(
            t.shape[0] == 1 for st in other.opts[0].state.values() for t in st.values() if torch.is_tensor(t)
        )
        step(other)
        for n in reps.names:
            assert torch.equal(other.params[n], reps.params[n])
    apart = copy.deepcopy(old)
    next(iter(apart["inner"][0]["state"].values()))["exp_avg"][2] += 1
    with pytest.raises(
        ValueError, match=r"its DP replicas differ: exp_avg of parameter 0 is not alike in all 3"
    ):
        make().load_state_dict(apart)
    apart = copy.deepcopy(state)
    apart["models"][1] = {k: v + 1 for k, v in apart["models"][1].items()}
    with pytest.raises(
        ValueError, match=r"its DP replicas differ: replica 1's parameters are not replica 0's"
    ):
        make().load_state_dict(apart)


def test_the_memory_check_counts_the_shared_dp_replicas_parameters_once(monkeypatch):
    """Batched DP replicas hold one set of parameters, gradients and moments (16 bytes a
    parameter); sequential ones a set each; DiLoCo's add the global copy and momentum (24)."""
    import re

    monkeypatch.setattr(build, "_free_memory", lambda device: 1)  # every run is refused: read its need
    size = dict(model_dim=512, layers=8, heads=8, seq_len=256, batch_size=16, replicas=4)
    gpt = GPT(GPTConfig(vocab_size=256, seq_len=256, n_layer=8, n_head=8, n_embd=512))
    params = gpt.num_params()

    def need(**kw) -> float:
        cfg = TrainConfig.from_flat(**{**size, **kw})
        with pytest.raises(ValueError, match="with 4 replica") as e:
            build.check_memory(cfg, 256, 4, torch.device("cpu"))
        return float(re.search(r"need at least ([0-9.]+) GiB", str(e.value)).group(1)) * 2**30

    shared = need(mode="dp", replica_batching="batched")
    apart = need(mode="dp", replica_batching="sequential")
    diloco = need(mode="diloco", replica_batching="batched")
    assert apart - shared == pytest.approx(3 * 16 * params, abs=0.1 * 2**30)
    assert diloco - shared == pytest.approx((4 * 24 - 16) * params, abs=0.1 * 2**30)
    assert need(mode="diloco", replica_batching="sequential") == diloco


def test_dp_gradient_buckets_change_no_bit(tmp_path, corpus_dir, monkeypatch):
    one = _run(tmp_path, corpus_dir, "one", mode="dp", replicas=2, steps=5)
    original = sync_module.DataParallel.__init__
    monkeypatch.setattr(  # 4 KiB buckets: every few parameters a bucket of their own
        sync_module.DataParallel, "__init__", functools.partialmethod(original, bucket_bytes=4096)
    )
    many = _run(tmp_path, corpus_dir, "many", mode="dp", replicas=2, steps=5)
    assert many["final_eval_loss"] == one["final_eval_loss"]
    assert (
        abs(many["bytes_sent_per_replica"] - one["bytes_sent_per_replica"])
        < 1e-3 * one["bytes_sent_per_replica"]
    )


def test_bf16_autocast_trains_on_cpu_and_stays_near_fp32(tmp_path, corpus_dir):
    kw = dict(replicas=2, steps=30, sync_every=10, lr=1e-2, eval_every=0)
    fp32 = _run(tmp_path, corpus_dir, "fp32", dtype="fp32", **kw)
    bf16 = _run(tmp_path, corpus_dir, "bf16", dtype="bf16", **kw)
    assert (fp32["dtype"], bf16["dtype"]) == ("float32", "bfloat16")
    assert bf16["final_eval_loss"] < 0.9 * 5.545  # learned (ln 256 at init)
    assert abs(bf16["final_eval_loss"] - fp32["final_eval_loss"]) < 0.05 * fp32["final_eval_loss"]
    assert _run(tmp_path, corpus_dir, "auto", dtype="auto", replicas=1, steps=2)["dtype"] == "float32"


def test_compiled_trainer_runs_the_same_records(tmp_path, corpus_dir, monkeypatch):
    # the inductor backend spends ~30 s compiling on a CPU; aot_eager captures the same graphs
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    kw = dict(replicas=2, steps=6, sync_every=3)
    eager = _run(tmp_path, corpus_dir, "eager", **kw)
    compiled = _run(tmp_path, corpus_dir, "compiled", compile=True, **kw)
    batched = _run(tmp_path, corpus_dir, "batched", compile=True, replica_batching="batched", **kw)
    assert compiled["compile"] is True
    assert compiled["final_eval_loss"] == pytest.approx(eager["final_eval_loss"], rel=1e-4)
    assert batched["final_eval_loss"] == pytest.approx(eager["final_eval_loss"], rel=1e-3)


@pytest.mark.parametrize("mode", ["diloco", "dp"])
def test_a_compiled_bf16_run_compiles_each_of_its_functions_once(tmp_path, corpus_dir, mode):
    """--compile compiles the batched loss once, DP and DiLoCo: Dynamo logs no recompilation. A
    gradient step compiled with torch.no_grad traced into it (once the clip, then DP's mean over
    the replicas) made the loss's next call under autocast fail its global-state guard and be
    traced again (torch 2.11 and 2.13). DiLoCo's round at step 2 writes the replicas' parameters
    in place between two compiled steps: the step after it runs the same graph."""
    import logging

    logged = []

    class Keep(logging.Handler):
        def emit(self, record):
            logged.append(record.getMessage())

    handler = Keep()
    torch._dynamo.reset()
    torch._logging.set_logs(recompiles=True)
    logging.getLogger("torch._dynamo").addHandler(handler)
    try:
        kw = dict(replicas=2, steps=3, mode=mode, dtype="bf16", compile=True, replica_batching="batched")
        s = _run(tmp_path, corpus_dir, mode, **kw, **({"sync_every": 2} if mode == "diloco" else {}))
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
        torch._logging.set_logs()
    assert s["compile"] is True
    assert s["rounds"] == (2 if mode == "diloco" else 0)  # DiLoCo: at step 2 and the final sync
    assert not [m for m in logged if "Recompiling" in m], logged


@pytest.mark.parametrize(
    "kw",
    [
        dict(mode="dp"),
        dict(mode="diloco", sync_every=4),
        dict(mode="diloco", sync_every=4, fragments=2, overlap=1, codec="e3m0", alpha=0.5),
    ],
    ids=["dp", "diloco", "streaming"],
)
def test_the_steps_read_no_device_value_back_to_the_host(tmp_path, corpus_dir, monkeypatch, kw):
    """On a GPU every read of a device value (``.item()``, ``float()``, ``bool()`` of a tensor,
    ``nonzero``) stops the host until the GPU catches up. Counted on CPU (every tensor a device
    one here): the steps' work (forward and backward, the syncs' hooks, the inner update, whose
    step counts are host numbers, rounds sent and applied) reads none, but for the codec's
    finiteness check of a CPU buffer (a GPU buffer skips it by design); the losses are read at
    the log steps, outside."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    from lowcomm.runtime.trainer import build

    reads = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.equal.default"}
    package = str(Path(lowcomm.__file__).parent) + os.sep
    found = []
    counting = [0]

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if counting[0] and str(func) in reads:
                ours = [f for f in traceback.extract_stack() if f.filename.startswith(package)]
                if not (ours[-1].name == "encode" and ours[-1].filename.endswith("codecs.py")):
                    found.append((str(func), traceback.format_stack(limit=6)))
            return func(*args, **(kwargs or {}))

    def counted(cls, name):
        real = getattr(cls, name)

        def wrapper(*args, **kwargs):
            counting[0] += 1
            try:
                return real(*args, **kwargs)
            finally:
                counting[0] -= 1

        monkeypatch.setattr(cls, name, wrapper)

    for cls, names in (
        (build.BatchedReplicas, ("forward_backward", "update")),
        (sync_module.DataParallel, ("before_update", "after_update", "after_step")),
        (sync_module.DiLoCoSync, ("before_update", "after_update", "after_step")),
    ):
        for name in names:
            counted(cls, name)

    with Reads():
        s = _run(tmp_path, corpus_dir, "r", replicas=3, steps=9, replica_batching="batched", **kw)
    assert s["steps_run"] == 9 and (s["rounds"] > 0) == (kw["mode"] != "dp")
    assert not found, found[0]


def test_losses_are_read_every_log_every_steps_and_every_step_is_recorded(tmp_path, corpus_dir, monkeypatch):
    from lowcomm.runtime.trainer.loop import Trainer

    batches = []  # how many steps' losses each read brought back
    real = Trainer._flush

    def spy(self, step):
        if self._pending:
            batches.append([s for s, *_ in self._pending])
        return real(self, step)

    monkeypatch.setattr(Trainer, "_flush", spy)
    s = _run(tmp_path, corpus_dir, "r", replicas=2, steps=20, sync_every=50, log_every=8, eval_every=0)
    assert batches == [list(range(1, 9)), list(range(9, 17)), list(range(17, 21))]
    steps = [e for e in read_jsonl(tmp_path / "r" / "events.jsonl") if e["kind"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 21)) and s["steps_run"] == 20


def test_the_summary_reports_speed_and_memory(tmp_path, corpus_dir):
    s = _run(tmp_path, corpus_dir, "s", replicas=2, steps=4, sync_every=2)
    assert s["tokens_per_second"] == pytest.approx(s["tokens"] / s["timing"]["loop_s"])
    assert s["mfu"] is None and s["device"] == "cpu"  # no known peak for a CPU
    assert s["peak_memory_bytes"] > 10 << 20
    assert 0 < s["comm_free_fraction"] <= 1 and "compute_utilization" not in s
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["tokens_per_second"] > 0


def test_the_wait_fraction_leaves_the_ends_sync_apart(tmp_path, corpus_dir, monkeypatch):
    """A round sent at the last step is applied by the end's sync, after every step: no step was
    left to hide it behind, so its wait is the end's (timing's finish_s), not the steps'. Every
    round's wait here is made to read one second more, so each bucket counts its rounds."""
    from lowcomm.comm.group import Work

    real = Work.wait

    def slow(self):
        first = not getattr(self, "_counted", False)
        self._counted = True
        out = real(self)
        self.stats.wait_s += 1.0 if first else 0.0
        return out

    monkeypatch.setattr(Work, "wait", slow)
    # rounds sent after steps 4 (applied after step 5) and 8 (the last: applied at the end)
    s = _run(tmp_path, corpus_dir, "w", replicas=2, steps=8, sync_every=4, overlap=1)
    rounds = [e for e in read_jsonl(tmp_path / "w" / "events.jsonl") if e["kind"] == "round"]
    assert [(e["send_step"], e["apply_step"]) for e in rounds if e["replica"] == 0] == [(4, 5), (8, 8)]
    t = s["timing"]
    assert t["steps_wait_s"] == pytest.approx(1.0, abs=0.05) and t["wait_s"] == pytest.approx(2.0, abs=0.05)
    assert 0 < t["finish_s"] < t["loop_s"]
    assert s["wait_fraction"] == pytest.approx(t["steps_wait_s"] / (t["loop_s"] - t["finish_s"]))
    assert s["device_wait_fraction"] is None and t["device_wait_s"] == 0  # no GPU wait timed here
    dp = _run(tmp_path, corpus_dir, "dp", mode="dp", replicas=2, steps=2)
    assert dp["wait_fraction"] is None and dp["timing"]["finish_s"] >= 0


def test_the_gpus_wait_for_rounds_is_summed_like_the_hosts(tmp_path, corpus_dir, monkeypatch):
    """Where a round's GPU wait is timed (CUDA events; stood in for here: each round's reads 0.25
    s), the summary adds it up as the host's: the steps' part apart from the end's sync, and
    ``device_wait_fraction`` over the steps' time; every round's record carries its own."""
    import lowcomm.optim.diloco as diloco

    monkeypatch.setattr(diloco, "device_wait_s", lambda stats: 0.25)
    s = _run(tmp_path, corpus_dir, "w", replicas=2, steps=8, sync_every=4, overlap=1)
    t = s["timing"]
    assert t["steps_device_wait_s"] == pytest.approx(0.25) and t["device_wait_s"] == pytest.approx(0.5)
    assert s["device_wait_fraction"] == pytest.approx(0.25 / (t["loop_s"] - t["finish_s"]))
    rounds = [e for e in read_jsonl(tmp_path / "w" / "events.jsonl") if e["kind"] == "round"]
    assert rounds and all(e["device_wait_s"] == 0.25 for e in rounds)


def test_the_gpus_wait_is_the_time_between_its_two_events():
    """``device_wait_s``: the GPU's time between the events recorded as the wait began and after
    the stream was made to wait (milliseconds, as CUDA reports them, in seconds); None without
    them. A buffer reduced in buckets waits from its first bucket's start to its last's end."""
    from lowcomm.comm.group import ReduceStats, Work, _BucketedWork, device_wait_s

    class Event:  # a CUDA timing event's stand-in: its time on the GPU's clock, in ms
        def __init__(self, ms):
            self.ms = ms

        def elapsed_time(self, end):
            return end.ms - self.ms

    assert device_wait_s(ReduceStats()) is None
    assert device_wait_s(ReduceStats(device_events=(Event(10.0), Event(12.5)))) == pytest.approx(0.0025)
    works = []
    for start, end in ((1.0, 2.0), (3.0, 7.0)):
        w = Work(ReduceStats(device_events=(Event(start), Event(end))))
        w._complete(torch.ones(2), torch.ones(2))
        works.append(w)
    bucketed = _BucketedWork(works)
    bucketed.wait()
    assert device_wait_s(bucketed.stats) == pytest.approx(0.006)


def test_profile_writes_a_trace_and_a_table_of_the_steps_asked_for(tmp_path, corpus_dir):
    """--profile 2:4: steps 3 and 4 under torch.profiler, a Chrome trace of their operators and a
    table by self time next to the records (owner-only, as the records), an event naming them;
    a range outside the run is refused in one line before any record."""
    _run(tmp_path, corpus_dir, "p", replicas=2, steps=6, sync_every=3, profile="2:4")
    run = tmp_path / "p"
    (event,) = [e for e in read_jsonl(run / "events.jsonl") if e["kind"] == "profile"]
    assert event["steps"] == [3, 4]
    trace, table = run / "profile-steps3-4.json", run / "profile-steps3-4.txt"
    assert (event["trace"], event["table"]) == (str(trace), str(table))
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert "aten::mm" in names and any(str(n).startswith("Optimizer.step") for n in names)
    lines = table.read_text().splitlines()
    assert lines[0] == "steps 3-4 on cpu, operators by their own cpu time" and "Self CPU" in lines[3]
    # the wall time of a profiled step and the operators' share of it, in the table and the event
    wall, busy = event["wall_ms_per_step"], event["busy_ms_per_step"]
    assert 0 < busy <= wall * 1.05, (busy, wall)  # the CPU's operators: nearly all of a CPU step
    share = f"{100 * busy / wall:.0f}%"
    assert (
        lines[1]
        == f"{wall:.2f} ms a step on the wall, {busy:.2f} ms of the operators' own cpu time ({share})"
    )
    assert all(p.stat().st_mode & 0o077 == 0 for p in (trace, table))
    for bad in ("4:9", "3:3", "2", "a:b"):
        with pytest.raises(ValueError, match=rf"profile='{bad}' is not allowed: '' \(off\) or 'A:B'"):
            _run(tmp_path, corpus_dir, "bad", steps=6, profile=bad)
    assert not (tmp_path / "bad").exists()


def test_a_profiles_busy_time_on_cuda_sums_the_kernels_once():
    """On CUDA the busy time is the kernels' own time (events on the device), as the table's
    "Self CUDA time total": not the CPU operators that launched them, not user annotations."""
    from types import SimpleNamespace as E

    from torch.autograd import DeviceType

    from lowcomm.runtime.trainer.profiling import _busy_us

    events = [
        E(device_type=DeviceType.CUDA, is_user_annotation=False, self_device_time_total=300.0),
        E(device_type=DeviceType.CUDA, is_user_annotation=False, self_device_time_total=200.0),
        E(device_type=DeviceType.CUDA, is_user_annotation=True, self_device_time_total=900.0),
        E(device_type=DeviceType.CPU, is_user_annotation=False, self_device_time_total=500.0),
    ]
    assert _busy_us(events, torch.device("cuda")) == 500.0


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(device="cuda"), "device='cuda' is not allowed"),
        (dict(replicas=2, precision="mxfp8", replica_batching="batched"), "replica_batching='batched'"),
    ],
)
def test_a_device_or_path_that_cannot_serve_is_refused_before_any_record(tmp_path, corpus_dir, kw, match):
    if kw.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: device='cuda' is served")
    with pytest.raises(ValueError, match=match):
        _run(tmp_path, corpus_dir, "x", steps=2, **kw)
    assert not (tmp_path / "x").exists()


def test_compile_is_refused_where_torch_compile_cannot_run(tmp_path, corpus_dir, monkeypatch):
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with pytest.raises(ValueError, match="compile=True is not allowed"):
        _run(tmp_path, corpus_dir, "x", steps=2, compile=True)
    assert not (tmp_path / "x").exists()


def test_compile_says_when_torch_runs_the_low_precision_layers_outside_the_graph(monkeypatch):
    """torch 2.6 cannot compile the fp8 and MX layers' backward: --compile then runs each of them
    outside the graph, which the trainer's log says at start-up (the check, at pretend versions)."""
    from lowcomm import _compat
    from lowcomm.runtime.trainer.config import RunConfig

    run = RunConfig(compile=True)
    for older in (False, True):
        monkeypatch.setattr(_compat, "compiles_layer_backward", lambda older=older: not older)
        assert run.check_compile("fp32") is None
        note = run.check_compile("fp8_rowwise")
        assert (note is not None) == older, note
    assert "fp8_rowwise layers' backward (from torch 2.7" in note and "outside the graph" in note, note
    assert RunConfig(compile=False).check_compile("mxfp8") is None


@pytest.mark.parametrize("wrap", ["autocast", "compile"])
def test_the_embedding_api_works_with_an_autocast_or_compiled_model(wrap):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=32, seq_len=8, n_layer=2, n_head=2, n_embd=16)
    base = GPT(cfg)
    models = [GPT(cfg) for _ in range(2)]
    for m in models:
        m.load_state_dict(base.state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in models]
    dilocos = [
        lowcomm.DiLoCo(m, o, g, sync_every=2) for m, o, g in zip(models, opts, lowcomm.LocalGroup.create(2))
    ]
    runners = [torch.compile(m, backend="aot_eager") for m in models] if wrap == "compile" else models
    for step in range(4):
        for r, (runner, opt) in enumerate(zip(runners, opts)):
            x = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(10 * step + r))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=wrap == "autocast"):
                loss = runner(x, torch.roll(x, -1, 1))
            loss.backward()
            opt.step()
            opt.zero_grad()
        lowcomm.step_replicas(dilocos)
    stats = dilocos[0].drain_round_stats()
    assert len(stats) == 2 and all(s.pseudo_grad_norm > 0 for s in stats)
    assert torch.equal(dilocos[0].global_vector(), dilocos[1].global_vector())
    for m in models:  # after a round with alpha = 0 every replica holds the global parameters
        assert torch.equal(
            torch.cat([p.detach().reshape(-1) for p in m.parameters()]), dilocos[0].global_vector()
        )


def test_the_cpu_benchmarks_run_at_tiny_sizes(tmp_path):
    """diloco_vs_dp.py, overlap.py, collective.py, launch_start.py, threads_share.py and the
    memory probes, which BENCHMARKS.md's CPU tables come from, at tiny sizes in processes of their
    own, as their docstrings run them: a change to the trainer's configuration or records that
    breaks one fails here (diloco_vs_dp.py once read a field the configuration had moved, and
    failed after its first run)."""
    import subprocess
    import sys

    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    tiny = ["--model-dim", "32", "--layers", "3", "--seq-len", "32", "--batch-size", "2"]

    def run(*cmd) -> None:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]

    out = tmp_path / "dvd.json"
    run(sys.executable, bench / "diloco_vs_dp.py", "--steps", "16", "--sync-every", "8", *tiny, "--threads",
        "1", "--runs", "dp,diloco,streaming", "--out", tmp_path / "dvd", "--json", out)  # fmt: skip
    r = json.loads(out.read_text())["results"]
    assert r["dp"]["overhead_fraction"] is None and r["diloco"]["rounds"] == 2
    assert r["diloco"]["bytes_reduction_vs_dp"] == pytest.approx(8.0, rel=0.01)  # a round every 8 steps
    assert r["streaming"]["bytes_reduction_vs_dp"] > r["diloco"]["bytes_reduction_vs_dp"]  # e3m0 fragments
    assert all(math.isfinite(v["final_eval_loss"]) for v in r.values())
    assert r["diloco"]["overhead_fraction"] > 0 and r["streaming"]["overhead_fraction"] > 0

    out = tmp_path / "overlap.json"
    run(sys.executable, bench / "overlap.py", "--replicas", "2", "--steps", "16", "--sync-every", "8",
        "--model-args", " ".join([*tiny, "--heads", "2"]), "--variants", "no_comm,streaming",
        "--out", tmp_path / "ov", "--json", out)  # fmt: skip
    r = json.loads(out.read_text())["results"]
    assert r["no_comm"]["bytes_sent_per_replica"] == 0 and r["no_comm"]["step_time_vs_no_comm"] == 1.0
    assert r["streaming"]["bytes_sent_per_replica"] > 0 and 0 < r["streaming"]["comm_free_fraction"] <= 1

    out = tmp_path / "collective.json"
    run(sys.executable, "-m", "lowcomm", "launch", "--replicas", "2", "--", sys.executable,
        bench / "collective.py", "--sizes", "4096", "--reps", "1", "--json", out)  # fmt: skip
    (row,) = json.loads(out.read_text())["rows"]
    sent = {k: row[f"lowcomm_{k}"]["bytes_sent"] for k in ("fp32", "int8", "e3m0")}
    assert sent["fp32"] == 4 * 4096 and sent["fp32"] > sent["int8"] > sent["e3m0"], sent
    assert all(v["seconds"] > 0 for k, v in row.items() if isinstance(v, dict))

    out = tmp_path / "launch_start.json"  # (the restarted jobs need two ranks: left out here)
    run(sys.executable, bench / "launch_start.py", "--replicas", "1", "--reps", "1", "--no-restart",
        "--json", out)  # fmt: skip
    rows = json.loads(out.read_text())["results"]
    assert [(r["start"], r["replicas"], r["restarted_once"]) for r in rows] == [
        ("exec", 1, False),
        ("forkserver", 1, False),
    ]
    assert all(0 < r["first_step_s"] < r["wall_s"] for r in rows), rows

    out = tmp_path / "threads_share.json"
    run(sys.executable, bench / "threads_share.py", "--steps", "10", "--reps", "1", "--ways", "share",
        "--json", out)  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [(r["job"], r["threads"]) for r in rows] == [
        ("launch 2 ranks", "own share"),
        ("elastic 2 workers", "own share"),
    ]
    assert all(r["wall_s"] > 0 for r in rows) and rows[0]["tokens_per_second"] > 0

    out = tmp_path / "state_memory.json"  # (and startup_memory.py: the same probe; sizes, not peaks)
    run(sys.executable, bench / "state_memory.py", "--width", "256", "--layers", "2", "--json", out)
    r = json.loads(out.read_text())
    assert r["model_mb"] == pytest.approx(2 * (256 * 256 + 256) * 4 / 2**20, abs=0.005)  # (to 2 places)
    assert r["saved_compact_mb"] < r["saved_mb"] and r["file_mb"] >= r["model_mb"]
    assert {"state_dict_peak_added_mb", "save_peak_added_mb", "load_peak_added_mb", "load_seconds"} <= set(r)
    assert {"transfer_donor_peak_added_mb", "transfer_joiner_peak_added_mb", "transfer_seconds"} <= set(r)
    out = tmp_path / "startup_memory.json"
    run(sys.executable, bench / "startup_memory.py", "--width", "256", "--layers", "2", "--json", out)
    assert json.loads(out.read_text())["params"] == 2 * (256 * 256 + 256)


def test_the_throughput_benchmark_runs_every_path_at_tiny_shapes(tmp_path, monkeypatch):
    from helpers import load_benchmark

    bench = load_benchmark("gpu_throughput")
    out = tmp_path / "t.json"
    argv = ["gpu_throughput.py", "--smoke", "--two-process", "--update", "--profile", "1", "--json", str(out)]
    monkeypatch.setattr("sys.argv", argv)
    bench.main()
    r = json.loads(out.read_text())
    (row,) = r["rows"]
    assert row["plain"]["tokens_per_second"] > 0 and r["commit"] and "not a measurement" in r["note"]
    update = r["update"]["smoke"]  # the replicas' update alone, before and with ReplicaAdamW
    assert all(t > 0 for t in update["ms_per_step"].values()) and update["weight_elements"] > 0
    runs = ("replicas", "replicas_clip", "dp", "diloco", "streaming")
    for name in ("plain", *runs):  # step 3 of 16 profiled: after 2, before 4
        assert row[name]["profile"][0] == "steps 3-3 on cpu, operators by their own cpu time", name
    for name in runs:
        assert row[name]["tokens_per_second"] > 0 and row[name]["x_plain"] > 0, name
    # each part's wall seconds, warm-up included: what the next bounded slot has to fit
    parts = [row[n] for n in ("plain", *runs)] + [r["two_process"], update]
    assert all(p["wall_s"] > 0 for p in parts)
    timed_s = 8 * (4 * 2 * 32) / row["plain"]["tokens_per_second"]  # its last 8 steps' tokens
    assert row["plain"]["wall_s"] > timed_s

    # the loops without the trainer: the clip's norms (a multi-tensor norm, per tensor on a CPU)
    # are in the profile of the one that clips only
    def norms(name: str) -> bool:
        return any("foreach_norm" in line or "vector_norm" in line for line in row[name]["profile"])

    assert norms("replicas_clip") and not norms("replicas")
    assert row["dp"]["wait_fraction"] is None  # DP's mean is part of every step
    for name in ("dp", "diloco", "streaming"):
        assert row[name]["mfu"] is None and row[name]["finish_s"] >= 0
        if name != "dp":
            assert 0 <= row[name]["wait_fraction"] <= row[name]["wait_fraction_with_end"] < 1, name
        windows = row[name]["window_ms_per_step"]  # 16 steps, a loss read every 2: 7 windows after the first
        assert [w[0] for w in windows] == [4, 6, 8, 10, 12, 14, 16] and all(w[1] > 0 for w in windows)
    assert row["streaming"]["final_loss"] < 5.545
    # the rounds and where the loop's host time went in them (Streaming's rounds: encode, decode)
    assert row["streaming"]["rounds"] > 0 and row["streaming"]["timing"]["encode_s"] > 0
    # each round of replica 0 apart: its fragment, steps and seconds by phase, as recorded
    for run in (row["streaming"], r["two_process"]):
        fields, times = run["round_fields"], run["round_times"]
        assert times and all(len(t) == len(fields) for t in times)
        rounds = [dict(zip(fields, t)) for t in times]
        assert all(x["apply_step"] >= x["send_step"] and x["wait_s"] >= 0 for x in rounds)
    assert row["dp"]["round_times"] == []
    # the waits over the tokens/s window alone: a share of it, none for DP
    for run in (row["diloco"], row["streaming"], r["two_process"]):
        assert 0 <= run["wait_fraction_steady"] < 1
        assert run["device_wait_fraction_steady"] is None  # no GPU timing on a CPU
    # 16 steps, H = 50: every round is the end's sync (the window's rounds: the test above)
    assert all(x[1] == x[2] == 16 for x in row["streaming"]["round_times"])
    assert row["diloco"]["steady_rounds"] == row["streaming"]["steady_rounds"] == 0
    assert row["dp"]["wait_fraction_steady"] is None and row["dp"]["steady_rounds"] == 0
    two = r["two_process"]
    assert "error" not in two, two.get("error")
    assert two["tokens_per_second"] > 0 and two["bytes_sent_per_replica"] > 0
    assert two["rounds"] > 0 and two["timing"]["send_s"] > 0
    assert 0 <= two["wait_fraction"] <= two["wait_fraction_with_end"] < 1 and two["finish_s"] > 0
    # the goals read off it: a CPU smoke run's size is no goal's, so none is measured
    goals = load_benchmark("goals").main(["--throughput", str(out)])["goals"]
    assert goals and all(g["verdict"] == "not measured" for g in goals), goals


H200 = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "h200-2026-12-04"


def test_the_goals_are_read_off_a_gpu_checks_json_as_measured(tmp_path, capsys):
    """The third H200 session's JSON: each figure the raw files' own ratio, each verdict the goal's
    rule (every place the goal names measured and at its target), a run that failed named."""
    goals = load_benchmark("goals")
    out = goals.main([str(H200), "--json", str(tmp_path / "g.json")])
    by = {g["goal"].split(" ")[0] + " " + g["target"]: g for g in out["goals"]}
    t = json.loads((H200 / "throughput.json").read_text())
    k = json.loads((H200 / "kernels.json").read_text())
    large = next(r for r in t["rows"] if r["size"] == "large")
    diloco = by["DiLoCo ≥ 0.9x"]
    assert diloco["values"] == {"small": None, "large": large["diloco"]["x_plain"]}
    assert diloco["verdict"] == "short"  # 0.76x
    dp = by["DP ≥ 0.85x"]  # met at the large size, the small one's trainer runs never ran
    assert dp["values"]["large"] >= 0.85 and dp["verdict"] == "not measured"
    rows = {tuple(r["shape"]): r for r in k["speed"]["rows"]}
    r = rows[(16384, 4096, 14336)]
    rowwise = by["fp8 ≥ 1.3x bf16"]
    best = max(r["fp8_rowwise_tflops"], r["fp8_rowwise_fast_accum_tflops"]) / r["bf16_tflops"]
    assert rowwise["values"]["16384x4096x14336"] == best and rowwise["verdict"] == "short"
    linear = [g for g in out["goals"] if g["goal"].startswith("one Linear")]
    assert [g["verdict"] for g in linear] == ["met", "met"]  # 1.50x and 1.29x
    assert linear[0]["values"] == {"16384x4096x14336": k["linear"]["fp8_rowwise_x_bf16"]}
    (training,) = [g for g in out["goals"] if g["goal"].startswith("training")]
    assert training["verdict"] == "short" and "fp8_delayed (eager): RuntimeError" in training["note"]
    assert (
        max(training["values"].values())
        == k["training_compiled"]["fp8_rowwise:all+inductor"]["tokens_per_second_x_bf16"]
    )
    # the tests' outcomes, summed over the shards' sessions
    kernel_tests, trainer_tests = out["goals"][-2:]
    assert kernel_tests["values"] == {"tests.txt": 8} and "190 passed" in kernel_tests["note"]
    assert trainer_tests["values"] == {"train_tests.txt": 3} and trainer_tests["verdict"] == "short"
    # the two-process run predates the figure after first rounds: not measured, its whole run named
    (steady,) = [g for g in out["goals"] if "two processes" in g["goal"]]
    assert steady["verdict"] == "not measured" and "whole run 2.60%" in steady["note"]
    table = capsys.readouterr().out
    assert (
        "| DiLoCo tokens/s vs the plain compiled bf16 loop | ≥ 0.9x | small: not measured, large: 0.7575x |"
        in table
    )
    assert json.loads((tmp_path / "g.json").read_text())["sources"]["kernels"]["machine"] == "NVIDIA H200"


def test_the_goals_meet_where_every_place_is_at_its_target_and_refuse_what_is_not_a_checks_output(
    tmp_path, capsys
):
    goals = load_benchmark("goals")
    run = lambda x, **kw: {"x_plain": x, "mfu": 0.36, "wait_fraction": 0.001, **kw}  # noqa: E731
    rows = [
        {"size": s, "diloco": run(0.93), "streaming": run(0.91), "dp": run(0.9)} for s in ("small", "large")
    ]
    two = {"size": "large", "wait_fraction": 0.02, "wait_fraction_steady": 0.004, "steady_rounds": 30}
    gpu = {"machine": "NVIDIA H100 80GB HBM3", "date": "2026-12-06", "commit": "abc1234", "torch": "2.11"}
    t = {"benchmark": "gpu_throughput", **gpu, "rows": rows, "two_process": two}
    t["loss_check"] = {"bf16_over_fp32": 1.004}
    (tmp_path / "throughput.json").write_text(json.dumps(t))
    out = goals.main([str(tmp_path)])
    assert [g["verdict"] for g in out["goals"][:7]] == ["met"] * 7
    assert all(g["verdict"] == "not measured" for g in out["goals"][7:])  # no kernels.json
    rows[0]["diloco"]["x_plain"] = 0.89  # one size short: short
    (tmp_path / "throughput.json").write_text(json.dumps(t))
    assert goals.main([str(tmp_path)])["goals"][0]["verdict"] == "short"

    def training_goal() -> dict:
        return next(g for g in goals.main([str(tmp_path)])["goals"] if g["goal"].startswith("training"))

    # the training goal: fast enough counts only with the loss within 1%
    k = {"benchmark": "kernels", **gpu, "training_compiled": {"bf16": {}}}
    k["training_compiled"]["fp8_delayed"] = {"tokens_per_second_x_bf16": 1.2, "loss_ratio_vs_bf16": 1.02}
    (tmp_path / "kernels.json").write_text(json.dumps(k))
    assert training_goal()["verdict"] == "short"
    k["training_compiled"]["fp8_rowwise"] = {"tokens_per_second_x_bf16": 1.16, "loss_ratio_vs_bf16": 0.995}
    (tmp_path / "kernels.json").write_text(json.dumps(k))
    training = training_goal()
    assert training["verdict"] == "met" and set(training["values"]) == {
        "fp8_delayed (compiled)",
        "fp8_rowwise (compiled)",
    }
    # a shard that timed out (a session without its summary) leaves the tests not measured
    session = "===== test session starts =====\n"
    (tmp_path / "tests.txt").write_text(f"{session}===== 66 passed in 60.1s =====\n{session}..F")
    (tmp_path / "train_tests.txt").write_text(f"{session}===== 9 passed, 1 skipped in 30.0s =====\n")
    kernel_tests, trainer_tests = goals.main([str(tmp_path)])["goals"][-2:]
    assert kernel_tests["verdict"] == "not measured" and "1 of 2 sessions unfinished" in kernel_tests["note"]
    assert trainer_tests["verdict"] == "met" and trainer_tests["note"] == "9 passed, 1 skipped"
    # the same figures from a machine without a GPU (a smoke run): none is a GPU's
    (tmp_path / "kernels.json").write_text(json.dumps({**k, "machine": "x86_64 CPU, 2 cores (no GPU)"}))
    assert training_goal()["verdict"] == "not measured"
    (tmp_path / "kernels.json").write_text("{not json")
    with pytest.raises(SystemExit, match="kernels.json is not JSON"):
        goals.main([str(tmp_path)])
    (tmp_path / "kernels.json").write_text(json.dumps({"benchmark": "soak"}))
    with pytest.raises(SystemExit, match="not kernels.py's output"):
        goals.main([str(tmp_path)])
    with pytest.raises(SystemExit):
        goals.main([str(tmp_path / "nowhere")])
    assert "nowhere' is not a folder" in capsys.readouterr().err


def test_the_steady_wait_fraction_counts_the_rounds_after_warm_up(tmp_path):
    """Replica 0's rounds applied after the first loss read past both the first quarter and every
    fragment's first round, up to the last read, the end's sync's left out, over the wall time
    between those reads; the GPU's wait only where every such round timed it; no window, no
    figure."""
    from helpers import load_benchmark

    common = load_benchmark("common")
    steps = [{"kind": "step", "step": s, "wall": 100.0 + s / 10} for s in range(1, 41)]  # 0.1 s a step

    def round_(fragment, apply_step, wait_s, replica=0, final=False, device=None):
        return {
            "kind": "round",
            "replica": replica,
            "fragment": fragment,
            "apply_step": apply_step,
            "send_step": apply_step - 1,
            "wait_s": wait_s,
            "final": final,
            "device_wait_s": device,
        }

    rounds = [
        round_(0, 6, 5.0),  # fragment 0's first
        round_(1, 12, 5.0),  # fragment 1's first: the window starts at the next read, step 15
        round_(0, 14, 5.0),  # before the window
        round_(0, 16, 0.02, device=0.01),
        round_(1, 25, 0.04, device=0.03),
        round_(1, 25, 9.0, replica=1),  # another replica's
        round_(0, 40, 0.1, final=True),  # the end's sync
    ]
    events = tmp_path / "events.jsonl"

    def steady(records, steps_run=40):
        events.write_text("".join(json.dumps(e) + "\n" for e in records))
        return common.steady_wait_fractions(str(tmp_path), {"steps_run": steps_run, "wait_fraction": 0.5}, 5)

    got = steady(steps + rounds)
    assert got["steady_from"] == 15 and got["steady_rounds"] == 2
    assert got["wait_fraction_steady"] == pytest.approx(0.06 / 2.5)  # steps 15 to 40: 2.5 s
    assert got["device_wait_fraction_steady"] == pytest.approx(0.04 / 2.5)
    rounds[4]["device_wait_s"] = None  # one round untimed: no GPU figure
    got = steady(steps + rounds)
    assert got["device_wait_fraction_steady"] is None and got["wait_fraction_steady"] == pytest.approx(0.024)
    # a fragment's first round at the last read: no steady window at all
    got = steady(steps + rounds + [round_(2, 40, 0.5)])
    assert got == {
        "wait_fraction_steady": None,
        "device_wait_fraction_steady": None,
        "steady_from": None,
        "steady_rounds": 0,
    }


def test_the_gpu_check_script_parses_and_writes_at_most_eight_files(tmp_path):
    """benchmarks/gpu_check.sh is what a session lent a GPU runs, once, in a slot of minutes: it
    must parse (bash -n), name at most 8 files under $OUT (the device tool's limit), hand the
    kernel benchmark recipes it takes, and refuse a section it does not have before it runs
    anything."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "benchmarks" / "gpu_check.sh"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    named = set(re.findall(r"\$OUT/(\w[\w.]*)", script.read_text()))
    assert {"env.txt", "tests.txt", "throughput.json", "kernels.json"} <= named and len(named) <= 8, named
    compiled_too = re.search(r"TRAIN_ARGS---train-compiled-too ([^}]+)\}", script.read_text()).group(1)
    kernels = load_benchmark("kernels")  # its default comparison's recipes, as the script passes them
    assert len(kernels._recipes(compiled_too, compile=True, flag="--train-compiled-too")) == 3, compiled_too
    # the throughput's runs, as the script names them, are the benchmark's; another is refused
    throughput = load_benchmark("gpu_throughput")
    runs = re.search(r"THROUGHPUT_RUNS:-([\w,]+)\}", script.read_text()).group(1).split(",")
    assert set(runs) == set(throughput.RUNS), runs  # the goals' runs
    r = subprocess.run(
        [sys.executable, str(script.parent / "gpu_throughput.py"), "--smoke", "--runs", "dp,dlioco"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "unknown run(s) ['dlioco']" in r.stderr, r.stderr
    # each test the tests section leaves out of the kernel tests' shards still exists under that
    # name (a renamed one would silently run on the GPU image, whose extras it may lack)
    left_out = re.search(r'tests/test_kernels.py \\\n\s+-k "([^"]+)"', script.read_text()).group(1)
    names = re.findall(r"^def (test_\w+)", (Path(__file__).parent / "test_kernels.py").read_text(), re.M)
    for term in left_out.split(" and "):
        assert term.startswith("not ") and any(term[4:] in n for n in names), (term, left_out)
    # a section it does not have is refused by name before anything runs or is written
    out = tmp_path / "out"
    env = {**os.environ, "SECTIONS": "throughput kernel"}
    r = subprocess.run(["bash", str(script), str(out)], capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 2 and "unknown section 'kernel'" in r.stderr and not out.exists(), r.stderr


def test_metrics_go_to_tensorboard_as_in_the_records(tmp_path, corpus_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run(
        tmp_path,
        corpus_dir,
        "tb",
        replicas=2,
        steps=8,
        sync_every=4,
        fragments=2,
        eval_every=4,
        metrics="tensorboard",
    )
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    evals = read_jsonl(tmp_path / "tb" / "eval.jsonl")
    got = [(e.step, e.value) for e in acc.Scalars("eval/loss")]
    assert [s for s, _ in got] == [e["step"] for e in evals] == [4, 8]
    assert [v for _, v in got] == pytest.approx([e["loss"] for e in evals], rel=1e-6)
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 9))
    rounds = [
        e for e in read_jsonl(tmp_path / "tb" / "events.jsonl") if e["kind"] == "round" and e["replica"] == 0
    ]
    assert len(acc.Scalars("round/pseudo_grad_norm")) == len(rounds) == 4


def test_an_overwritten_run_leaves_tensorboard_the_new_runs_curves_alone(tmp_path, corpus_dir):
    """--overwrite replaces the TensorBoard event files with the records (TensorBoard draws every
    file of its folder as one run: the old run's 8 steps under the new run's 4). A sink opens its
    file at its first scalars: a run refused after it was made (an elastic worker the coordinator
    turns away) adds none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lowcomm.runtime.trainer.metrics import open_sink

    open_sink("tensorboard", tmp_path / "refused", {}).close()
    assert not (tmp_path / "refused").exists()

    run = dict(replicas=2, sync_every=2, eval_every=0, metrics="tensorboard")
    _run(tmp_path, corpus_dir, "tb", steps=8, **run)
    folder = tmp_path / "tb" / "tensorboard"
    old = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert len(old) == 1
    with pytest.raises(ValueError, match="already holds files"):
        _run(tmp_path, corpus_dir, "tb", steps=4, **run)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == old
    _run(tmp_path, corpus_dir, "tb", steps=4, overwrite=True, **run)
    files = list(folder.iterdir())
    assert len(files) == 1 and files[0].name not in old, files
    acc = EventAccumulator(str(folder))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]


def test_a_resumed_run_s_tensorboard_curve_has_each_step_once(tmp_path, corpus_dir, monkeypatch):
    """A run killed at step 18 after its checkpoint of step 16, then resumed: TensorBoard drew
    steps 17 and 18 twice (the killed attempt's file and the resumed one's). The resumed run's
    file hides the steps after its checkpoint from the earlier one, as the records' timeline does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = dict(replicas=2, steps=24, sync_every=4, eval_every=0, log_every=1, checkpoint_every=8)
    run["metrics"] = "tensorboard"
    with monkeypatch.context() as m:
        _crash_at(m, build.Replicas, 19)
        with pytest.raises(RuntimeError, match="power cut"):
            _run(tmp_path, corpus_dir, "r", **run)
    _run(tmp_path, corpus_dir, "r", resume="auto", **run)
    acc = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    acc.Reload()
    drawn = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    history = [(e["step"], e["loss"]) for e in timeline(tmp_path / "r") if e["kind"] == "step"]
    assert [s for s, _ in drawn] == [s for s, _ in history] == list(range(1, 25))
    assert [v for _, v in drawn] == pytest.approx([v for _, v in history], rel=1e-6)


def test_metrics_go_to_wandb_offline_and_a_missing_package_is_named(tmp_path, corpus_dir, monkeypatch):
    import sys
    import types

    calls = {"init": [], "log": [], "finish": 0}

    class Run:
        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finish"] += 1

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls["init"].append(kw) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    _run(tmp_path, corpus_dir, "wb", replicas=2, steps=4, sync_every=2, eval_every=4, metrics="wandb")
    (init,) = calls["init"]
    assert (
        init["mode"] == "offline" and init["dir"] == str(tmp_path / "wb") and init["config"]["replicas"] == 2
    )
    assert [s for s, v in calls["log"] if "train/loss" in v] == [1, 2, 3, 4]
    assert [v["eval/loss"] for s, v in calls["log"] if "eval/loss" in v] == [
        e["loss"] for e in read_jsonl(tmp_path / "wb" / "eval.jsonl")
    ]
    assert calls["finish"] == 1

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(
        ImportError, match=r"--metrics wandb needs wandb, which is not installed: pip install wandb"
    ):
        _run(tmp_path, corpus_dir, "nowb", steps=2, metrics="wandb")
    assert not (tmp_path / "nowb").exists()  # refused before any record


def test_batched_replicas_clip_each_replica_as_clip_grad_norm_does_eager_and_compiled():
    """Per-replica clipping of stacked gradients (the coefficients, applied by the optimizer)
    equals torch's clip_grad_norm_ on each replica's own gradients (a replica under the limit is
    left alone); compiled it gives the same; bf16 gradients get their norm in fp32; no gradients
    at all is no coefficient."""
    from lowcomm.optim.replica_adamw import clip_coefficients

    torch.manual_seed(0)
    stacked = [torch.randn(3, 4, 5), torch.randn(3, 7), torch.randn(3, 2, 2, 2)]
    for g in stacked:
        g[1] *= 1e-3  # replica 1's norm stays under the limit
    want = []
    for m in range(3):  # replica m's parameters, holding its gradients
        own = [torch.zeros_like(g[m], requires_grad=True) for g in stacked]
        for p, g in zip(own, stacked):
            p.grad = g[m].clone()
        torch.nn.utils.clip_grad_norm_(own, 1.0)
        want.append([p.grad for p in own])
    compiled = torch.compile(clip_coefficients, backend="aot_eager")
    for clip in (clip_coefficients, compiled):
        coef = clip([g.clone() for g in stacked], 1.0)
        assert coef.dtype == torch.float32 and coef[1] == 1.0  # under the limit: untouched
        for m in range(3):
            for g, ref in zip(stacked, want[m]):
                torch.testing.assert_close(g[m] * coef[m], ref, rtol=1e-6, atol=0)
    low = [g.bfloat16() for g in stacked]
    exact = clip_coefficients([g.float() for g in low], 1.0)
    torch.testing.assert_close(clip_coefficients(low, 1.0), exact, rtol=1e-6, atol=0)
    assert clip_coefficients([], 1.0) is None


def test_the_per_replica_clip_is_a_few_multi_tensor_operations_whatever_the_model():
    """The trainer's clip coefficients for 4 replicas of the reference GPT (100 gradients): a few
    operations, each a launch or a few on a GPU (multi-tensor ones), where compiling it made
    Inductor write a reduction kernel per replica's slice of every gradient (427 kernels,
    counted on CPU). Applying them is the optimizer's: 4 multi-tensor products off the kernel."""
    from lowcomm.lm.batched import stack_parameters
    from lowcomm.optim.replica_adamw import ReplicaAdamW, clip_coefficients

    cfg = GPTConfig(seq_len=16, n_layer=8, n_head=2, n_embd=16)
    params = list(stack_parameters([GPT(cfg) for _ in range(4)]).values())
    assert len(params) == 100
    for p in params:
        p.grad = torch.randn_like(p)
    counted = load_benchmark("host_overhead")._Count()  # operations other than views
    with counted, torch.no_grad():
        coef = clip_coefficients([p.grad for p in params], 1e-3)  # every replica over the limit
    assert sum(counted.ops.values()) <= 8, counted.ops
    assert "aten._foreach_norm.Scalar" in counted.ops and (coef < 1).all()
    opt = ReplicaAdamW(params, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, kernel=False)
    with load_benchmark("host_overhead")._Count() as counted:
        opt.step(grad_coef=coef)
    assert counted.ops["aten._foreach_mul_.Tensor"] == 4, counted.ops


def test_replica_adamw_clips_with_max_norm_from_the_gradients_it_reads_once(monkeypatch):
    """``step(max_norm=x)`` steps exactly as ``step(grad_coef=clip_coefficients(...))`` of the
    same gradients (a bf16 copy's among them, and a tied parameter's two summed), collecting the
    gradients once; both at once is refused by name."""
    from lowcomm.optim.replica_adamw import ReplicaAdamW, clip_coefficients

    torch.manual_seed(0)

    def setup():
        torch.manual_seed(1)
        w, b = torch.randn(3, 5, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
        opt = ReplicaAdamW([w, b], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, copies={"w": w}, kernel=False)
        opt.fresh_copies()["w"].grad = torch.randn(3, 5, 4).bfloat16()
        w.grad = torch.randn(3, 5, 4)  # tied: both get a gradient
        b.grad = torch.randn(3, 4) * 10
        return w, b, opt

    w1, b1, opt1 = setup()
    coef = clip_coefficients([g for _, g in opt1.gradients()], 0.5)
    assert (coef < 1).all()
    opt1.step(grad_coef=coef)
    w2, b2, opt2 = setup()
    calls = []
    real = ReplicaAdamW.gradients
    monkeypatch.setattr(ReplicaAdamW, "gradients", lambda self: calls.append(1) or real(self))
    opt2.step(max_norm=0.5)
    assert calls == [1]
    assert torch.equal(w1, w2) and torch.equal(b1, b2)
    with pytest.raises(ValueError, match="grad_coef or max_norm"):
        opt2.step(grad_coef=coef, max_norm=0.5)


def test_the_clip_norms_each_dtype_of_gradient_in_one_multi_tensor_operation(monkeypatch):
    """torch's CUDA ``_foreach_norm`` runs one kernel over a list only where the list shares one
    dtype, and falls back to a norm kernel per tensor where it mixes them. The trainer's bf16
    runs mix them (the matrices' bf16 copies' gradients beside fp32 biases and layer norms):
    the clip hands torch one list per dtype, each gradient's norm in its place."""
    from lowcomm.optim.replica_adamw import clip_coefficients

    torch.manual_seed(0)
    grads = [torch.randn(4, 6, 5), torch.randn(4, 6), torch.randn(4, 7, 5), torch.randn(4, 3)]
    grads[0], grads[2] = grads[0].bfloat16(), grads[2].bfloat16()  # as the copies' gradients
    calls = []
    real = torch._foreach_norm

    def recorded(tensors, *args, **kwargs):
        calls.append({t.dtype for t in tensors})
        return real(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_norm", recorded)
    coef = clip_coefficients(grads, 1.0)
    assert sorted(map(sorted, calls), key=str) == [[torch.bfloat16], [torch.float32]], calls
    for m in range(4):  # replica m's clip_grad_norm_ coefficient over its own gradients in fp32
        total = torch.linalg.vector_norm(torch.cat([g[m].float().flatten() for g in grads]))
        torch.testing.assert_close(coef[m], (1.0 / (total + 1e-6)).clamp(max=1.0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("replicas,extern", [(1, False), (3, False), (3, True)])
@pytest.mark.parametrize("compiled", [False, True])
def test_the_batched_weights_get_their_gradient_in_their_own_layout_without_a_copy(
    compiled, replicas, extern
):
    """Each stacked matrix's gradient is made as dyᵀ·x in the weight's own layout (nn.Linear's
    way), not as the transposed (xᵀ·dy)ᵀ that autograd's bmm of ``w.transpose(1, 2)`` gives and
    the gradient's accumulation then copies into the weight's layout (a strided copy of every
    matrix's gradient each step on a GPU); the gradients are autograd's, eager and compiled,
    in fp32 and under bf16 autocast. One set of weights (DP) runs nn.Linear's GEMM with the bias
    in it (``addmm``), and no separate addition over the output; so do stacked ones whose output
    an extern kernel reads (``baddbmm``: the qkv projection's, read by attention)."""
    from helpers import Dispatched

    from lowcomm.lm.batched import _linear

    torch.manual_seed(0)
    x = torch.randn(replicas, 10, 8, requires_grad=True)
    w = torch.randn(replicas, 12, 8, requires_grad=True)  # (M, out, in)
    b = torch.randn(replicas, 12, requires_grad=True)

    def ours(x, w, b):
        return _linear(x, w, b, read_by_extern=extern).square().sum()

    def autograds(x, w, b):  # under autocast a bias in the GEMM joins its sums before the rounding
        if replicas == 1:  # nn.Linear's own arithmetic
            return torch.nn.functional.linear(x[0], w[0], b[0]).square().sum()
        if extern:
            return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2)).square().sum()
        y = torch.bmm(x, w.transpose(1, 2))
        return (y + b.unsqueeze(1).to(y.dtype)).square().sum()

    fn = torch.compile(ours, backend="aot_eager") if compiled else ours
    for low in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            ref_loss = autograds(x, w, b)
            with Dispatched() as forward:  # the forward's operators
                loss = fn(x, w, b)
        names = forward.names()
        if not compiled:  # the bias in the GEMM (addmm, baddbmm) or added after it
            gemm = "addmm" if replicas == 1 else "baddbmm" if extern else "bmm"
            want_ops = {"addmm": 0, "baddbmm": 0, "bmm": 0, gemm: 1, "add": int(gemm == "bmm")}
            assert {k: names.count(k) for k in want_ops} == want_ops, names
        want = torch.autograd.grad(ref_loss, (x, w, b))
        with Dispatched() as backward:
            loss.backward()
        # the tensors that copies and fresh allocations make
        made = ("copy_", "clone", "new_empty_strided", "empty_strided")
        writes = [shape for name, shape in backward.calls if name in made]
        assert w.grad.dtype == torch.float32 and w.grad.is_contiguous()
        if not low:  # under autocast the bf16 gradient's cast to fp32 is a copy of its own
            assert w.shape not in writes, writes
        tol = 2**-7 if low else 1e-5  # bf16 products' last bits; fp32 sums in another order
        for got, ref in zip((x.grad, w.grad, b.grad), want):
            torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
        x.grad = w.grad = b.grad = None


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA B200", 2250e12),
        ("NVIDIA GB200", 2500e12),
        ("NVIDIA L4", None),
    ],
)
def test_mfu_takes_each_gpus_own_dense_bf16_peak(name, peak, monkeypatch):
    """The first entry of the table a device name holds (the PCIe and NVL H100s before the SXM
    one, GB200 before B200); an unknown GPU or a CPU has none (mfu null)."""
    from lowcomm.runtime.trainer.loop import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0)) == peak
    assert peak_flops(torch.device("cpu")) is None


def test_host_overhead_benchmark_counts_every_phase_and_dp_in_process_reduces_nothing(tmp_path, monkeypatch):
    """benchmarks/host_overhead.py runs (a few steps); DP over batched replicas in one process
    takes no operation before the update (its replicas share one set of parameters: the backward
    gave the mean; through the in-process collective per replica and bucket it took 120, and 213
    more during the backward). Its compiled part at 2 layers, not 8: the same graphs, traced
    sooner; traced by Dynamo and AOTAutograd as Inductor gets them, then run as they are
    (aot_eager): Inductor's C++ build of their CPU kernels (a g++ run each, about 50) took 40 s of
    the suite on a machine with a cold compile cache, as CI's is, and
    test_a_compiled_bf16_run_compiles_each_of_its_functions_once runs Inductor on the trainer's."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    bench = load_benchmark("host_overhead")
    argv = ["--steps", "2", "--json", str(tmp_path / "h.json"), "--skip-layers", "--compiled-layers", "2"]
    out = bench.main(argv)  # the layers' counts: test_kernels
    rows = out["rows"]
    assert set(rows) == {"plain", "dp", "diloco", "streaming"}
    assert all(r["ops"]["total"] > 0 and r["ms_per_step"] > 0 for r in rows.values())
    assert all(0 < r["update_ms_per_step"] < r["ms_per_step"] for r in rows.values())
    assert rows["dp"]["ops"]["before_update"] == 0
    assert (
        rows["diloco"]["ops"]["before_update"] == rows["diloco"]["ops"]["after_update"] == 0
    )  # between rounds
    # the update on the kernels: a launch for each of the 10 matrices and embeddings, one for the
    # 18 biases and layer norms, the clip's sums of squares and coefficients (torch's multi-tensor
    # step and norm made 28)
    assert rows["diloco"]["ops"]["update"] <= 20, rows["diloco"]["ops"]
    assert json.loads((tmp_path / "h.json").read_text())["rows"]["plain"]["ops"] == rows["plain"]["ops"]
    compiled = out["compiled"]  # the same runs compiled: timed, not counted
    assert compiled["shape"]["layers"] == 2 and set(compiled["rows"]) == set(rows)
    assert all(r["ops"] is None and r["ms_per_step"] > 0 for r in compiled["rows"].values())


class _Stop(Exception):
    pass


def test_each_process_of_a_launcher_takes_its_own_gpu_before_touching_one(monkeypatch, tmp_path):
    """The rule that places a process on a machine with 8 GPUs (torch.cuda's answers stubbed: this
    checks lowcomm's choice, not the hardware). torchrun's rank 11 takes GPU 11 % 8 and sets it
    before the first CUDA call (the memory check read GPU 0, making a context there for every
    process of the node); `cuda:N` places a process no launcher placed, and is refused under one."""
    from lowcomm.runtime.trainer.loop import Trainer

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    free = (2**40, 2**40)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: calls.append(("mem_get_info", d)) or free)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)

    def device(d):
        return TrainConfig.from_flat(device=d).run.torch_device()

    assert device("cuda") == device("auto") == torch.device("cuda", 0)
    assert device("cuda:5") == torch.device("cuda", 5)
    with pytest.raises(
        ValueError, match=r"device='cuda:8' is not allowed: cuda:0 \.\. cuda:7 \(torch sees 8 GPU"
    ):
        device("cuda:8")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("RANK", "11")
    monkeypatch.setenv("LOCAL_RANK", "11")
    assert device("cuda") == torch.device("cuda", 3)
    with pytest.raises(ValueError, match=r"device='cuda:1' is not allowed: 'cuda' .* LOCAL_RANK % 8 = 3"):
        device("cuda:1")

    def stop(self):
        raise _Stop

    monkeypatch.setattr(Trainer, "_static_topology", stop)  # the process groups: not this test's
    cfg = TrainConfig.from_flat(device="cuda", run_dir=str(tmp_path / "r"), **TINY)
    with pytest.raises(_Stop):
        Trainer(cfg, progress=False)._build()
    assert calls == [("set_device", torch.device("cuda", 3)), ("mem_get_info", torch.device("cuda", 3))]


def _crash_at(monkeypatch, cls, call: int) -> None:
    """The ``call``-th forward of ``cls`` raises, as a process killed mid-run would stop."""
    real, calls = cls.forward_backward, [0]

    def forward_backward(self):
        calls[0] += 1
        if calls[0] == call:
            raise RuntimeError("power cut")
        return real(self)

    monkeypatch.setattr(cls, "forward_backward", forward_backward)


@pytest.mark.parametrize(
    "kw",
    [  # Streaming DiLoCo with a round in flight at the checkpoint, one replica after the other;
        # bf16 DiLoCo of batched replicas (one optimizer over the stack, its bf16 weight copies
        # re-cast from the loaded weights)
        dict(
            replica_batching="sequential",
            sync_every=6,
            fragments=2,
            overlap=1,
            codec="int8",
            error_feedback=True,
        ),
        dict(replica_batching="batched", dtype="bf16", sync_every=6),
    ],
    ids=["streaming-sequential", "diloco-batched-bf16"],
)
def test_a_static_run_killed_mid_way_resumes_from_its_checkpoint_bit_for_bit(
    tmp_path, corpus_dir, monkeypatch, kw
):
    from lowcomm.runtime.trainer import build

    run = dict(replicas=3, steps=24, eval_every=0, log_every=1, **kw)  # (every step's loss recorded)
    straight = _run(tmp_path, corpus_dir, "straight", **run)
    cls = build.BatchedReplicas if kw["replica_batching"] == "batched" else build.Replicas
    with monkeypatch.context() as m:
        _crash_at(m, cls, 19)  # after the checkpoint of step 16, before the end
        with pytest.raises(RuntimeError, match="power cut"):
            _run(tmp_path, corpus_dir, "killed", checkpoint_every=8, **run)
    resumed = _run(tmp_path, corpus_dir, "killed", checkpoint_every=8, resume="auto", **run)
    assert resumed["global_params_sha256"] == straight["global_params_sha256"]
    assert resumed["final_eval_loss"] == straight["final_eval_loss"]
    assert resumed["steps_run"] == 8 and resumed["tokens"] == straight["tokens"]  # the model's tokens
    # and what it sent: the bytes and rounds before the checkpoint count too
    assert resumed["bytes_sent_per_replica"] == straight["bytes_sent_per_replica"]
    assert resumed["rounds"] == straight["rounds"]
    events = read_jsonl(tmp_path / "killed" / "events.jsonl")
    marks = [(e["what"], e["step"]) for e in events if e["kind"] == "checkpoint"]
    assert marks == [("written", 8), ("written", 16), ("resumed", 16), ("written", 24)]
    # the file keeps steps 17 and 18 of the killed attempt; the history as it stands has each
    # step once, the redone ones (the straight run's losses, bit for bit)
    assert [e["step"] for e in events if e["kind"] == "step"] == [*range(1, 19), *range(17, 25)]
    history = [(e["step"], e["loss"]) for e in timeline(tmp_path / "killed") if e["kind"] == "step"]
    straight_steps = read_jsonl(tmp_path / "straight" / "events.jsonl")
    assert history == [(e["step"], e["loss"]) for e in straight_steps if e["kind"] == "step"]


@pytest.mark.parametrize("at", [11, 16], ids=["between-checkpoints", "at-a-checkpoint"])
def test_a_stopped_run_checkpoints_the_step_it_stopped_at_and_resumes_bit_for_bit(tmp_path, corpus_dir, at):
    """``train(stop=...)`` (what SIGTERM sets in ``lowcomm train``): the run ends at the end of the
    step under way, writes its checkpoint there unless it just did (step 16 is a periodic one),
    records a ``stopped`` event, closes its records without a summary and raises Stopped. Resumed,
    it ends in the bits of a run never stopped, losing no step (Streaming DiLoCo, a round in
    flight at the stop)."""
    import threading

    from lowcomm.runtime.errors import Stopped
    from lowcomm.runtime.hooks import NoFaults

    run = dict(
        replicas=3, steps=24, eval_every=0, sync_every=6, fragments=2, overlap=1, codec="int8",
        replica_batching="sequential", checkpoint_every=8,
    )  # fmt: skip
    straight = _run(tmp_path, corpus_dir, "straight", **run)
    stop = threading.Event()

    class StopAt(NoFaults):
        def after_step(self, step):
            if step == at:
                stop.set()

    cfg = TrainConfig.from_flat(corpus=corpus_dir, run_dir=str(tmp_path / "stopped"), **{**TINY, **run})
    with pytest.raises(Stopped, match=f"^stopped at the end of step {at}; its checkpoint is ") as e:
        train(cfg, progress=False, hooks=StopAt(), stop=stop)
    assert (e.value.step, e.value.checkpoint) == (at, str(tmp_path / "stopped" / "checkpoint.lcs"))
    assert not (tmp_path / "stopped" / "summary.json").exists()
    resumed = _run(tmp_path, corpus_dir, "stopped", resume="auto", **run)
    assert resumed["global_params_sha256"] == straight["global_params_sha256"]
    assert resumed["final_eval_loss"] == straight["final_eval_loss"]
    assert resumed["steps_run"] == 24 - at
    assert resumed["bytes_sent_per_replica"] == straight["bytes_sent_per_replica"]
    assert resumed["rounds"] == straight["rounds"]
    events = read_jsonl(tmp_path / "stopped" / "events.jsonl")
    marks = [(e["what"], e["step"]) for e in events if e["kind"] == "checkpoint"]
    written = [8, 16] if at == 16 else [8, 11]
    later = [16, 24] if at == 11 else [24]
    assert marks == [*(("written", s) for s in written), ("resumed", at), *(("written", s) for s in later)]
    assert [(e["step"], e["checkpoint"]) for e in events if e["kind"] == "stopped"] == [
        (at, e.value.checkpoint)
    ]


def test_a_run_stopped_without_checkpoints_says_so_and_writes_none(tmp_path, corpus_dir):
    """Without ``checkpoint_every`` a stop writes no checkpoint (the run did not ask for them):
    Stopped names none, and so does the ``stopped`` event."""
    import threading

    from lowcomm.runtime.errors import Stopped

    stop = threading.Event()
    stop.set()  # (before the first step: a signal during the start-up)
    cfg = TrainConfig.from_flat(corpus=corpus_dir, run_dir=str(tmp_path / "r"), **{**TINY, "steps": 4})
    with pytest.raises(Stopped, match="^stopped at the end of step 0$") as e:
        train(cfg, progress=False, stop=stop)
    assert e.value.checkpoint is None and not list((tmp_path / "r").glob("*.lcs"))
    events = read_jsonl(tmp_path / "r" / "events.jsonl")
    assert [(e["step"], e["checkpoint"]) for e in events if e["kind"] == "stopped"] == [(0, None)]


def test_a_checkpoint_that_does_not_fit_is_refused_in_one_line_and_the_records_are_kept(
    tmp_path, corpus_dir, monkeypatch
):
    from lowcomm.runtime.statefile import CorruptStateError

    run = dict(replicas=2, steps=8, eval_every=0, sync_every=4, checkpoint_every=4)
    _run(tmp_path, corpus_dir, "r", **run)
    # the faults a run under $LOWCOMM_FAULTS injected (read back by a resume, so that none fires twice)
    (tmp_path / "r" / "faults.jsonl").write_text('{"kind": "fault", "id": 0}\n')
    records = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()}
    cases = [
        # torch's error named every tensor, over lines
        (
            dict(model_dim=32),
            r"^resume='auto' \(.*checkpoint.lcs\): the checkpoint is of another model: model_dim=16 "
            r"\(this run: 32\)$",
        ),
        (dict(layers=3, heads=1), r"another model: layers=2 \(this run: 3\), heads=2 \(this run: 1\)$"),
        (dict(sync_every=2), "does not fit this run: DiLoCo state was saved with another configuration"),
        (
            dict(replicas=3),
            r"the checkpoint is of a 'diloco' run of replicas \[0, 1\], this is a 'diloco' run of "
            r"replicas \[0, 1, 2\]",
        ),
        (dict(mode="dp"), "this is a 'dp' run"),
        # a finished run resumed: it would rewrite the summary of 8 steps with one of none
        (dict(steps=8), r"the checkpoint is at step 8 and steps=8: nothing is left to train"),
        (dict(steps=6), r"at step 8 and steps=6: nothing is left to train; give steps above 8"),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            _run(tmp_path, corpus_dir, "r", **{**run, "steps": 12, **change, "resume": "auto"})
    # another corpus's vocabulary, and a crafted checkpoint whose shape is no table
    from lowcomm.lm import GPT, GPTConfig
    from lowcomm.runtime.trainer.build import architecture, check_architecture

    model = GPT(GPTConfig(vocab_size=32, seq_len=8, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(
        ValueError, match=r"^x: .*another model: vocab_size=64 \(this run: 32\); vocab_size is the"
    ):
        check_architecture({**architecture(model), "vocab_size": 64}, model, "x")
    with pytest.raises(
        ValueError, match=r"^x: the checkpoint is of another model: model_dim=None \(this run: 16\)"
    ):
        check_architecture([1], model, "x")
    check_architecture(architecture(model), model, "x")  # its own: no refusal
    # a checkpoint of an older lowcomm records no shape: torch's error, in one line
    from lowcomm.runtime.statefile import load_state, save_state

    old = load_state(tmp_path / "r" / "checkpoint.lcs")
    del old["architecture"]
    save_state(tmp_path / "old.lcs", old)
    with pytest.raises(
        ValueError, match=r"^resume='.*old.lcs' .*: the checkpoint does not fit this run: .*size mis"
    ):
        _run(
            tmp_path,
            corpus_dir,
            "r",
            **{**run, "steps": 12, "model_dim": 32},
            resume=str(tmp_path / "old.lcs"),
        )
    (tmp_path / "bad.lcs").write_bytes(records["checkpoint.lcs"][:200])
    with pytest.raises(CorruptStateError, match="bad.lcs: header length"):
        _run(tmp_path, corpus_dir, "r", **run, resume=str(tmp_path / "bad.lcs"))
    monkeypatch.setenv("WORLD_SIZE", "2")  # each process of a job has its own file: 'auto' only
    with pytest.raises(
        ValueError, match="resume='x.lcs' is not allowed: 'auto' in a job of several processes"
    ):
        _run(tmp_path, corpus_dir, "r", **run, resume="x.lcs")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="outer_device='cuda:99' is not allowed"):  # refused late
        _run(tmp_path, corpus_dir, "r", **run, overwrite=True, outer_device="cuda:99")
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()} == records  # nothing touched
    # a run that replaces it takes the old run's checkpoints and faults away with its records: a
    # later resume='auto' must not continue the old run under the new one's records
    _run(tmp_path, corpus_dir, "r", **{**run, "steps": 2, "checkpoint_every": 0}, overwrite=True)
    assert not list((tmp_path / "r").glob("checkpoint*"))
    assert not (tmp_path / "r" / "faults.jsonl").exists()


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, corpus_dir, caplog, monkeypatch):
    """The one before is kept until the newest is whole; a newest damaged on disk is passed over
    with a warning, and the run still ends on the straight run's bits."""
    from lowcomm.runtime.trainer import build

    run = dict(replicas=2, steps=12, eval_every=0, sync_every=4, checkpoint_every=4)
    straight = _run(tmp_path, corpus_dir, "straight", **{**run, "checkpoint_every": 0})
    with monkeypatch.context() as m:
        _crash_at(m, build.Replicas, 10)  # killed at step 10: checkpoints at 4 and 8
        with pytest.raises(RuntimeError, match="power cut"):
            _run(tmp_path, corpus_dir, "r", **run)
    folder = tmp_path / "r"
    assert sorted(p.name for p in folder.glob("checkpoint*")) == ["checkpoint.lcs", "checkpoint.prev.lcs"]
    newest = folder / "checkpoint.lcs"
    newest.write_bytes(newest.read_bytes()[:-10])  # a torn write
    stale = folder / "checkpoint.lcs.tmp.999999"  # what a process killed mid-write leaves
    stale.write_bytes(b"\0" * 100)
    # the run's folder named as resume= (another run continues from it) takes the same path
    with caplog.at_level("WARNING", logger="lowcomm.runtime.trainer.loop"):
        other = _run(tmp_path, corpus_dir, "other", **run, resume=str(folder))
    assert "resuming from the checkpoint before it" in caplog.text
    assert other["steps_run"] == 8 and other["global_params_sha256"] == straight["global_params_sha256"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        FileNotFoundError,
        match=r"^resume='.*empty': the folder holds no checkpoint.lcs nor checkpoint.prev.lcs \(a run's",
    ):
        _run(tmp_path, corpus_dir, "none", **run, resume=str(tmp_path / "empty"))
    assert not (tmp_path / "none").exists()
    caplog.clear()
    with caplog.at_level("WARNING", logger="lowcomm.runtime.trainer.loop"):
        resumed = _run(tmp_path, corpus_dir, "r", **run, resume="auto")
    assert (
        "checkpoint.lcs: state holds" in caplog.text
        and "resuming from the checkpoint before it" in caplog.text
    )
    assert resumed["steps_run"] == 8 and resumed["global_params_sha256"] == straight["global_params_sha256"]
    assert not stale.exists()  # removed by the next write of that checkpoint
    assert not [e for e in read_jsonl(folder / "events.jsonl") if e["kind"] == "config_changed"]


def test_a_diloco_run_shorter_than_one_round_says_so(tmp_path, corpus_dir, caplog):
    """--steps 10 --sync-every 50 --no-final-sync sent 0 bytes and recorded the untrained model's
    loss as the run's (its global parameters never moved) without a word."""
    run = dict(replicas=2, steps=4, eval_every=0, sync_every=8)
    with caplog.at_level("WARNING", logger="lowcomm.runtime.trainer.loop"):
        never = _run(tmp_path, corpus_dir, "never", **run, final_sync=False)
    assert never["bytes_sent_per_replica"] == 0
    assert (
        "sync_every=8 is more than steps=4: with final_sync off the replicas never synchronize" in caplog.text
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="lowcomm.runtime.trainer.loop"):
        once = _run(tmp_path, corpus_dir, "once", **run)
    assert once["bytes_sent_per_replica"] > 0 and "synchronize once, at the end (final_sync)" in caplog.text


def test_a_run_resumed_with_other_settings_records_what_changed(tmp_path, corpus_dir, caplog):
    """More steps and another learning rate for a finished run's continuation: allowed (as in
    torchtitan), but config.json, which is kept, no longer speaks for every step, so the change
    is recorded where it happened and said once."""
    run = dict(replicas=2, steps=8, eval_every=0, sync_every=4, checkpoint_every=4)
    _run(tmp_path, corpus_dir, "r", **run)
    config = (tmp_path / "r" / "config.json").read_text()
    with caplog.at_level("WARNING", logger="lowcomm.runtime.trainer.loop"):
        out = _run(tmp_path, corpus_dir, "r", **{**run, "steps": 12, "lr": 5e-3}, resume="auto")
    assert out["steps_run"] == 4 and out["lr"] == 5e-3
    assert (tmp_path / "r" / "config.json").read_text() == config
    (changed,) = [e for e in read_jsonl(tmp_path / "r" / "events.jsonl") if e["kind"] == "config_changed"]
    assert changed["step"] == 8 and changed["changed"] == {
        "steps": [8, 12],
        "lr": [TrainConfig().flat()["lr"], 5e-3],
    }
    assert "at step 8 with settings its config.json does not hold: steps 8 -> 12, lr " in caplog.text


def _stacked_problem(M=3):
    """Stacked parameters of three shapes (two decay groups), four steps of gradients and clip
    coefficients: what ReplicaAdamW's tests step."""
    torch.manual_seed(0)
    params = [torch.randn(M, 8, 5), torch.randn(M, 7), torch.randn(M, 40, 33)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(4)]
    coefs = [torch.rand(M) for _ in range(4)]
    return params, grads, coefs


def _groups(params):
    return [
        {"params": [params[0], params[2]], "weight_decay": 0.1},
        {"params": [params[1]], "weight_decay": 0.0},
    ]


def test_replica_adamw_steps_as_torch_adamw_after_the_clip_and_takes_over_its_state():
    """Without the kernel (CPU), ReplicaAdamW is torch's AdamW bit for bit, each replica's gradient
    scaled by its coefficient first; an AdamW's state dict (a checkpoint of the code before)
    loads into it and the run goes on as the AdamW's would, and back."""
    from lowcomm.optim.replica_adamw import ReplicaAdamW

    init, grads, coefs = _stacked_problem()
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    ref = [p.clone().requires_grad_() for p in init]
    ref_opt = torch.optim.AdamW(_groups(ref), **kw, foreach=False)
    ours = [p.clone().requires_grad_() for p in init]
    opt = ReplicaAdamW(_groups(ours), **kw, kernel=False)
    for i, (gs, c) in enumerate(zip(grads, coefs)):
        for p, q, g in zip(ref, ours, gs):
            p.grad = g * c.view(-1, *[1] * (g.dim() - 1))
            q.grad = g.clone()
        ref_opt.step()
        opt.step(grad_coef=c)
        if i == 1:  # half-way: our state from the AdamW's (a copy, as from a checkpoint), then on
            opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    for p, q in zip(ref, ours):
        assert torch.equal(p, q)
    back = torch.optim.AdamW(_groups([p.clone().requires_grad_() for p in init]), **kw)
    back.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all(
        torch.equal(back.state[a]["exp_avg"], opt.state[b]["exp_avg"]) for a, b in zip(back.state, opt.state)
    )


def test_the_replica_adamw_kernel_steps_as_torch_and_writes_the_bf16_copy(monkeypatch):
    """The Triton step (interpreted; every parameter through it, however small): the moments and
    the parameters as torch's AdamW's to an fp32 rounding (torch's CPU square root is not
    correctly rounded, the kernel's is), the bf16 copy the parameter rounded to nearest even
    (autocast's cast) after every step, a bf16 gradient read as its fp32 value, and a parameter
    without a gradient left alone."""
    needs_triton()
    from lowcomm.kernels.triton_adamw import adamw_replicas_
    from lowcomm.optim import replica_adamw
    from lowcomm.optim.replica_adamw import ReplicaAdamW

    monkeypatch.setattr(replica_adamw, "KERNEL_MIN", 0)
    launches = []
    real = replica_adamw.ReplicaAdamW._kernel_step
    monkeypatch.setattr(
        ReplicaAdamW,
        "_kernel_step",
        lambda self, grads, *rest: launches.append(len(grads)) or real(self, grads, *rest),
    )
    init, grads, coefs = _stacked_problem()
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    ref = [p.clone().requires_grad_() for p in init]
    ref_opt = ReplicaAdamW(_groups(ref), **kw, kernel=False)
    ours = [p.clone().requires_grad_() for p in init]
    copies = {"w": ours[2]}
    opt = ReplicaAdamW(_groups(ours), **kw, kernel=True, copies=copies)
    low = opt.fresh_copies()["w"]
    for i, (gs, c) in enumerate(zip(grads, coefs)):
        gs = [g.bfloat16().float() for g in gs]  # values a bf16 gradient can hold
        for p, q, g in zip(ref, ours, gs):
            p.grad = g.clone()
            q.grad = g.clone()
        ours[2].grad, low.grad = None, gs[2].bfloat16()  # the matrix's gradient came to its copy
        if i == 2:
            ref[1].grad = ours[1].grad = None  # no gradient this step: no step for it
        ref_opt.step(grad_coef=c)
        opt.step(grad_coef=c)
        assert torch.equal(low, ours[2].detach().bfloat16())
        opt.zero_grad()
        assert low.grad is None and ours[0].grad is None
    for p, q in zip(ref, ours):  # (with torch 2.13's CPU build and triton 3.9's interpreter the
        # moments agree bit for bit; torch 2.11's lerp and triton 3.6's interpreted fma round apart)
        torch.testing.assert_close(q, p, rtol=2e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[q][key], ref_opt.state[p][key], rtol=1e-6, atol=2e-7)
        assert opt.state[q]["step"] == ref_opt.state[p]["step"]
    assert opt.state[ours[1]]["step"] == 3  # skipped once
    assert launches == [3, 3, 2, 3]  # every parameter with a gradient went through the kernel
    st, odd = opt.state[ours[0]], torch.zeros(3, 5, 8).transpose(1, 2)  # (3, 8, 5), not contiguous
    with pytest.raises(ValueError, match=r"grad is \(3, 8, 5\) on cpu \(contiguous: False\)"):
        adamw_replicas_(
            ours[0],
            odd,
            st["exp_avg"],
            st["exp_avg_sq"],
            step=5.0,
            lr=1e-3,
            beta1=0.9,
            beta2=0.99,
            eps=1e-8,
            weight_decay=0.0,
        )


def test_the_small_parameters_take_one_launch_that_steps_each_as_its_own_launch_would(monkeypatch):
    """adamw_replicas_multi_ (interpreted): several stacked fp32 parameters in one launch, with
    their own step counts and weight decays, with and without the clip's coefficients, a
    parameter of no elements among them: bit for bit what adamw_replicas_ makes of each alone (the
    same arithmetic on the same fp32 scalars). ReplicaAdamW on its kernels hands every small fp32
    parameter to that one launch a step, and steps as torch's AdamW to float rounding, a
    parameter without a gradient left alone; a misshapen tensor is refused by name."""
    needs_triton()
    from lowcomm.kernels import triton_adamw
    from lowcomm.kernels.triton_adamw import adamw_replicas_, adamw_replicas_multi_
    from lowcomm.optim.replica_adamw import ReplicaAdamW

    torch.manual_seed(1)
    shapes = [(3, 5), (3, 1500), (3, 2, 7), (3, 0)]
    tensors = [[torch.randn(s), torch.randn(s), torch.randn(s) * 0.1, torch.rand(s) * 0.01] for s in shapes]
    hypers = [
        dict(step=float(i + 1), lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1 * (i % 2))
        for i in range(len(shapes))
    ]
    for coef in (torch.tensor([0.5, 1.0, 0.25]), None):
        alone = [[t.clone() for t in quad] for quad in tensors]
        for quad, h in zip(alone, hypers):
            adamw_replicas_(*quad, coef=coef, **h)
        together = [[t.clone() for t in quad] for quad in tensors]
        adamw_replicas_multi_(*map(list, zip(*together)), hypers, coef=coef)
        for a, b in zip(alone, together):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    odd = [t.clone() for t in tensors[0]]
    odd[1] = torch.zeros(3, 6)
    with pytest.raises(ValueError, match=r"parameter 0's tensors differ in shape"):
        adamw_replicas_multi_(*([t] for t in odd), hypers[:1])
    with pytest.raises(ValueError, match=r"exp_avg_sq\[0\] is torch.bfloat16; it must be one of"):
        adamw_replicas_multi_(*([t] for t in tensors[0][:3]), [tensors[0][3].bfloat16()], hypers[:1])

    launches = []
    real = triton_adamw.adamw_replicas_multi_
    monkeypatch.setattr(
        triton_adamw,
        "adamw_replicas_multi_",
        lambda params, *a, **k: launches.append(len(params)) or real(params, *a, **k),
    )
    init, grads, coefs = _stacked_problem()  # every parameter under KERNEL_MIN: all small
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    ref = [p.clone().requires_grad_() for p in init]
    ref_opt = ReplicaAdamW(_groups(ref), **kw, kernel=False)
    ours = [p.clone().requires_grad_() for p in init]
    opt = ReplicaAdamW(_groups(ours), **kw, kernel=True)
    for i, (gs, c) in enumerate(zip(grads, coefs)):
        for p, q, g in zip(ref, ours, gs):
            p.grad, q.grad = g.clone(), g.clone()
        if i == 2:
            ref[1].grad = ours[1].grad = None  # no gradient this step: no step for it
        ref_opt.step(grad_coef=c)
        opt.step(grad_coef=c)
    assert launches == [3, 3, 2, 3]
    for p, q in zip(ref, ours):
        torch.testing.assert_close(q, p, rtol=2e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[q][key], ref_opt.state[p][key], rtol=1e-6, atol=2e-7)
    assert opt.state[ours[1]]["step"] == 3


def test_the_clip_sums_each_replicas_squares_in_one_launch_per_gradient_dtype(monkeypatch):
    """sumsq_replicas (interpreted): each replica's sum of squares over bf16, fp16 and fp32
    stacked gradients, one launch per dtype, the same bits every call (partial sums, no atomics),
    equal to the float64 sum to fp32 rounding; the trainer's clip on it gives the multi-tensor
    norm's coefficients, and takes that norm where a gradient is not contiguous."""
    needs_triton()
    from lowcomm.kernels import triton_adamw
    from lowcomm.kernels.triton_adamw import sumsq_replicas
    from lowcomm.optim.replica_adamw import clip_coefficients

    torch.manual_seed(2)
    grads = [
        torch.randn(4, 40, 33).bfloat16(),
        torch.randn(4, 8),
        torch.randn(4, 3000),
        torch.randn(4, 9).half(),
        torch.randn(4, 0),
    ]
    launched = []
    real = triton_adamw._deltas
    monkeypatch.setattr(
        triton_adamw,
        "_deltas",
        lambda ts, base: launched.append((base.dtype, real(ts, base)[1])) or real(ts, base),
    )
    got = sumsq_replicas(grads)
    # a launch a dtype, each reading 16-byte packets where every tensor allows (fp16's 9 a
    # replica do not: its elements one at a time)
    assert launched == [(torch.bfloat16, 8), (torch.float32, 4), (torch.float16, 1)], launched
    want = torch.stack([sum((g[m].double() ** 2).sum() for g in grads) for m in range(4)])
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    assert got.dtype == torch.float32 and torch.equal(sumsq_replicas(grads), got)
    for scale in (1.0, 1e-3):  # replicas over and under the limit
        gs = [g * scale for g in grads]
        torch.testing.assert_close(  # (fp32 sums in two orders)
            clip_coefficients(gs, 30.0, kernel=True), clip_coefficients(gs, 30.0), rtol=1e-5, atol=0
        )
    across = [torch.randn(4, 6, 5).transpose(1, 2), torch.randn(4, 3)]  # not contiguous: the norm
    torch.testing.assert_close(
        clip_coefficients(across, 1.0, kernel=True), clip_coefficients(across, 1.0), rtol=0, atol=0
    )
    with pytest.raises(
        ValueError, match=r"sumsq_replicas: tensors\[0\] is \(4, 5, 6\) on cpu \(contiguous: False\)"
    ):
        sumsq_replicas(across)


def test_batched_bf16_replicas_multiply_by_copies_that_follow_every_write_of_the_weights(
    tmp_path, corpus_dir, monkeypatch
):
    """bf16 batched replicas: the linear layers get the optimizer's bf16 copies (and their
    gradients), the rest the fp32 stack; a write through a replica's model (DiLoCo's outer step,
    a checkpoint's load) re-casts the copies before the next forward; a DiLoCo run ends where the
    sequential replicas' does up to float rounding, with the optimizer's torch step and with its
    Triton kernel (interpreted, where Triton runs)."""
    from lowcomm.lm import load_corpus
    from lowcomm.lm.batched import linear_weights

    cfg = TrainConfig.from_flat(
        corpus=corpus_dir, run_dir=str(tmp_path / "r"), replicas=2, dtype="bf16", **TINY
    )
    corpus = load_corpus(cfg.data.corpus)
    base = build.build_model(cfg, corpus.vocab_size)
    reps = build.BatchedReplicas(base, cfg, corpus, [0, 1], torch.device("cpu"))
    opt = reps.opts[0]
    assert sorted(opt.copies) == sorted(linear_weights(base.cfg))
    reps.forward_backward()
    qkv = "blocks.0.attn.qkv.weight"
    assert opt.copies[qkv].grad.dtype == torch.bfloat16 and reps.params[qkv].grad is None
    assert reps.params["wte.weight"].grad is not None and opt.copies["wte.weight"].grad is not None  # tied
    reps.update()

    def fresh():
        return all(torch.equal(c, reps.params[n].detach().bfloat16()) for n, c in opt.fresh_copies().items())

    assert fresh()
    with torch.no_grad():
        reps.models[1].blocks[0].attn.qkv.weight.mul_(2)  # an outer step's write, replica 1
    assert not torch.equal(opt.copies[qkv][1], reps.params[qkv].detach()[1].bfloat16())
    assert fresh()
    reps.models[0].load_state_dict({k: v * 3 for k, v in reps.models[0].state_dict().items()})
    assert fresh()
    kw = dict(replicas=2, steps=8, mode="diloco", sync_every=4, dtype="bf16")
    seq = _run(tmp_path, corpus_dir, "seq", replica_batching="sequential", **kw)
    bat = _run(tmp_path, corpus_dir, "bat", replica_batching="batched", **kw)
    assert bat["final_eval_loss"] == pytest.approx(seq["final_eval_loss"], rel=1e-4)
    from lowcomm.kernels.triton_quantize import HAVE_TRITON

    if HAVE_TRITON:
        monkeypatch.setattr(build, "ReplicaAdamW", functools.partial(build.ReplicaAdamW, kernel=True))
        ker = _run(tmp_path, corpus_dir, "ker", replica_batching="batched", **kw)
        assert ker["final_eval_loss"] == pytest.approx(bat["final_eval_loss"], rel=1e-4)
