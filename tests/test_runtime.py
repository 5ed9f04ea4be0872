"""Trainer, run records, configuration and the CLI, end to end on tiny jobs."""

import json
import os
import subprocess
import sys
import time

import pytest
from helpers import TINY_FLAGS, write_corpus

from lowcomm.runtime import SUMMARY_KEYS, RunRecorder, TrainConfig, read_jsonl, train
from lowcomm.runtime.cli import build_parser, config_from_args, format_comparison

TINY = dict(model_dim=16, layers=2, heads=2, seq_len=16, batch_size=2, eval_batches=2, threads=1, warmup=2)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _cfg(tmp_path, corpus_dir, **kw):
    return TrainConfig.from_flat(corpus=corpus_dir, run_dir=str(tmp_path / "run"), **{**TINY, **kw})


def test_diloco_run_writes_complete_records(tmp_path, corpus_dir):
    cfg = _cfg(
        tmp_path,
        corpus_dir,
        replicas=2,
        steps=12,
        sync_every=4,
        fragments=2,
        overlap=1,
        codec="e3m0",
        eval_every=6,
        lr=1e-2,
    )
    s = train(cfg, progress=False)
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(summary) and summary == json.loads(json.dumps(s))
    assert summary["tokens"] == 12 * 2 * 2 * 16 and summary["codec"] == "e3m0"
    assert summary["final_eval_loss"] < 0.9 * 5.545  # ln(256) at init: it learned something
    config = json.loads((run / "config.json").read_text())
    assert config["fragments"] == 2 and len(config["corpus_sha256"]) == 64
    events = read_jsonl(run / "events.jsonl")
    rounds = [e for e in events if e["kind"] == "round" and e["replica"] == 0]
    # fragment 0 sends at 4, 8, 12 (the last applied early at the end); fragment 1 at 6, 10, and once
    # more in the final sync
    regular = [(r["fragment"], r["send_step"]) for r in rounds if not r["final"]]
    assert regular == [(0, 4), (1, 6), (0, 8), (1, 10), (0, 12)]
    assert [(r["fragment"], r["send_step"]) for r in rounds if r["final"]] == [(1, 12)]
    assert all(r["bytes_sent"] > 0 and r["encode_s"] >= 0 for r in rounds)
    assert sum(r["bytes_sent"] for e in [rounds] for r in e) == summary["bytes_sent_per_replica"]
    assert len([e for e in events if e["kind"] == "step"]) == 12
    evals = read_jsonl(run / "eval.jsonl")
    assert [e["step"] for e in evals] == [6, 12]


def test_dp_and_diloco_compare_on_equal_tokens(tmp_path, corpus_dir):
    dp = train(_cfg(tmp_path / "dp", corpus_dir, mode="dp", replicas=2, steps=8), progress=False)
    dl = train(_cfg(tmp_path / "dl", corpus_dir, replicas=2, steps=8, sync_every=4), progress=False)
    assert dp["tokens"] == dl["tokens"]
    # DP: 2·(M−1)/M·n·4 bytes each step; DiLoCo fp32: the same per round, 2 rounds
    per_round = 2 * (2 - 1) / 2 * dp["params"] * 4
    assert dp["bytes_sent_per_replica"] == pytest.approx(8 * per_round, rel=1e-3)
    assert dl["bytes_sent_per_replica"] == pytest.approx(2 * per_round, rel=1e-3)
    assert "vs DP" in format_comparison({"dp": dp, "diloco": dl})


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(fragments=4, layers=2), "fragments=4"),
        (dict(sync_every=8, fragments=2, overlap=4), "overlap"),
        (dict(alpha=2.0), "alpha"),
        (dict(codec="fp2"), "codec='fp2'"),
        (dict(sync_every=0), "sync_every=0"),
        (dict(mode="ddp"), "mode"),
        (dict(heads=3), "heads"),
        (dict(checkpoint_every=-1), "checkpoint_every=-1 is not allowed: an int >= 0"),
        (dict(max_retries=-1), "max_retries=-1 is not allowed: an int >= 0"),
        (dict(max_retries=2.5), "max_retries=2.5 is not allowed: an int >= 0"),
        (dict(coordinator_timeout=0), "coordinator_timeout=0 is not allowed: a number of seconds > 0"),
        (dict(coordinator="tcp://h:99999"), r"coordinator='tcp://h:99999' .* PORT 1-65535\)"),
        (dict(coordinator="tcp://h"), "coordinator='tcp://h' is not allowed: an endpoint like"),
        (
            dict(device="cuda:x"),
            r"device='cuda:x' is not allowed: one of \['cpu', 'cuda', 'auto'\] or 'cuda:N'",
        ),
    ],
)
def test_bad_config_values_are_named_before_training(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_flat(**{**TINY, **kw})


def test_missing_corpus_fails_before_any_record_is_written(tmp_path):
    cfg = TrainConfig.from_flat(corpus=str(tmp_path / "nope"), run_dir=str(tmp_path / "run"), **TINY)
    with pytest.raises(FileNotFoundError, match="nope"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_unknown_config_key_is_refused():
    with pytest.raises(ValueError, match="unknown config key 'sync_evry'"):
        TrainConfig.from_dict({"sync_evry": 3})


def test_config_file_and_flags_merge(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('replicas = 3\ncodec = "int8"\nsync-every = 20\n')
    args = build_parser().parse_args(["train", "--config", str(f), "--codec", "e3m0", "--no-final-sync"])
    cfg = config_from_args(args)
    assert (cfg.run.replicas, cfg.diloco.codec, cfg.diloco.sync_every, cfg.run.final_sync) == (
        3,
        "e3m0",
        20,
        False,
    )


def test_recorder_writes_atomically_and_requires_summary_keys(tmp_path):
    with RunRecorder(tmp_path / "r", {"a": 1}) as rec:
        rec.event("x", v=1)
        with pytest.raises(ValueError, match="lacks required keys"):
            rec.summary({"mode": "dp"})
    assert not [p for p in os.listdir(tmp_path / "r") if ".tmp" in p]
    assert read_jsonl(tmp_path / "r" / "events.jsonl")[0]["v"] == 1


def test_a_recorder_replaces_old_records_only_once_its_run_begins(tmp_path):
    """Replacing a run (--overwrite), the old records stay until begin(): a run refused before (an
    elastic worker the coordinator turned away) leaves them byte for byte; one that begins
    replaces them and writes the lines it held."""
    folder = tmp_path / "r"
    with RunRecorder(folder, {"run": 1}) as rec:
        rec.begin()
        rec.event("x", v=1)
        rec.eval(step=1, loss=2.0)
    (folder / "summary.json").write_text('{"old": true}\n')
    old = {p.name: p.read_bytes() for p in folder.iterdir()}
    with RunRecorder(folder, {"run": 2}) as rec:  # refused before it began
        rec.event("registering", v=2)
        rec.eval(step=0, loss=9.0)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == old
    sent = []  # a metrics sink's scalars are held with the lines

    class Sink:
        def scalars(self, step, values):
            sent.append((step, values))

        def close(self):
            sent.append("closed")

    rec = RunRecorder(folder, {"run": 3}, sink=Sink())
    rec.event("registering", v=3)
    rec.event("step", step=1, loss=4.0)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == old and sent == []  # not yet
    rec.begin()
    assert sent == [(1, {"train/loss": 4.0})]
    rec.eval(step=5, loss=1.5)
    rec.close()
    rec.event("after close", v=4)  # dropped, as before
    assert sent == [(1, {"train/loss": 4.0}), (5, {"eval/loss": 1.5}), "closed"]
    assert json.loads((folder / "config.json").read_text()) == {"run": 3}
    assert not (folder / "summary.json").exists()
    assert [e["kind"] for e in read_jsonl(folder / "events.jsonl")] == ["registering", "step", "eval"]
    assert read_jsonl(folder / "eval.jsonl") == [{"step": 5, "loss": 1.5}]
    # continuing (append), the records stay and only the summary goes once the run begins
    (folder / "summary.json").write_text('{"so far": true}\n')
    with RunRecorder(folder, {"run": 4}, append=True) as rec:
        rec.event("resumed")
        assert (folder / "summary.json").exists()
        rec.begin()
    assert not (folder / "summary.json").exists()
    assert json.loads((folder / "config.json").read_text()) == {"run": 3}
    assert [e["kind"] for e in read_jsonl(folder / "events.jsonl")] == [
        "registering",
        "step",
        "eval",
        "resumed",
    ]


def test_demo_runs_three_runs_on_equal_tokens_and_prints_their_table(tmp_path, capsys):
    from lowcomm.runtime.cli import main

    # one torch thread: the demo's two spin against the suite's other worker (7x slower here)
    assert (
        main(
            ["demo", "--steps", "24", "--replicas", "2", "--threads", "1", "--out", str(tmp_path), "--quiet"]
        )
        == 0
    )
    table = capsys.readouterr().out
    summaries = {
        n: json.loads((tmp_path / n / "summary.json").read_text()) for n in ("dp", "diloco", "streaming")
    }
    assert len({s["tokens"] for s in summaries.values()}) == 1  # equal tokens
    assert [s["mode"] for s in summaries.values()] == ["dp", "diloco", "diloco"]
    assert summaries["streaming"]["codec"] == "e3m0" and summaries["streaming"]["fragments"] == 4
    sent = [summaries[n]["bytes_sent_per_replica"] for n in ("dp", "diloco", "streaming")]
    assert sent[0] > sent[1] > sent[2] > 0  # DP every step > DiLoCo fp32 > Streaming 4-bit fragments
    for name, s in summaries.items():  # every run learned something (ln 256 = 5.55 at init)
        assert s["final_eval_loss"] < 5.0, name
        assert f"{s['final_eval_loss']:.4f}" in table and name in table
    plot = tmp_path / "loss.png"  # the runs side by side: loss and bytes sent by step
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plot in {plot.resolve()}" in table


def test_demo_replaces_only_its_own_runs(tmp_path, capsys, monkeypatch):
    """`lowcomm demo --out runs` replaced a run of the user's at runs/dp; a folder the demo did
    not write (no demo.json) is refused, nothing replaced; its own folder it takes again."""
    from lowcomm.runtime import cli

    ran = []
    monkeypatch.setattr("lowcomm.runtime.trainer.train", lambda cfg, progress: ran.append(cfg) or 1 / 0)
    mine = tmp_path / "runs" / "dp"
    mine.mkdir(parents=True)
    (mine / "summary.json").write_text("{}")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "loss.png").write_bytes(b"mine")
    for out, held in ((tmp_path / "runs", "dp"), (tmp_path / "plots", "loss.png")):
        assert cli.main(["demo", "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"lowcomm: error: out='{out}' is not allowed: a folder of lowcomm demo's or a new one: it "
            f"holds {held}, which no demo wrote (no demo.json); nothing was replaced"
        ]
        assert not (out / "demo.json").exists()
    assert (mine / "summary.json").read_text() == "{}" and not ran
    # a run of other settings in the demo's place is not the demo's either
    other = tmp_path / "other"
    for name, cfg in cli.demo_configs(out=str(other)).items():
        (other / name).mkdir(parents=True)
        flat = cfg.flat() if name != "streaming" else cfg.replace(codec="int8").flat()
        (other / name / "config.json").write_text(json.dumps(flat))
    assert cli.main(["demo", "--out", str(other), "--quiet"]) == 2
    assert "it holds dp, diloco, streaming, which no demo wrote" in capsys.readouterr().err
    # an empty run folder is no record; a folder with demo.json is the demo's, and so is one whose
    # runs have the demo's settings (an earlier lowcomm's demo wrote no demo.json): it starts there
    (tmp_path / "empty" / "dp").mkdir(parents=True)
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "demo.json").write_text("{}")
    (tmp_path / "own" / "loss.png").write_bytes(b"an earlier demo's")
    older = tmp_path / "older"
    for name, cfg in cli.demo_configs(steps=100, replicas=2, out=str(older)).items():
        (older / name).mkdir(parents=True)
        (older / name / "config.json").write_text(json.dumps(cfg.flat()))
    (older / "loss.png").write_bytes(b"an earlier demo's")
    for out in ("empty", "own", "older"):
        with pytest.raises(ZeroDivisionError):  # the stand-in for its first run
            cli.main(["demo", "--out", str(tmp_path / out), "--quiet"])
        assert json.loads((tmp_path / out / "demo.json").read_text())["runs"] == ["dp", "diloco", "streaming"]
    assert len(ran) == 3


def test_cli_train_runs_and_rejects_bad_values(tmp_path, corpus_dir):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, "-m", "lowcomm", "train", "--corpus", corpus_dir, "--quiet"]
    tiny = TINY_FLAGS
    ok = subprocess.run(
        base
        + tiny
        + ["--replicas", "2", "--steps", "6", "--sync-every", "3", "--run-dir", str(tmp_path / "cli")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "cli" / "summary.json").exists() and "eval loss" in ok.stdout
    bad = subprocess.run(base + ["--alpha", "1.5"], capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "alpha=1.5 is not allowed" in bad.stderr


def test_flags_the_run_does_not_use_are_named(tmp_path, corpus_dir, caplog, capsys):
    """--mode dp --codec int4 ran a fp32 DP run without a word (its config.json showing int4);
    a config file's [diloco] values, which a DP baseline shares with its DiLoCo runs, pass quietly.
    An elastic worker's flags without --coordinator are named too (--checkpoint-every serves any run)."""
    from lowcomm.runtime.cli import main

    base = ["train", "--corpus", corpus_dir, "--quiet", *TINY_FLAGS, "--steps", "2", "--mode", "dp"]
    with caplog.at_level("WARNING", logger="lowcomm"):
        assert main([*base, "--codec", "int4", "--fragments", "2", "--run-dir", str(tmp_path / "a")]) == 0
    assert "--fragments, --codec: DiLoCo's settings, not used by --mode dp" in caplog.text
    caplog.clear()
    (tmp_path / "c.toml").write_text('[diloco]\ncodec = "int4"\n')
    with caplog.at_level("WARNING", logger="lowcomm"):
        assert main([*base, "--config", str(tmp_path / "c.toml"), "--run-dir", str(tmp_path / "b")]) == 0
    assert "not used by --mode dp" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lowcomm"):  # an elastic worker's flags, no coordinator
        argv = [*base, "--max-retries", "3", "--heartbeat", "1", "--checkpoint-every", "1"]
        assert main([*argv, "--run-dir", str(tmp_path / "d")]) == 0
    assert (
        "--heartbeat, --max-retries: an elastic worker's settings, not used without --coordinator"
        in caplog.text
    )


def test_replicas_that_a_launched_job_or_a_worker_does_not_use_are_named(monkeypatch, caplog):
    """`lowcomm launch --replicas 2 -- lowcomm train --replicas 4` trained 2 replicas without a
    word (the count is the launcher's); an elastic worker is one replica whatever --replicas says."""
    from lowcomm.runtime.cli import _warn_unused_flags

    def warned(argv, env) -> str:
        for k in ("WORLD_SIZE", "RANK", "LOWCOMM_PROCS_PER_REPLICA"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        args = build_parser().parse_args(["train", *argv])
        caplog.clear()
        with caplog.at_level("WARNING", logger="lowcomm"):
            _warn_unused_flags(args, config_from_args(args))
        return caplog.text

    said = warned(["--replicas", "4"], {"WORLD_SIZE": "2"})
    assert "--replicas 4 not used: the job has 2 (2 processes, 1 a replica)" in said
    said = warned(["--replicas", "4"], {"WORLD_SIZE": "4", "LOWCOMM_PROCS_PER_REPLICA": "2"})
    assert "--replicas 4 not used: the job has 2 (4 processes, 2 a replica)" in said
    assert "not used" not in warned(["--replicas", "2"], {"WORLD_SIZE": "2"})
    assert "not used" not in warned([], {"WORLD_SIZE": "2"})  # (the default, not given)
    assert "not used" not in warned(["--replicas", "4"], {})  # (one process simulates them)
    said = warned(["--replicas", "4", "--coordinator", "tcp://127.0.0.1:9"], {})
    assert "--replicas 4 not used: an elastic worker is one replica of its job" in said


def test_the_launchers_procs_per_replica_is_the_jobs(monkeypatch):
    """`lowcomm launch --replicas 2 --procs-per-replica 2 -- lowcomm train` ran 4 replicas of one
    process each: the trainer passed its own procs_per_replica (1, the default) over the
    launcher's LOWCOMM_PROCS_PER_REPLICA, which RunConfig says wins."""
    import lowcomm.runtime.trainer.loop as loop

    seen = []

    def topology(k, **kw):
        seen.append(k)
        raise RuntimeError("no job here")

    monkeypatch.setattr(loop, "init_from_torchrun", topology)
    monkeypatch.setattr(loop, "is_distributed_env", lambda: True)
    monkeypatch.setenv("LOWCOMM_PROCS_PER_REPLICA", "2")
    with pytest.raises(RuntimeError, match="no job here"):
        loop.Trainer(TrainConfig.from_flat(), progress=False)._static_topology()
    assert seen == [2]
    monkeypatch.delenv("LOWCOMM_PROCS_PER_REPLICA")  # (torchrun sets none: the flag's)
    assert TrainConfig.from_flat(procs_per_replica=4).run.job_procs_per_replica() == 4


def test_config_sections_and_flat_keys_load_alike(tmp_path):
    from lowcomm.runtime import load_config_file

    f = tmp_path / "c.toml"
    f.write_text('[run]\nreplicas = 3\n[diloco]\ncodec = "int8"\nsync-every = 20\n[model]\ndim = 32\n')
    flat = TrainConfig.from_flat(replicas=3, codec="int8", sync_every=20, model_dim=32)
    assert TrainConfig.from_dict(load_config_file(f)) == flat
    assert TrainConfig.from_dict(flat.flat()) == flat  # config.json's flat form loads back
    assert (flat.run.replicas, flat.diloco.codec, flat.model.dim) == (3, "int8", 32)
    with pytest.raises(ValueError, match=r"unknown key 'colour' in section \[model\]"):
        TrainConfig.from_dict({"model": {"colour": "red"}})
    with pytest.raises(ValueError, match=r"unknown config section \[runn\]; allowed: \['\[run\]', "):
        TrainConfig.from_dict({"runn": {"steps": 10}})
    # a [train] table (a job file's) is unwrapped, its sections inside it
    f.write_text(
        '[train]\nreplicas = 3\nsync_every = 20\n[train.diloco]\ncodec = "int8"\n[train.model]\ndim = 32\n'
    )
    assert TrainConfig.from_dict(load_config_file(f)) == flat


def test_a_config_file_is_checked_with_the_flags_that_override_it(tmp_path):
    """A file with heads = 3 under the flags --model-dim 24 --heads 2 was refused, naming
    model_dim=128 (the default): the file was checked alone before the flags were applied."""
    from lowcomm.runtime.cli import train_config_from_flags

    f = tmp_path / "c.toml"
    f.write_text("[model]\nheads = 3\nlayers = 3\n[diloco]\nfragments = 4\n")
    cfg = train_config_from_flags(["--config", str(f), "--model-dim", "24", "--heads", "2"])
    assert (cfg.model.dim, cfg.model.heads, cfg.model.layers, cfg.diloco.fragments) == (24, 2, 3, 4)
    # and a file that is valid alone, made invalid by a flag (fragments = 4 needs layers >= 3)
    with pytest.raises(ValueError, match=r"^fragments=4 is not allowed: at most layers \+ 1 = 3"):
        train_config_from_flags(["--config", str(f), "--heads", "2", "--layers", "2"])
    with pytest.raises(ValueError, match=r"^heads=3 is not allowed: a divisor of model_dim=32"):
        train_config_from_flags(["--config", str(f), "--model-dim", "32"])
    f.write_text("corpus = 5\n")  # a value a flag replaces is not the run's: the flag's is checked
    assert train_config_from_flags(["--config", str(f), "--corpus", "stdlib"]).data.corpus == "stdlib"
    with pytest.raises(ValueError, match=r"^corpus=5 is not allowed"):
        train_config_from_flags(["--config", str(f)])
    f.write_text("heads_count = 2\n")  # an unknown key of the file is named, with flags or without
    with pytest.raises(ValueError, match=r"^unknown config key 'heads_count'"):
        train_config_from_flags(["--config", str(f), "--heads", "2"])


def test_config_files_that_would_lose_or_garble_a_key_are_refused_naming_it(tmp_path):
    """Each of these was read, losing a value without a word: a section beside [train] (its
    sync_every=0 never checked), a JSON key given twice (the last kept); bytes that are not UTF-8
    raised a UnicodeDecodeError that named no file."""
    from lowcomm.runtime import load_config_file

    cases = {
        "beside.toml": (
            b"[train]\nsteps = 2\n[diloco]\nsync_every = 0\n",
            r"beside.toml' holds \['\[diloco\]'\] beside its \[train\] table, which would be ignored",
        ),
        "extra.json": (b'{"train": {"steps": 2}, "seed": 3}', r"holds \['seed'\] beside its \[train\] table"),
        "twice.json": (
            b'{"steps": 2, "steps": 3}',
            r"twice.json' is not valid JSON: key 'steps' is given twice",
        ),
        "latin1.toml": (
            b'corpus = "caf\xe9"\n',
            r"latin1.toml' is not valid TOML: not UTF-8 text \(byte 13\)",
        ),
    }
    for name, (content, match) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=match):
            load_config_file(tmp_path / name)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"error_feedback": "yes"}, "error_feedback='yes' is not allowed: true or false"),
        ({"final_sync": "false"}, "final_sync='false' is not allowed: true or false"),
        ({"corpus": 5}, "corpus=5 is not allowed"),
        ({"run_dir": 5}, "run_dir=5 is not allowed"),
        ({"outer_device": "tpu"}, "outer_device='tpu' is not allowed"),
        ({"model_dim": 0}, "model_dim=0 is not allowed"),
        ({"coordinator": "tcp://h:1", "mode": "dp"}, "mode='dp' is not allowed: 'diloco' in an elastic job"),
        ({"coordinator": "tcp://h:1", "reduce": "all_gather"}, "reduce='all_gather' is not allowed"),
        # checked at start-up, not when the coordinator first refuses a message naming its field
        ({"worker_id": "a b"}, "worker_id='a b' is not allowed: printable ASCII without spaces"),
        ({"advertise_addr": "not an ip!"}, "advertise_addr='not an ip!' is not allowed: an IP address"),
        ({"coordinator": "tcp://a host:1"}, "coordinator='tcp://a host:1' is not allowed"),
        # a TOML number for a rate or a duration: the unit is what is missing (it read "a non-empty
        # string")
        ({"link_bandwidth": 100}, r"link_bandwidth=100 is not allowed: a rate with its unit, e.g. '100Mbit'"),
        ({"link_latency": 0.02}, r"link_latency=0.02 is not allowed: a duration with its unit, e.g. '20ms'"),
        ({"link_bandwidth": "-5Mbit"}, r"link bandwidth '-5Mbit' is not understood; write e.g. '100Mbit'"),
    ],
)
def test_config_values_of_the_wrong_type_are_refused_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_flat(**kw)


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_bad_input_ends_in_one_line_and_exit_code_2_and_leaves_records_untouched(
    tmp_path, corpus_dir, capsys
):
    """Each refusal before any step: one line on stderr naming the value, rc 2, and the files of an
    earlier run in the run directory byte for byte as they were."""
    from lowcomm.runtime.cli import main

    run = tmp_path / "run"
    base = ["train", "--corpus", corpus_dir, "--quiet", "--steps", "2", *TINY_FLAGS]
    assert main([*base, "--run-dir", str(run)]) == 0
    before = _snapshot(run)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "cfgdir").mkdir()
    bad_toml = tmp_path / "bad.toml"
    cases = {
        "already holds files": [*base, "--run-dir", str(run)],
        "is a file, not a folder": [*base, "--run-dir", str(tmp_path / "afile" / "run")],
        "is a directory": [*base, "--config", str(tmp_path / "cfgdir"), "--run-dir", str(tmp_path / "n1")],
        "the folder holds no checkpoint.lcs": [
            *base, "--coordinator", "tcp://127.0.0.1:1", "--resume", str(tmp_path / "cfgdir"),
            "--run-dir", str(run),
        ],
        "need at least": [*base, "--seq-len", "100000000", "--run-dir", str(tmp_path / "n2")],
        "batch_size=1000000000": [*base, "--batch-size", "1000000000", "--run-dir", str(tmp_path / "n3")],
        "outer_device='cuda:99'": [*base, "--outer-device", "cuda:99", "--run-dir", str(tmp_path / "n4")],
        # numpy's MemoryError traceback; 1e20 its 'Maximum allowed size exceeded'
        "eval_batches=1000000000 validation batches": [
            *base, "--eval-batches", "1000000000", "--run-dir", str(tmp_path / "n5"),
        ],
        # torch made 5,000 threads; 2**63 ended in 'Overflow when unpacking long long'
        "threads=5000 is not allowed: 0 (torch's default) to": [
            *base, "--threads", "5000", "--run-dir", str(tmp_path / "n6"),
        ],
        "seed=4294967296 is not allowed: an int in [0, 4294967295]": [  # the samplers' int64 overflowed
            *base, "--seed", str(2**32), "--run-dir", str(tmp_path / "n7"),
        ],
    }  # fmt: skip
    for toml, match in (
        # (not a file's corpus or run_dir: the flags' win)
        ("warmup = -1\n", "warmup=-1 is not allowed"),
        ("log_every = 0\n", "log_every=0 is not allowed"),
        ('outer_device = "tpu"\n', "outer_device='tpu' is not allowed"),
        ('error_feedback = "yes"\n', "error_feedback='yes' is not allowed: true or false"),
        ('[diloco]\ncodec = "fp7"\n', "codec='fp7' is not allowed"),
        ("replicas = \n", "is not valid TOML"),
    ):
        path = tmp_path / f"c{len(cases)}.toml"
        path.write_text(toml)
        cases[match] = [*base, "--config", str(path), "--run-dir", str(run)]
    bad_toml.write_text("x = 1\n")
    cases["unknown config key 'x'"] = [*base, "--config", str(bad_toml), "--run-dir", str(run)]
    for match, argv in cases.items():
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (match, err)
        assert len(err) == 1 and match in err[0] and err[0].startswith("lowcomm: error:"), (match, err)
        assert _snapshot(run) == before, match  # nothing of the earlier run changed
    assert not any((tmp_path / f"n{i}").exists() for i in range(1, 8))
    # --overwrite in a folder whose record-named files are no run's (a project's config.json,
    # --run-dir .): they were written over
    proj = tmp_path / "proj"
    proj.mkdir()
    for name, text in (("config.json", '{"my": "settings"}'), ("events.jsonl", "not json\n")):
        (proj / name).write_text(text)
        assert main([*base, "--run-dir", str(proj), "--overwrite"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"lowcomm: error: run_dir='{proj}' holds {name}, which no lowcomm run wrote; nothing was "
            "changed: give the run a folder of its own"
        ]
        assert (proj / name).read_text() == text
        (proj / name).unlink()
    with pytest.raises(SystemExit):
        main(["--log-level", "BOGUS", "keys"])
    assert "invalid choice: 'BOGUS'" in capsys.readouterr().err
    # the level also after the command, where users put it (`lowcomm train ... --log-level INFO`
    # was refused as an unrecognized argument); there it wins
    from lowcomm.runtime.cli import build_parser

    parse = build_parser(train_flags=False).parse_args
    assert parse(["keys"]).log_level == "WARNING"
    assert parse(["--log-level", "error", "keys"]).log_level == "ERROR"
    assert parse(["keys", "--log-level", "info"]).log_level == "INFO"
    assert parse(["--log-level", "error", "status", "tcp://h:1", "--log-level", "debug"]).log_level == "DEBUG"
    assert parse(["scaling", "fit", "runs", "--log-level", "info"]).log_level == "INFO"
    with pytest.raises(SystemExit):
        main(["keys", "--log-level", "BOGUS"])
    assert "invalid choice: 'BOGUS'" in capsys.readouterr().err
    assert main([*base, "--run-dir", str(run), "--overwrite"]) == 0  # asked for: replaced
    assert json.loads((run / "summary.json").read_text())["steps"] == 2


def test_a_launchers_variables_that_make_no_job_are_refused_by_name(
    tmp_path, corpus_dir, capsys, monkeypatch
):
    """WORLD_SIZE=abc ended in "invalid literal for int()" naming no variable; RANK=5 of 2 waited
    for a rendezvous it has no place in, until killed."""
    from lowcomm.runtime.cli import main

    base = ["train", "--corpus", corpus_dir, "--quiet", "--steps", "2", *TINY_FLAGS]
    cases = [
        (dict(WORLD_SIZE="abc", RANK="0"), "environment variable WORLD_SIZE='abc' is not an integer"),
        (dict(WORLD_SIZE="2", RANK="x"), "environment variable RANK='x' is not an integer"),
        (
            dict(WORLD_SIZE="2", RANK="5", MASTER_ADDR="127.0.0.1", MASTER_PORT="1"),
            "environment variables RANK=5 and WORLD_SIZE=2 are not allowed: 0 <= RANK < WORLD_SIZE",
        ),
    ]
    for i, (env, match) in enumerate(cases):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert main([*base, "--run-dir", str(tmp_path / f"r{i}")]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"lowcomm: error: {match}"]
        assert not (tmp_path / f"r{i}").exists()


def test_a_run_directory_in_use_by_another_run_is_refused_and_left_as_it_was(tmp_path, corpus_dir, capsys):
    """The same command started twice (--overwrite or --resume, or both into an empty folder): the
    second run wrote its records and checkpoints between the first's. A run holds its directory
    (flock) from its records' start to its summary; another is refused in one line, exit code 2,
    the folder untouched. (The lock here is taken through another open file, as another process's
    would be: flock locks conflict between open files, in one process too.)"""
    from lowcomm.runtime.cli import main
    from lowcomm.runtime.files import hold_folder

    run = tmp_path / "run"
    argv = ["train", "--corpus", corpus_dir, "--quiet", "--steps", "2", *TINY_FLAGS, "--run-dir", str(run)]
    assert main(argv) == 0
    before = _snapshot(run)
    held = hold_folder("run_dir", run)  # a run under way there
    try:
        for extra in (["--overwrite"], ["--resume", "auto", "--steps", "4"]):
            assert main([*argv, *extra]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"run_dir='{run}' is in use: another process is running there" in err[0]
            assert _snapshot(run) == before
        with pytest.raises(ValueError, match="is in use"):
            hold_folder("run_dir", run)
    finally:
        os.close(held)
    assert main([*argv, "--overwrite"]) == 0  # once it has ended
    os.close(hold_folder("run_dir", run))  # and the run let go of it


def test_run_directories_and_records_are_owner_only(tmp_path, corpus_dir):
    cfg = TrainConfig.from_flat(corpus=corpus_dir, run_dir=str(tmp_path / "priv"), steps=2, **TINY)
    train(cfg, progress=False)
    assert (tmp_path / "priv").stat().st_mode & 0o777 == 0o700
    for name in ("config.json", "events.jsonl", "eval.jsonl", "summary.json"):
        assert (tmp_path / "priv" / name).stat().st_mode & 0o777 == 0o600, name


def _flags(parser, path):
    """(command, action, parser) for every argument of every subcommand."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _flags(sub, [*path, name])
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield " ".join(path), action, parser


def test_every_flag_of_every_subcommand_has_a_help_line_and_shows_its_choices():
    from lowcomm.runtime.cli import build_parser

    seen = 0
    for command, action, parser in _flags(build_parser(), ["lowcomm"]):
        seen += 1
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{command} {name} has no help line"
        if action.choices:
            shown = parser.format_help()
            missing = [c for c in action.choices if str(c) not in shown]
            assert not missing, f"{command} {name}: choices {missing} not shown in --help"
    assert seen > 80  # every subcommand was walked (train alone has ~50 flags)


def test_an_output_folder_under_a_file_is_refused_in_one_line_by_every_command(tmp_path, capsys):
    """scaling fit/report/sweep and chaos write into --out: a file in its way is named in one line
    (exit code 2) before any work, as train does for --run-dir (they raised a traceback)."""
    from lowcomm.runtime.cli import main

    afile = tmp_path / "afile"
    afile.write_text("keep me")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")
    plan = tmp_path / "plan.json"
    plan.write_text('{"seed": 0, "faults": []}')
    cases = [
        ["scaling", "fit", str(tmp_path / "run"), "--out", str(afile)],
        ["scaling", "report", str(tmp_path / "run"), "--out", str(afile / "report")],
        ["scaling", "sweep", "--out", str(afile), "--sizes", "d16l2", "--replicas", "1"],
        ["chaos", "--out", str(afile / "c"), "--plan", str(plan)],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"out='{afile}" in err[0], (argv, err)
        assert f"'{afile}' is a file, not a folder" in err[0], err
    assert afile.read_text() == "keep me"
    assert main(["scaling", "fit", str(tmp_path / "run"), "--bootstrap", "-5"]) == 2
    assert "bootstrap=-5 is not allowed: an int in [0, 10000]" in capsys.readouterr().err
    assert main(["scaling", "fit", str(tmp_path / "run"), "--bootstrap", str(10**20)]) == 2  # ran for ever
    assert f"bootstrap={10**20} is not allowed: an int in [0, 10000] (0: no" in capsys.readouterr().err


def test_launch_refuses_bad_counts_ports_and_commands_before_starting_anything(capsys, monkeypatch):
    from lowcomm.runtime.cli import main
    from lowcomm.runtime.trainer.launch import launch

    cases = [
        (dict(command=["true"], replicas=0), "replicas=0 is not allowed: an int >= 1"),
        (dict(command=["true"], replicas=True), "replicas=True is not allowed: an int >= 1"),
        (dict(command=["true"], replicas=2, procs_per_replica=0), "procs_per_replica=0 is not allowed"),
        # started processes until it was killed
        (
            dict(command=["true"], replicas=10**20),
            r"replicas=10+ is not allowed: at most 1024 processes on one machine;",
        ),
        (
            dict(command=["true"], replicas=512, procs_per_replica=3),
            r"replicas=512 is not allowed: at most 341 with procs_per_replica=3 \(1024 processes on one",
        ),
        (dict(command=[], replicas=2), "launch needs a command after '--'"),
        (dict(command=["true"], replicas=2, port=99999), r"port=99999 is not allowed: a TCP port, 1-65535"),
        (dict(command=["true"], replicas=2, port=-5), "port=-5 is not allowed"),
        # torchrun's habit (a subcommand, not a program): the error was "[Errno 2] ... 'train'"
        (
            dict(command=["train", "--steps", "2"], replicas=2),
            "command 'train' was not found: give a program",
        ),
        (dict(command=["./no/such/script"], replicas=1), "command './no/such/script' was not found"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            launch(**kw)
    assert main(["launch", "--port", "70000", "--replicas", "2", "--", "true"]) == 2
    assert "lowcomm: error: port=70000 is not allowed" in capsys.readouterr().err
    # a port another socket listens on: rank 0's store failed in an EADDRINUSE traceback
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        with pytest.raises(ValueError, match=rf"^port={port} is not allowed: a free TCP port, or 0 for one"):
            launch(["true"], 2, port=port)
        # torchrun's job (no launch to check it first): one line naming the rendezvous
        from lowcomm.comm import CollectiveError
        from lowcomm.runtime.trainer.topology import init_from_torchrun

        env = dict(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            with pytest.raises(
                CollectiveError, match=rf"^the job's rendezvous at 127.0.0.1:{port} failed: .*in use"
            ):
                init_from_torchrun(timeout_s=10)
    assert launch(["true"], 2, port=0) == 0  # 0: a free port, as when none is given
    with pytest.raises(ValueError, match=r"max_restarts=-1 is not allowed: an int >= 0"):
        launch(["true"], 2, max_restarts=-1)
    # one of the tasks of an srun step (srun -n 2 lowcomm launch): each would start a job alone
    task = dict(SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="1", SLURM_NODEID="0", SLURM_LOCALID="1")
    task.update(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="localhost")
    with monkeypatch.context() as m:
        for k in ("RANK", "WORLD_SIZE"):
            m.delenv(k, raising=False)
        for k, v in task.items():
            m.setenv(k, v)
        with pytest.raises(ValueError, match=r"^lowcomm launch runs a job on one machine, and this is one"):
            launch(["true"], 2)
        m.setenv("SLURM_PTY_PORT", "40123")  # the shell of srun --pty: one process, launching
        assert launch(["true"], 2) == 0


def test_launch_that_cannot_start_a_rank_stops_the_ones_it_started(monkeypatch, caplog):
    """A process the system will not start (its process or memory limit: --replicas 100000 met
    it after a few thousand) fails the attempt in one line, and the ranks started before it, which
    would wait for it, are stopped (they were left running, and a traceback ended the launcher)."""
    import importlib
    import subprocess

    launcher = importlib.import_module(
        "lowcomm.runtime.trainer.launch"
    )  # (the package's launch is the function)
    started, real = [], subprocess.Popen

    def popen(command, env):
        if len(started) == 2:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        started.append(real([sys.executable, "-c", "import time; time.sleep(60)"], env=env))
        return started[-1]

    monkeypatch.setattr(launcher.subprocess, "Popen", popen)
    try:
        with caplog.at_level("ERROR", logger=launcher.__name__):
            assert launcher.launch(["true"], 4, grace_s=10) == 1
        assert "could not start rank 2 of 4 ([Errno 11] Resource temporarily unavailable)" in caplog.text
        assert [p.returncode for p in started] == [-15, -15]  # stopped (SIGTERM), not left waiting
    finally:
        for p in started:
            p.kill()
            p.wait()


def test_launch_restarts_a_failed_job_but_not_a_refusal(tmp_path):
    """--max-restarts N starts the whole job again after a failure (TORCHELASTIC_RESTART_COUNT
    counts, as under torchrun), until it succeeds or the restarts are spent; exit code 2 (a
    refusal of the input) is not restarted."""
    from lowcomm.runtime.trainer.launch import launch

    def job(script: str) -> list[str]:
        # each process notes its attempt and waits (10 s at most) until every rank of the attempt
        # has, then exits as told: a rank that failed at once used to get the other stopped before
        # it had noted anything
        path = str(tmp_path / "attempts")
        note = f"n = os.environ['TORCHELASTIC_RESTART_COUNT']; open({path!r}, 'a').write(n + ' ')"
        wait = (
            "t = time.time()\n"
            f"while open({path!r}).read().split().count(n) < int(os.environ['WORLD_SIZE']) "
            "and time.time() - t < 10: time.sleep(0.01)"
        )
        return [sys.executable, "-c", f"import os, sys, time; {note}\n{wait}\n{script}"]

    def attempts() -> list[str]:
        seen = (tmp_path / "attempts").read_text().split()
        (tmp_path / "attempts").unlink()
        return seen

    fails_once = (
        "sys.exit(5 if os.environ['TORCHELASTIC_RESTART_COUNT'] == '0' and os.environ['RANK'] == '1' else 0)"
    )
    assert launch(job(fails_once), 2, max_restarts=3) == 0
    assert sorted(attempts()) == ["0", "0", "1", "1"]  # both processes, twice
    assert launch(job("sys.exit(5)"), 2, max_restarts=1) == 5  # restarts spent: the last code
    assert sorted(attempts()) == ["0", "0", "1", "1"]
    assert launch(job("sys.exit(2)"), 2, max_restarts=3) == 2
    assert attempts() == ["0", "0"]


@pytest.mark.parametrize("start", ["exec", "forkserver"])
def test_launch_log_dir_gives_each_process_its_log_and_shows_a_failed_rank_s_last_lines(
    tmp_path, caplog, capsys, start
):
    """The processes of a launched job all wrote to the launcher's terminal, interleaved (with 8
    processes, unreadable). --log-dir DIR gives each its file, DIR/attempt<N>/rank<R>.log, its
    stdout and stderr in the order written; the launcher shows where, and a failed rank's last
    lines; --tee copies each line to its stdout too, behind the rank. A folder holding an earlier
    job's logs is refused, and left as it was."""
    from lowcomm.runtime.trainer.launch import launch

    script = tmp_path / "job.py"
    script.write_text(
        "import os, sys\n"
        "rank, attempt = os.environ['RANK'], os.environ['TORCHELASTIC_RESTART_COUNT']\n"
        "print(f'out {rank} {attempt}')\n"
        "print(f'err {rank} {attempt}', file=sys.stderr)\n"
        "sys.stderr.write('\\rbar 1/2\\rbar 2/2\\r      \\r')\n"  # (a progress bar's redraws)
        "sys.exit(3 if rank == '1' and attempt == '0' else 0)\n"
    )
    logs = tmp_path / "logs"
    with caplog.at_level("ERROR", logger="lowcomm.runtime.trainer.launch"):
        code = launch([sys.executable, str(script)], 2, max_restarts=1, start=start, log_dir=logs, tee=True)
    assert code == 0
    for attempt in (0, 1):
        for rank in (0, 1):
            text = (logs / f"attempt{attempt}" / f"rank{rank}.log").read_bytes().decode()
            expected = f"out {rank} {attempt}\nerr {rank} {attempt}\n\rbar 1/2\rbar 2/2\r      \r"
            assert text == expected, (attempt, rank, text)
    assert oct((logs / "attempt0" / "rank1.log").stat().st_mode & 0o777) == "0o600"
    shown = f"the last lines of {logs}/attempt0/rank1.log:\nout 1 0\nerr 1 0\n"
    assert "rank 1 exited with code 3" in caplog.text and shown in caplog.text
    out, err = capsys.readouterr()
    assert f"lowcomm launch: the processes' output in {logs}/attempt1/rank<R>.log" in err
    assert err.endswith(f"lowcomm launch: exit code 0; the processes' output in {logs}/attempt1\n")
    assert "out 0" not in err  # (nothing of theirs on stderr: --tee copies to stdout)
    for attempt in (0, 1):
        for rank in (0, 1):
            lines = out.splitlines()  # (one rank's lines in order; the ranks' may interleave)
            mine = [x for x in lines if x.startswith(f"[rank {rank}]: ") and x.endswith(f" {rank} {attempt}")]
            assert mine == [f"[rank {rank}]: out {rank} {attempt}", f"[rank {rank}]: err {rank} {attempt}"], (
                out
            )
    # each redraw of a bar a line of its own, the blank one left out
    assert out.count("[rank 0]: bar 1/2\n[rank 0]: bar 2/2\n") == 2 and "[rank 0]:       \n" not in out
    with pytest.raises(ValueError, match=r"tee=True is not allowed: it copies the logs of a log_dir"):
        launch([sys.executable, str(script)], 2, start=start, tee=True)
    with pytest.raises(
        ValueError, match=r"log_dir=.* is not allowed: it holds an earlier job's logs \(attempt0/\)"
    ):
        launch([sys.executable, str(script)], 2, start=start, log_dir=logs)
    assert (
        logs / "attempt0" / "rank0.log"
    ).read_bytes().decode() == "out 0 0\nerr 0 0\n\rbar 1/2\rbar 2/2\r      \r"
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"log_dir=.* is not allowed: .* is a file, not a folder"):
        launch([sys.executable, str(script)], 2, start=start, log_dir=tmp_path / "file" / "logs")
    with pytest.raises(ValueError, match=r"log_dir='' is not allowed: a folder's path"):
        launch([sys.executable, str(script)], 2, start=start, log_dir="")


def test_launch_forkserver_takes_this_interpreters_python_and_refuses_the_rest_by_name(tmp_path):
    """--start forkserver runs `python [-u] SCRIPT`, `python [-u] -m MODULE` and a console script
    whose #! line names this interpreter; another program, another interpreter (a link to this
    one in another folder: a virtual environment's python is one), a Python option it cannot
    honour, a missing script, an unknown start method and a preload module that is not installed
    or not a name are refused by name before anything starts."""
    from pathlib import Path

    from lowcomm.runtime.forkserver import PythonCommand, python_command
    from lowcomm.runtime.trainer.launch import launch

    script = tmp_path / "s.py"
    script.write_text("pass\n")
    assert python_command([sys.executable, str(script), "a"]) == PythonCommand("path", str(script), ("a",))
    assert python_command([sys.executable, "-u", "-m", "lowcomm", "train"]) == PythonCommand(
        "module", "lowcomm", ("train",), True
    )
    console = Path(sys.executable).parent / "lowcomm"  # (pip's script for the `lowcomm` command)
    assert python_command([str(console), "keys"]) == PythonCommand("path", str(console), ("keys",))
    shell = tmp_path / "sh-script"
    shell.write_text("#!/bin/sh\necho hi\n")
    shell.chmod(0o755)
    other = tmp_path / "python"
    other.symlink_to(sys.executable)
    cases = [
        (["sh", "-c", "true"], "command 'sh' is not this interpreter's Python"),
        ([str(shell)], f"command '{shell}' is not this interpreter's Python"),
        ([str(other), str(script)], f"command '{other}' is not this interpreter's Python"),
        ([sys.executable, "-c", "pass"], "python option '-c' is not supported by --start forkserver"),
        ([sys.executable], "python needs a script or '-m MODULE'"),
        ([sys.executable, "-m"], "'-m' needs a module name"),
        ([sys.executable, str(tmp_path / "no.py")], "script '.*no.py' was not found"),
    ]
    for command, match in cases:
        with pytest.raises(ValueError, match=match):
            launch(command, 1, start="forkserver")
    with pytest.raises(ValueError, match=r"start='spawn' is not allowed: one of \['exec', 'forkserver'\]"):
        launch(["true"], 1, start="spawn")
    py = [sys.executable, str(script)]
    with pytest.raises(ValueError, match=r"preload module 'lightnin.pytorch' is not installed"):
        launch(py, 1, start="forkserver", preload=["lightnin.pytorch"])
    with pytest.raises(ValueError, match=r"preload module 'a b' is not a module name"):
        launch(py, 1, start="forkserver", preload=["a b"])
    with pytest.raises(ValueError, match=r"needs start forkserver \(--start forkserver\)"):
        launch(py, 1, preload=["torch"])


def test_a_forked_rank_runs_its_command_as_the_interpreter_would(tmp_path, monkeypatch):
    """Each rank of `launch(..., start="forkserver")` is forked from a server that imported torch:
    a script runs as __main__ with its arguments, its environment (the rank's variables), the
    launcher's working folder, its own folder first on sys.path and torch already imported; it
    may start processes of its own (a multiprocessing pool); its atexit handlers run; its exit
    code is the job's. `-m MODULE` runs with the working folder first on sys.path. A rank killed
    by a signal fails the job with -9 and the other is stopped."""
    from lowcomm.runtime.trainer.launch import launch

    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "code").mkdir()
    script = tmp_path / "code" / "rank.py"
    script.write_text(
        "import atexit, json, multiprocessing, os, sys\n"
        "torch_before = 'torch' in sys.modules\n"
        "out = sys.argv[1]\n"
        "rank = os.environ['RANK']\n"
        "atexit.register(lambda: open(f'{out}/atexit{rank}', 'w').write('ran'))\n"
        "if __name__ == '__main__':\n"
        "    with multiprocessing.get_context('fork').Pool(1) as pool:\n"
        "        squares = pool.map(abs, [-2])\n"
        "    found = dict(name=__name__, argv=sys.argv, path0=sys.path[0], cwd=os.getcwd(),\n"
        "                 world=os.environ['WORLD_SIZE'], torch=torch_before, pool=squares)\n"
        "    open(f'{out}/rank{rank}.json', 'w').write(json.dumps(found))\n"
        "    sys.exit(int(os.environ.get('EXIT_CODE', '0')))\n"
    )
    monkeypatch.chdir(tmp_path)
    assert launch([sys.executable, str(script), str(out), "x"], 2, start="forkserver") == 0
    for rank in (0, 1):
        found = json.loads((out / f"rank{rank}.json").read_text())
        assert found == {
            "name": "__main__",
            "argv": [str(script), str(out), "x"],
            "path0": str(script.parent),
            "cwd": str(tmp_path),
            "world": "2",
            "torch": True,
            "pool": [2],
        }
        assert (out / f"atexit{rank}").read_text() == "ran"
    monkeypatch.setenv("EXIT_CODE", "3")
    assert launch([sys.executable, str(script), str(out)], 1, start="forkserver") == 3
    monkeypatch.delenv("EXIT_CODE")
    (tmp_path / "mod.py").write_text(
        "import os, sys\nopen(sys.argv[1], 'w').write(__name__ + ' ' + sys.path[0] + ' ' + sys.argv[0])\n"
    )
    assert launch([sys.executable, "-m", "mod", str(out / "m")], 1, start="forkserver") == 0
    assert (out / "m").read_text() == f"__main__ {tmp_path} {tmp_path / 'mod.py'}"
    (tmp_path / "app").mkdir()  # a folder with a __main__.py, as python runs one: itself first on the path
    (tmp_path / "app" / "__main__.py").write_text((tmp_path / "mod.py").read_text())
    assert launch([sys.executable, "app", str(out / "a")], 1, start="forkserver") == 0
    assert (out / "a").read_text() == "__main__ app app"  # (python app: the same)
    killer = tmp_path / "killer.py"
    killer.write_text(
        "import os, signal, time\n"
        "if os.environ['RANK'] == '1':\n    os.kill(os.getpid(), signal.SIGKILL)\ntime.sleep(60)\n"
    )
    t0 = time.monotonic()
    assert launch([sys.executable, str(killer)], 2, start="forkserver", grace_s=1.0) == -9
    assert time.monotonic() - t0 < 30  # (rank 0 stopped, not waited for)


def test_a_preload_module_that_fails_to_import_fails_each_rank_by_name_not_the_server(tmp_path):
    """`lowcomm launch --start forkserver --preload M` where M raises at its import: the server
    imported it among the others and lives; each rank says in one line which module failed and
    why, runs nothing and exits 2 (a refusal: not restarted), instead of the launcher's EOFError
    traceback from a server that died at its start."""
    (tmp_path / "badmod.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "job.py").write_text("open('ran', 'w').write('yes')\n")
    cmd = [sys.executable, "-m", "lowcomm", "launch", "--replicas", "2", "--start", "forkserver"]
    cmd += ["--max-restarts", "2", "--preload", "badmod", "--", sys.executable, "job.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert res.returncode == 2, res.stderr[-3000:]
    said = [line for line in res.stderr.splitlines() if line.startswith("lowcomm: error:")]
    assert said and all(
        line == "lowcomm: error: preload module 'badmod' failed to import in the fork server "
        "(RuntimeError: boom at import); job.py was not run"
        for line in said
    ), res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "restarting" not in res.stderr
    assert not (tmp_path / "ran").exists()
    # the variable that names a server's modules (its starter's pid, its parent, and `python -c`),
    # stray in a process that is no server: ignored (it imports nothing, and the process ends with
    # its own exit code)
    code = "import sys, lowcomm.runtime.forkserver as f; sys.exit(3 + ('torch' in sys.modules))"
    (tmp_path / "code.py").write_text(code)
    for pid, argv in ((1, ["-c", code]), (os.getpid(), [str(tmp_path / "code.py")])):
        env = {**os.environ, "LOWCOMM_FORKSERVER_PRELOAD": f"{pid}:torch"}
        assert subprocess.run([sys.executable, *argv], env=env, timeout=60).returncode == 3, pid


def _launched(tmp_path, body: str, flags=(), **popen):
    """``lowcomm launch --replicas 2 FLAGS`` of a Python ``body`` (after ``import os, signal, sys,
    time``), once both ranks have noted their pids; returns the launcher and the pid files."""
    import subprocess
    import time

    note = f"open({str(tmp_path)!r} + '/pid' + os.environ['RANK'], 'w').write(str(os.getpid()))"
    job = [sys.executable, "-c", f"import os, signal, sys, time\n{note}\n{body}"]
    launcher = subprocess.Popen(
        [sys.executable, "-m", "lowcomm", "launch", "--replicas", "2", *flags, "--", *job], **popen
    )
    pids = [tmp_path / "pid0", tmp_path / "pid1"]
    deadline = time.monotonic() + 60
    while not all(p.exists() and p.read_text() for p in pids):
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    return launcher, pids


def _gone(pids) -> None:
    """Every rank ended and was reaped by the launcher."""
    for p in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(int(p.read_text()), 0)


def test_launch_terminated_stops_its_processes(tmp_path):
    """SIGTERM to `lowcomm launch` (a scheduler stopping the job) stops its processes too: none
    outlives it, and it exits with 143."""
    import signal

    launcher, pids = _launched(tmp_path, "time.sleep(120)")
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(30) == 143
    _gone(pids)


def test_a_rank_terminated_alone_restarts_the_job_a_terminated_launcher_does_not(tmp_path):
    """Under --max-restarts, a process that exits with 143 by itself (SIGTERM to it alone: its node
    preempted, and lowcomm train has checkpointed the step the job stopped at) fails the attempt
    and the job is started again; SIGTERM to the launcher ends the job, which is not restarted."""
    import signal
    import subprocess

    mark = f"open({str(tmp_path)!r} + '/attempt' + os.environ['TORCHELASTIC_RESTART_COUNT'], 'w').close()"
    first = "os.environ['TORCHELASTIC_RESTART_COUNT'] == '0' and os.environ['RANK'] == '1'"
    body = f"{mark}\nif {first}:\n    sys.exit(143)\ntime.sleep(120)"
    launcher, pids = _launched(tmp_path, body, ["--max-restarts", "3"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "attempt1").exists():
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # (the restarted ranks past their start)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 143, err
    assert "rank 1 exited with code 143" in err and err.count("restarting it (restart") == 1, err
    assert sorted(p.name for p in tmp_path.glob("attempt*")) == ["attempt0", "attempt1"]
    _gone(pids)


def test_ctrl_c_on_launch_lets_the_ranks_end_themselves(tmp_path):
    """A terminal's Ctrl-C reaches the launcher and its ranks (one process group): the launcher
    says so, gives the ranks a moment to end by themselves (lowcomm train then says where its
    records are) and exits with 130. It used to stop them at once, before they could."""
    import signal
    import subprocess

    body = (
        "try:\n    time.sleep(120)\nexcept KeyboardInterrupt:\n"
        # one write of the whole line: print() writes its pieces apart, and the two ranks share
        # the launcher's pipe (a write under PIPE_BUF bytes is never interleaved)
        "    time.sleep(0.3)\n    os.write(1, ('rank ' + os.environ['RANK'] + ' ended itself\\n').encode())\n"
        "    sys.exit(130)\n"
    )
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # its own process group, as a terminal's foreground job
    launcher, pids = _launched(tmp_path, body, start_new_session=True, **pipes)
    os.killpg(launcher.pid, signal.SIGINT)
    out, err = launcher.communicate(timeout=30)
    assert launcher.returncode == 130
    assert sorted(out.split("\n")[:2]) == ["rank 0 ended itself", "rank 1 ended itself"], (out, err)
    assert "interrupted: stopping every rank" in err and "Traceback" not in err


def test_a_second_ctrl_c_on_launch_stops_ranks_that_do_not_end_at_once(tmp_path):
    """Ranks that ignore Ctrl-C and SIGTERM: after the first Ctrl-C the launcher would wait 2 s
    for them to end and 5 s more after its SIGTERM; a second Ctrl-C kills them at once, and the
    launcher still exits with 130, every rank gone and reaped."""
    import signal
    import subprocess
    import time

    deaf = "signal.signal(signal.SIGINT, signal.SIG_IGN); signal.signal(signal.SIGTERM, signal.SIG_IGN)"
    launcher, pids = _launched(
        tmp_path, f"{deaf}\ntime.sleep(120)", stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    os.killpg(launcher.pid, signal.SIGINT)
    time.sleep(0.5)
    assert launcher.poll() is None  # (waiting for the ranks to end themselves)
    first = time.monotonic()
    launcher.send_signal(signal.SIGINT)
    _, err = launcher.communicate(timeout=30)
    assert launcher.returncode == 130 and time.monotonic() - first < 5, err
    assert "interrupted: stopping every rank" in err and "Traceback" not in err
    _gone(pids)


def test_a_failed_collective_ends_a_static_process_in_one_line_with_code_1(monkeypatch, capsys):
    """A peer that died or hung fails the round: the process says so in one line (no traceback)
    and leaves with code 1, which a launcher with --max-restarts restarts."""
    import lowcomm.runtime.cli as cli
    import lowcomm.runtime.trainer as trainer
    from lowcomm.comm import CollectiveError

    def fail(cfg, progress, stop):
        raise CollectiveError("outer collective #2 failed: replica(s) [1] never entered it")

    def leave(code):
        raise SystemExit(code)

    monkeypatch.setattr(trainer, "train", fail)
    monkeypatch.setattr(cli, "_leave_now", leave)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as left:
        cli.main(["train", "--steps", "1", "--quiet"])
    assert left.value.code == 1
    err = capsys.readouterr().err
    assert err == "lowcomm: rank 1: outer collective #2 failed: replica(s) [1] never entered it\n"


def test_ctrl_c_in_training_ends_in_one_line_with_code_130_and_keeps_the_records(
    tmp_path, monkeypatch, capsys
):
    """Ctrl-C used to end `lowcomm train` in a traceback. Now: one line saying where the records
    are (and, when the run has a checkpoint, that --resume auto continues it), exit code 130."""
    import lowcomm.runtime.cli as cli
    import lowcomm.runtime.trainer as trainer

    def interrupted(cfg, progress, stop):
        raise KeyboardInterrupt

    def leave(code):
        raise SystemExit(code)

    monkeypatch.setattr(trainer, "train", interrupted)
    monkeypatch.setattr(cli, "_leave_now", leave)
    run = tmp_path / "run"
    run.mkdir()
    (run / "events.jsonl").write_text('{"kind": "step"}\n')
    for checkpoint, says in ((False, ""), (True, "; the same command with --resume auto continues")):
        if checkpoint:
            (run / "checkpoint.lcs").write_bytes(b"x")
        with pytest.raises(SystemExit) as left:
            cli.main(["train", "--steps", "1", "--quiet", "--run-dir", str(run)])
        assert left.value.code == 130
        err = capsys.readouterr().err
        assert err.startswith(f"\nlowcomm: interrupted; the records so far are in {run.resolve()}{says}"), err
        assert "Traceback" not in err
    assert (run / "events.jsonl").read_text() == '{"kind": "step"}\n'  # kept as it was
    monkeypatch.setattr(cli, "_demo", lambda args: interrupted(None, None, None))  # any other command
    assert cli.main(["demo"]) == 130 and capsys.readouterr().err == "\nlowcomm: interrupted\n"


def test_the_sigterm_watch_sets_the_stop_leaves_after_its_wait_and_is_undone(monkeypatch):
    """`lowcomm train` takes SIGTERM through a thread woken by the signal's wakeup fd, so a main
    thread blocked in a collective does not delay it: the thread sets the run's stop event and,
    if the run has not ended `wait_s` later, leaves with 143. A run that ends within the wait is
    not left; afterwards SIGTERM's handler and the wakeup fd are what they were."""
    import signal
    import threading

    import lowcomm.runtime.cli as cli

    left = []
    monkeypatch.setattr(cli, "_leave_now", left.append)
    assert threading.current_thread() is threading.main_thread()  # (where signal handlers live)
    handler, fd = signal.getsignal(signal.SIGTERM), signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(fd)
    with cli._stop_on_sigterm(wait_s=0.3) as stop:
        assert signal.getsignal(signal.SIGTERM) is not handler and not stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # (a scheduler's, then a launcher's: the same stop)
        assert stop.wait(10)
        deadline = time.monotonic() + 10
        while not left and time.monotonic() < deadline:
            time.sleep(0.05)
        assert left == [143]
    with cli._stop_on_sigterm(wait_s=1.0) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(10)
    time.sleep(1.5)
    assert left == [143]  # (the second run ended within its wait)
    assert signal.getsignal(signal.SIGTERM) is handler and signal.set_wakeup_fd(fd) == fd


def test_sigterm_ends_lowcomm_train_at_a_step_with_its_checkpoint_in_one_line(tmp_path, corpus_dir):
    """SIGTERM (a scheduler stopping or preempting the job) used to kill `lowcomm train` where it
    stood. Now the run ends its step, writes its checkpoint there, records a `stopped` event and
    says in one line where to resume from; exit code 143."""
    import re
    import signal

    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "lowcomm", "train", "--corpus", corpus_dir, "--quiet", *TINY_FLAGS]
    cmd += ["--steps", "1000000", "--log-every", "1", "--checkpoint-every", "100000", "--run-dir", str(run)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "events.jsonl").exists() or '"step"' not in (run / "events.jsonl").read_text():
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 143, err
    line = err.strip().splitlines()[-1]
    said = re.fullmatch(
        r"lowcomm: terminated \(SIGTERM\): stopped at the end of step (\d+); its checkpoint is (.+); "
        r"the same command with --resume auto continues from it",
        line,
    )
    assert said and said[2] == str(run.resolve() / "checkpoint.lcs") and "Traceback" not in err, err
    step = int(said[1])
    events = read_jsonl(run / "events.jsonl")
    assert [e["step"] for e in events if e["kind"] == "step"][-1] == step
    assert [(e["what"], e["step"]) for e in events if e["kind"] == "checkpoint"] == [("written", step)]
    assert [e["step"] for e in events if e["kind"] == "stopped"] == [step]
    assert not (run / "summary.json").exists()


def test_sigterm_to_one_process_of_a_launched_job_stops_all_of_them_at_one_step(tmp_path, corpus_dir):
    """SIGTERM to rank 1 alone of a two-process DiLoCo job (their steps drift apart between
    rounds): rank 1 tells rank 0 through the job's store, both stop at one step agreed there and
    write their checkpoints of that step (a resume continues from it on both), and the job ends
    with 143, rank 0 saying where it stopped."""
    import signal
    from pathlib import Path

    from helpers import launch_train

    from lowcomm.runtime.statefile import load_state

    run = tmp_path / "r"
    train_args = ["--corpus", corpus_dir, "--quiet", *TINY_FLAGS, "--steps", "1000000", "--log-every", "1"]
    train_args += ["--sync-every", "20", "--checkpoint-every", "100000", "--run-dir", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOWCOMM_TEST_JOB": str(tmp_path)}
    p = subprocess.Popen(
        launch_train(2, *train_args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )

    def rank1() -> int:
        for proc in Path("/proc").iterdir():
            try:
                environ = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"LOWCOMM_TEST_JOB={tmp_path}".encode() in environ and b"RANK=1" in environ:
                return int(proc.name)
        raise AssertionError("rank 1 of the job was not found")

    try:
        deadline = time.monotonic() + 120
        while not (run / "events.jsonl").exists() or '"step"' not in (run / "events.jsonl").read_text():
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.05)
        os.kill(rank1(), signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 143, err
    stopped = [e["step"] for e in read_jsonl(run / "events.jsonl") if e["kind"] == "stopped"]
    assert len(stopped) == 1, err
    steps = [load_state(run / f"checkpoint-rank{r}.lcs")["step"] for r in (0, 1)]
    assert steps == [stopped[0]] * 2, err
    assert f"lowcomm: terminated (SIGTERM): stopped at the end of step {stopped[0]}; its checkpoint" in err
    # (rank 1 closing through the job's store after rank 0, its host, had left: a C++ stack trace)
    assert "Traceback" not in err and "recvValue failed" not in err and "frame #" not in err, err


@pytest.mark.parametrize("start", ["exec", "forkserver"])
def test_launched_processes_share_the_machine_s_cores(tmp_path, start):
    """Each of a launched job's processes used to start a torch thread per core: two processes
    on 2 cores (elastic workers of a tiny model) ran 12x slower, their thread pools spinning
    against each other. `lowcomm launch` now gives each its share as OMP_NUM_THREADS (as torchrun
    gives 1), and a forked process's torch takes it too (it had the fork server's count). A user's
    own setting stands (threads_env, below)."""
    import subprocess

    cores = len(os.sched_getaffinity(0))
    script = tmp_path / "threads.py"
    script.write_text(
        "import os, torch\n"
        "line = f\"{os.environ['RANK']} {os.environ['OMP_NUM_THREADS']} {torch.get_num_threads()}\\n\"\n"
        "os.write(1, line.encode())\n"  # (one write: the two processes share the pipe)
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    cmd = [sys.executable, "-m", "lowcomm", "launch", "--replicas", "2", "--start", start]
    out = subprocess.run(
        [*cmd, "--", sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    share = str(max(1, cores // 2))
    assert sorted(out.stdout.split("\n")[:2]) == [f"0 {share} {share}", f"1 {share} {share}"], out.stdout


def test_a_local_elastic_job_s_workers_share_the_machine_s_cores(tmp_path, monkeypatch):
    from lowcomm._checks import threads_env
    from lowcomm.runtime.elastic import LocalJob

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert threads_env(1) == {} and threads_env(4) == {"OMP_NUM_THREADS": str(max(1, cores // 4))}
    assert LocalJob(tmp_path, [], workers=2).worker_env == {"OMP_NUM_THREADS": str(max(1, cores // 2))}
    assert LocalJob(tmp_path, []).worker_env == {}  # (workers not given: the user's environment)
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert threads_env(4) == {} and LocalJob(tmp_path, [], workers=2).worker_env == {}
