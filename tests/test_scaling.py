"""Scaling-law fits recover synthetic laws; reports render; a tiny sweep runs end to end."""

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import write_corpus

from lowcomm.scaling import (
    SweepSpec,
    fit,
    fit_records,
    grid,
    load_records,
    non_embedding_params,
    qualitative_findings,
    resolve_size,
    run_sweep,
    write_report,
)
from lowcomm.scaling.report import check_outputs

N_GRID = np.repeat([1e4, 3e4, 1e5, 3e5, 1e6], 4)
M_GRID = np.tile([1, 2, 4, 8], 5)


def _noise(rng, n, sigma):
    return np.exp(rng.normal(0, sigma, n))


def test_power_law_recovers_its_parameters():
    rng = np.random.default_rng(0)
    N = np.array([1e4, 3e4, 1e5, 3e5, 1e6])
    L = 20.0 * N**-0.1 * _noise(rng, 5, 0.002)
    r = fit("power_law", N, L, n_boot=50)
    assert r.params["alpha"] == pytest.approx(-0.1, abs=0.005)
    assert r.params["A"] == pytest.approx(20.0, rel=0.05)
    assert r.heldout_residual < 0.01


def test_joint_law_recovers_the_study_coefficients():
    rng = np.random.default_rng(1)
    L = 19.226 * N_GRID**-0.0985 * M_GRID**0.0116 * _noise(rng, len(N_GRID), 0.002)
    r = fit("joint", N_GRID, L, M_GRID, n_boot=50)
    assert r.params["alpha"] == pytest.approx(-0.0985, abs=0.002)
    assert r.params["beta"] == pytest.approx(0.0116, abs=0.002)
    lo, hi = r.intervals["beta"]
    assert lo < r.params["beta"] < hi


@pytest.mark.parametrize(
    "form,truth",
    [
        ("joint_irreducible", {"A": 5.0, "alpha": -0.3, "beta": 0.05, "C": 1.5}),
        ("exp_irreducible", {"A": 5.0, "alpha": -0.3, "beta": 0.01, "C": 1.5}),
    ],
)
def test_irreducible_forms_are_recovered_by_huber_lbfgs(form, truth):
    from lowcomm.scaling import predict

    rng = np.random.default_rng(2)
    L = predict(form, truth, N_GRID, M_GRID) * _noise(rng, len(N_GRID), 0.001)
    r = fit(form, N_GRID, L, M_GRID, n_boot=0, starts=16)
    assert r.params["C"] == pytest.approx(truth["C"], rel=0.03)
    assert r.params["alpha"] == pytest.approx(truth["alpha"], abs=0.03)
    assert r.params["beta"] == pytest.approx(truth["beta"], abs=0.01)
    assert r.rmse_log < 0.003


def test_bootstrap_intervals_cover_the_truth_near_the_nominal_rate():
    rng = np.random.default_rng(3)
    N = np.repeat([1e4, 3e4, 1e5, 3e5, 1e6, 3e6], 2)
    covered = 0
    draws = 40
    for i in range(draws):
        L = 10.0 * N**-0.08 * _noise(rng, len(N), 0.01)
        lo, hi = fit("power_law", N, L, n_boot=200, seed=i).intervals["alpha"]
        covered += lo <= -0.08 <= hi
    # nominal 95%; the percentile bootstrap under-covers a little with 12 points
    assert covered / draws >= 0.8


def test_too_few_points_or_one_size_is_refused_with_a_message():
    with pytest.raises(ValueError, match="at least 2 points"):
        fit("power_law", [1e4], [3.0])
    with pytest.raises(ValueError, match="at least 2 model sizes"):
        fit("power_law", [1e4, 1e4], [3.0, 3.1])
    with pytest.raises(ValueError, match="at least 5 points"):
        fit("joint_irreducible", [1e4, 2e4, 3e4], [3.0, 2.9, 2.8], [1, 2, 4])
    with pytest.raises(ValueError, match="unknown form"):
        fit("cubic", [1, 2, 3], [1, 2, 3])


def _write_summary(d, **kw):
    d.mkdir(parents=True, exist_ok=True)
    s = {
        "mode": "diloco",
        "replicas": 1,
        "params_non_embedding": 1000,
        "final_eval_loss": 3.0,
        "tokens": 1000,
        "sync_every": 30,
        "fragments": 1,
        "codec": "fp32",
        "lr": 0.002,
        "outer_lr": 0.7,
        "batch_size": 8,
    }
    s.update(kw)
    (d / "summary.json").write_text(json.dumps(s))


@pytest.fixture
def fixture_runs(tmp_path):
    rng = np.random.default_rng(4)
    for n in (2e4, 6e4, 2e5, 6e5):
        dp = 12.0 * n**-0.1
        _write_summary(
            tmp_path / f"n{int(n)}" / "dp", mode="dp", params_non_embedding=int(n), final_eval_loss=dp
        )
        for m in (1, 2, 4, 8):
            loss = dp * (0.99 + 0.01 * m * (2e4 / n) ** 0.3) * float(_noise(rng, 1, 0.001)[0])
            for lr, bump in ((0.002, 1.0), (0.004, 1.01)):
                _write_summary(
                    tmp_path / f"n{int(n)}" / f"m{m}_lr{lr}",
                    replicas=m,
                    params_non_embedding=int(n),
                    final_eval_loss=loss * bump,
                    lr=lr,
                )
    _write_summary(tmp_path / "bad" / "nan", final_eval_loss=float("nan"))
    (tmp_path / "bad" / "missing").mkdir(parents=True)
    (tmp_path / "bad" / "missing" / "summary.json").write_text(json.dumps({"mode": "dp"}))
    return tmp_path


def test_bad_records_are_named_and_left_out(fixture_runs):
    records, rejected = load_records([fixture_runs])
    assert len(records) == 4 * (1 + 4 * 2)
    reasons = dict(rejected)
    assert any(
        "not a finite positive number" in why for p, why in reasons.items() if p.endswith("nan/summary.json")
    )
    assert any("missing fields" in why for p, why in reasons.items() if p.endswith("missing/summary.json"))


def test_records_with_counts_the_fits_cannot_use_are_left_out_by_name(tmp_path):
    """replicas=0 made a curve 'diloco M=0', params of -5 a point the log-log fits took, a string
    count or a summary that is a bare number a traceback."""
    cases = {
        "m0": (dict(replicas=0), "replicas is 0, not an int >= 1"),
        "neg": (dict(params_non_embedding=-5), "params_non_embedding is -5, not an int >= 1"),
        "text": (dict(tokens="many"), "tokens is 'many', not an int >= 1"),
        "bool": (dict(replicas=True), "replicas is True, not an int >= 1"),
        "lossbool": (dict(final_eval_loss=True), "final_eval_loss is True, not a finite positive number"),
        "mode": (dict(mode="sgd"), "mode is 'sgd', not 'dp' or 'diloco'"),
        # the settings a curve is named by, and the fitted hyperparameters: a traceback before
        "frags": (dict(fragments="four"), "fragments is 'four', not an int >= 1"),
        "tau": (dict(overlap=-1), "overlap is -1, not an int >= 0"),
        "codec": (dict(codec=7), "codec is 7, not a codec's name"),
        "lr": (
            dict(lr="fast", batch_size=0),
            "lr is 'fast', not a finite number > 0; batch_size is 0, not an int >= 1",
        ),
    }
    for name, (kw, _) in cases.items():
        _write_summary(tmp_path / name, **kw)
    _write_summary(tmp_path / "good", sync_every=None, overlap=None, lr=None)  # null: not given
    (tmp_path / "number").mkdir()
    (tmp_path / "number" / "summary.json").write_text("5")
    records, rejected = load_records([tmp_path])
    assert [r.path for r in records] == [str(tmp_path / "good")]
    reasons = {Path(p).parent.name: why for p, why in rejected}
    assert reasons == {
        **{n: why for n, (_, why) in cases.items()},
        "number": "a JSON int, not an object of fields",
    }


def test_report_renders_tables_fits_plots_and_findings(fixture_runs, tmp_path):
    records, rejected = load_records([fixture_runs])
    path = write_report(records, tmp_path / "report", rejected=rejected, n_boot=20)
    text = path.read_text()
    assert "| N (non-embedding) | dp | diloco M=1 | diloco M=2 | diloco M=4 | diloco M=8 |" in text
    assert "L = A·N^α·M^β" in text and "held-out" in text and "Left out" in text
    for png in ("loss_vs_N.png", "loss_vs_M.png", "residuals.png"):
        data = (tmp_path / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    fits = json.loads((tmp_path / "report" / "fits.json").read_text())
    assert set(fits["per_curve"]) == {"dp", "diloco M=1", "diloco M=2", "diloco M=4", "diloco M=8"}
    assert fits["hparams"]["lr"]["diloco M=4"]["params"]["A"] == pytest.approx(0.002, rel=1e-6)
    findings = {c: h for c, h, _ in qualitative_findings(records)}
    assert findings["DiLoCo M=1 at or below DP at every N"] is True
    assert findings["loss rises with M at fixed N"] is True
    assert findings["the gap to DP shrinks as N grows (M > 1)"] is True
    check_outputs(tmp_path / "report")  # a report's own files: written again by the next one


def test_a_report_or_fit_never_replaces_a_file_it_did_not_write(fixture_runs, capsys):
    """The report's folder defaults to the runs folder, where a user may keep a report.md of their
    own: it was replaced. Files a report wrote are written again; others are refused by name,
    before any fit, and left as they were."""
    from lowcomm.runtime.cli import main

    mine = fixture_runs / "report.md"
    mine.write_text("# my notes on these runs\n")
    assert main(["scaling", "report", str(fixture_runs), "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"lowcomm: error: out={str(fixture_runs)!r} holds report.md not written by a lowcomm report, "
        "which this one would replace: give another --out"
    )
    assert mine.read_text() == "# my notes on these runs\n" and not (fixture_runs / "fits.json").exists()
    records, _ = load_records([fixture_runs])
    with pytest.raises(ValueError, match="holds report.md not written by a lowcomm report"):
        write_report(records, fixture_runs, n_boot=0)
    (fixture_runs / "fits.json").write_text('{"mine": 1}')
    (fixture_runs / "residuals.png").write_bytes(b"\x89PNG\r\n\x1a\n a plot of my own")
    with pytest.raises(ValueError, match=r"holds report.md, fits.json, residuals.png not written"):
        check_outputs(fixture_runs)
    assert main(["scaling", "fit", str(fixture_runs), "--bootstrap", "0"]) == 2  # fit writes fits.json alone
    assert "holds fits.json not written by a lowcomm report" in capsys.readouterr().err
    (fixture_runs / "fits.json").unlink()
    assert main(["scaling", "fit", str(fixture_runs), "--bootstrap", "0"]) == 0  # (report.md is not its)
    check_outputs(fixture_runs, ("fits.json",))  # and what it wrote is a fit's
    err = capsys.readouterr().err  # a bar of the fits (10,000 resamples take minutes)
    assert re.search(r"fits: +\d+%\|.*\| \d+/12 ", err), err
    assert main(["scaling", "fit", str(fixture_runs), "--bootstrap", "0", "--quiet"]) == 0
    assert "fits:" not in capsys.readouterr().err
    assert mine.read_text() == "# my notes on these runs\n"


def test_streaming_and_quantized_runs_are_curves_of_their_own_not_diloco_cells(fixture_runs):
    """The demo's folder held DiLoCo and Streaming DiLoCo (P=4, e3m0) at M=4: the report's
    'diloco M=4' was the streaming run (the lower loss of the cell), and the joint laws took it.
    Each variant is a curve of its own, after DiLoCo's; the joint laws and the study's findings
    are DiLoCo's alone."""
    from lowcomm.scaling.analyze import loss_table

    before, _ = load_records([fixture_runs])
    _, keys_before, best_before = loss_table(before)
    for n in (2e4, 6e4, 2e5, 6e5):
        for name, kw in (
            ("stream", dict(fragments=4, overlap=1, codec="e3m0")),
            ("e3m0", dict(codec="e3m0")),
        ):
            _write_summary(
                fixture_runs / f"n{int(n)}" / f"{name}_m4",
                replicas=4,
                params_non_embedding=int(n),
                final_eval_loss=0.5 * best_before[("dp", int(n))].loss,  # the best of every cell
                **kw,
            )
    records, _ = load_records([fixture_runs])
    _, keys, best = loss_table(records)
    assert keys == [*keys_before, "diloco e3m0 M=4", "streaming P=4 tau=1 e3m0 M=4"]
    assert all(best[k] == r for k, r in best_before.items())  # no cell of DiLoCo's taken over
    a = fit_records(records, n_boot=0)
    assert a.joint["joint"].n_points == 16  # DiLoCo's 4 sizes x 4 M, no variant's
    assert set(a.per_curve) == {*keys_before, "diloco e3m0 M=4", "streaming P=4 tau=1 e3m0 M=4"}
    assert qualitative_findings(records) == qualitative_findings(before)


def test_a_cell_of_runs_at_two_token_budgets_is_refused_by_name(fixture_runs, capsys):
    """Two sweeps' folders reported together, one at 20 tokens a parameter and one at 40: each
    cell's lowest loss was the longer-trained run's, taken as the best-tuned one and fitted. Budgets
    that differ between cells (a sweep with --keep-per-replica-batch: tokens grow with M; here, the
    fixture's, with N) are a sweep's design and pass."""
    from lowcomm.runtime.cli import main

    fit_records(load_records([fixture_runs])[0], n_boot=0)  # one budget a cell: fitted
    _write_summary(
        fixture_runs / "longer" / "m4",
        replicas=4,
        params_non_embedding=200_000,
        tokens=2000,  # twice the fixture's budget at this N
        final_eval_loss=1.0,
    )
    records, _ = load_records([fixture_runs])
    match = (
        r"the cell diloco M=4 at N=200,000 holds runs of different token budgets \(D/N 0.005 in "
        r".*m4_lr0.00\d, 0.01 in .*longer/m4\): its lowest loss would be the longer-trained run's; fit or "
        r"report each budget's runs apart"
    )
    with pytest.raises(ValueError, match=match):
        fit_records(records, n_boot=0)
    assert (
        main(["scaling", "report", str(fixture_runs), "--bootstrap", "0", "--out", str(fixture_runs / "r")])
        == 2
    )
    assert re.search(match, capsys.readouterr().err) and not (fixture_runs / "r").exists()


@pytest.mark.parametrize(
    "field,values,what",
    [("corpus", ("stdlib", "dir:web"), "corpora"), ("seq_len", (64, 128), "context lengths")],
)
def test_runs_of_two_corpora_or_context_lengths_are_not_fitted_together(tmp_path, field, values, what):
    """Their losses measure different things; any cell or curve mixing them would be wrong."""
    for i, n in enumerate((20_000, 60_000, 200_000)):
        _write_summary(tmp_path / f"n{n}", params_non_embedding=n, **{field: values[i == 2]})
    _write_summary(tmp_path / "unsaid", params_non_embedding=600_000)  # a record that does not say
    records, rejected = load_records([tmp_path])
    assert not rejected
    with pytest.raises(
        ValueError,
        match=rf"the records are of 2 {what}: {values[0]!r} \(.*n20000\), {values[1]!r} \(.*n200000\); "
        rf"their losses measure different things: fit or report each {field}'s runs apart",
    ):
        fit_records(records, n_boot=0)
    fit_records([r for r in records if getattr(r, field) != values[1]], n_boot=0)  # one: fitted


def test_a_single_model_size_is_reported_not_fitted(tmp_path):
    for m in (1, 2, 4):
        _write_summary(tmp_path / f"m{m}", replicas=m, final_eval_loss=3.0 + 0.01 * m)
    records, _ = load_records([tmp_path])
    a = fit_records(records, n_boot=10)
    assert not a.per_curve and any("at least 2" in why for _, why in a.skipped)
    # its report says so, with no empty table of laws and no empty plot of residuals (an earlier
    # report's, fitted from more runs, would now mislead: it goes)
    out = tmp_path / "report"
    out.mkdir()
    (out / "residuals.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"Matplotlib")
    text = write_report(records, out, analysis=a).read_text()
    laws = text.split("## Fitted laws")[1].split("##")[0]
    assert laws.strip().startswith("No law was fitted.\n\nNot fitted:") and "| law |" not in laws
    assert "residuals" not in text and not (out / "residuals.png").exists()
    assert (out / "loss_vs_M.png").exists()


def test_sizes_resolve_to_presets_and_parameter_counts():
    assert resolve_size("d64l4") == ("d64l4", 64, 4, 4)
    assert resolve_size("100k")[0] == "d64l2" and non_embedding_params(64, 2) == 100096
    with pytest.raises(ValueError, match="neither a preset"):
        resolve_size("huge")
    for count in ("0", "-5k", "inf", "nan"):  # "0" was a ZeroDivisionError
        with pytest.raises(ValueError, match=f"model size '{count}' is neither a preset .* nor a count > 0"):
            resolve_size(count)
    # far outside the presets: '1e20' trained the largest, d256l8 (6.3M), as if it were 1e20
    for count, shown in (("1e20", "1e+20"), ("3k", "3e+03"), ("13M", "1.3e+07")):
        with pytest.raises(ValueError, match=re.escape(f"model size '{count}' ({shown} parameters) is more")):
            resolve_size(count)
    assert resolve_size("3.4k")[0] == "d16l2" and resolve_size("12M")[0] == "d256l8"  # within 2x


def test_a_sweep_that_names_a_value_twice_is_refused_by_name():
    """Each value is one run: a value given twice ran once and was counted as 'already done' (or,
    for a count and the preset it stands for, the same folder twice)."""
    for kw, match in [
        (
            dict(sizes=("d32l2",), replicas=(1, 1)),
            r"replicas=\[1, 1\] is not allowed: each value once \(1 given twice\)",
        ),
        (dict(sizes=("20k", "d32l2")), r"sizes=\['20k', 'd32l2'\] .*\(d32l2 given twice; a count stands for"),
        (dict(sizes=("d32l2",), lrs=(1e-3, 0.001)), r"lrs=\[0.001, 0.001\] is not allowed"),
        (dict(sizes=("d32l2",), replicas=(0,)), r"replicas=0 is not allowed: an int >= 1"),
        (dict(sizes=("d32l2",), replicas=(True,)), r"replicas=True is not allowed: an int >= 1"),
        (dict(sizes=("d32l2",), tokens_per_param=True), r"tokens_per_param=True is not allowed"),
    ]:
        with pytest.raises(ValueError, match=match):
            SweepSpec(**kw)


def test_grid_follows_the_protocol():
    spec = SweepSpec(sizes=("d32l2",), replicas=(1, 4), tokens_per_param=20, global_batch=16, seq_len=32)
    runs = dict(grid(spec))
    n = non_embedding_params(32, 2)
    dp = runs["d32l2/dp_lr0.002"]
    m4 = runs["d32l2/diloco_M4_H30_olr0.7_lr0.002"]
    assert dp.data.batch_size == 16 and m4.data.batch_size == 4 and m4.run.replicas == 4
    for cfg in (dp, m4):  # equal tokens D = 20·N
        tokens = cfg.run.steps * cfg.data.batch_size * cfg.run.replicas * 32
        assert tokens == pytest.approx(20 * n, rel=0.01)
    with pytest.raises(ValueError, match="not divisible"):
        SweepSpec(sizes=("d32l2",), replicas=(3,), global_batch=16)
    # a step's tokens divide each run's token budget: zero was a ZeroDivisionError, NaN a crash
    # in int() naming no setting
    for kw, match in [
        (dict(global_batch=0), "global_batch=0 is not allowed: an int >= 1"),
        (dict(seq_len=0), "seq_len=0 is not allowed: an int >= 1"),
        (dict(tokens_per_param=float("nan")), "tokens_per_param=nan is not allowed: a finite number > 0"),
        (dict(tokens_per_param=-1.0), "tokens_per_param=-1.0 is not allowed"),
    ]:
        with pytest.raises(ValueError, match=match):
            SweepSpec(sizes=("d32l2",), replicas=(1,), **kw)


def test_a_sweep_on_a_corpus_that_is_not_there_is_refused_before_any_folder(tmp_path):
    """Every run would fail on it: refused once, naming the path, with nothing written."""
    from lowcomm.scaling import run_sweep

    out = tmp_path / "sweep"
    spec = SweepSpec(sizes=("d16l2",), replicas=(1,), corpus=str(tmp_path / "nope"), out=str(out))
    with pytest.raises(FileNotFoundError, match=r"corpus path '.*nope' does not exist"):
        run_sweep(spec, progress=False)
    assert not out.exists()
    # more threads than CPUs, or a run too large for the memory here: each run failed in turn,
    # after sweep.json and a folder per run were written
    corpus = write_corpus(tmp_path / "corpus")
    for kw, match in [
        (dict(threads=100_000), r"^threads=100000 is not allowed: 0 \(torch's default\) to \d+, the CPUs"),
        (dict(global_batch=10**15), r"^batch_size=1000000000000000, seq_len=64, .* need at least"),
    ]:
        spec = SweepSpec(sizes=("d16l2",), replicas=(1,), corpus=corpus, out=str(out), **kw)
        with pytest.raises(ValueError, match=match):
            run_sweep(spec, progress=False)
        assert not out.exists()


def test_a_sweeps_bar_shows_each_runs_steps_beneath_it(tmp_path, capsys):
    """The sweep's bar moved once a run: a large size's run showed nothing for many minutes."""
    corpus = write_corpus(tmp_path / "corpus")
    spec = SweepSpec(
        sizes=("d16l2",), replicas=(1,), baseline=None, tokens_per_param=0.5, global_batch=4, seq_len=16,
        corpus=str(corpus), out=str(tmp_path / "sweep"), threads=1,
    )  # fmt: skip
    assert run_sweep(spec, progress=True)["done"] == 1
    err = capsys.readouterr().err
    assert re.search(r"sweep: +\d+%", err), err[-2000:]
    assert re.search(r"diloco M=1: +\d+%\|.*\| \d+/\d+ ", err), err[-2000:]  # the run's own steps


def test_tiny_sweep_runs_resumes_and_survives_a_failed_run(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus")
    spec = SweepSpec(
        sizes=("d16l2", "d32l2"),
        replicas=(1, 2),
        tokens_per_param=0.5,  # a few hundred steps in all: what is tested is the sweep, not the fits
        global_batch=4,
        seq_len=16,
        sync_every=(5,),
        corpus=str(corpus),
        out=str(tmp_path / "sweep"),
        threads=1,
    )
    import lowcomm.runtime.trainer.loop as trainer

    real = trainer.train

    def flaky(cfg, **kw):
        if "d16l2/diloco_M2" in cfg.run.run_dir:
            raise RuntimeError("injected failure")
        return real(cfg, **kw)

    monkeypatch.setattr(trainer, "train", flaky)
    res = run_sweep(spec, progress=False)
    assert res["runs"] == 6 and res["done"] == 5 and len(res["failed"]) == 1
    assert (tmp_path / "sweep" / "d16l2" / "diloco_M2_H5_olr0.7_lr0.002" / "failed.json").exists()
    monkeypatch.setattr(trainer, "train", real)
    again = run_sweep(spec, progress=False)
    assert again["skipped"] == 5 and again["done"] == 1 and not again["failed"]
    # the same folder with another run setting: its finished runs are not this sweep's, so they are
    # refused by name rather than skipped as if they were (sweep.json took the new spec before)
    record = tmp_path / "sweep" / "sweep.json"
    before = record.read_text()
    with pytest.raises(
        ValueError,
        match=r"run d16l2/dp_lr0.002 was finished with steps=52, seq_len=16, warmup=5, "
        r"this sweep gives it steps=103, seq_len=8, warmup=10; .*give another out$",
    ):
        run_sweep(dataclasses.replace(spec, seq_len=8), progress=False)
    assert record.read_text() == before
    # more H (or sizes, M, learning rates) extend it: only the new runs train, and sweep.json
    # lists every run asked for, with the earlier spec kept
    wider = dataclasses.replace(spec, sizes=("d16l2",), replicas=(2,), sync_every=(10,))
    more = run_sweep(wider, progress=False)
    assert more["runs"] == 2 and more["skipped"] == 1 and more["done"] == 1
    kept = json.loads(record.read_text())
    assert len(kept["runs"]) == 7 and kept["runs"][-1] == "d16l2/diloco_M2_H10_olr0.7_lr0.002"
    assert kept["spec"]["sync_every"] == [10] and kept["earlier_specs"] == [json.loads(before)["spec"]]
    # the corpus is compared by its data: the same folder by another path resumes, an edited one
    # is refused
    same = run_sweep(dataclasses.replace(wider, corpus=str(corpus) + "/."), progress=False)
    assert same["skipped"] == 2 and same["done"] == 0
    (Path(corpus) / "part0.py").write_text("def edited(): pass\n")
    with pytest.raises(ValueError, match=r"run d16l2/dp_lr0.002 was finished with corpus_sha256='"):
        run_sweep(wider, progress=False)
    records, rejected = load_records([tmp_path / "sweep"])
    assert len(records) == 7 and not rejected
    assert all(math.isfinite(r.loss) for r in records)
    assert write_report(records, tmp_path / "sweep", n_boot=10).exists()
    # what cannot be checked, or a sweep.json lowcomm did not write, is refused and left as it is
    (tmp_path / "sweep" / "d16l2" / "dp_lr0.002" / "config.json").unlink()
    with pytest.raises(ValueError, match=r"run d16l2/dp_lr0.002 has a summary.json but no readable config"):
        run_sweep(wider, progress=False)
    record.write_text("my notes on the sweep")
    with pytest.raises(ValueError, match=r"sweep.json' is not a sweep record lowcomm wrote .* left as it is"):
        run_sweep(wider, progress=False)
    assert record.read_text() == "my notes on the sweep"


@pytest.mark.parametrize(
    "missing,command,feature",
    [("scipy", "fit", "fitting scaling laws"), ("matplotlib", "report", "plotting a scaling report")],
)
def test_fit_and_report_without_the_scaling_extra_name_it(fixture_runs, missing, command, feature):
    from test_layers import assert_names_the_extra

    assert_names_the_extra(missing, ["scaling", command, str(fixture_runs)], "scaling", feature)
    assert not (fixture_runs / "fits.json").exists()  # refused before any fitting or writing


def test_sigterm_ends_a_sweep_in_one_line_with_code_143_and_a_rerun_continues_it(tmp_path, capsys):
    """SIGTERM (a scheduler's) ended `lowcomm scaling sweep` where it stood, without a word; it is
    now taken as Ctrl-C is: the run under way closes its records, one line says that the same
    command continues the sweep, exit code 143, and SIGTERM's handler is given back. The rerun
    keeps the runs that finished."""
    import os
    import signal
    import threading
    import time

    from lowcomm.runtime.cli import main

    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "sweep"
    argv = ["scaling", "sweep", "--sizes", "d16l2", "--replicas", "1,2", "--tokens-per-param", "2"]
    argv += ["--global-batch", "4", "--seq-len", "16", "--sync-every", "5", "--corpus", str(corpus)]
    argv += ["--threads", "1", "--out", str(out), "--quiet"]

    def terminate_after_a_run() -> None:
        deadline = time.monotonic() + 120
        while not list(out.glob("*/*/summary.json")) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    sender = threading.Thread(target=terminate_after_a_run)
    sender.start()
    code = main(argv)
    sender.join()
    assert code == 143
    err = capsys.readouterr().err
    said = "lowcomm: terminated (SIGTERM); the same command continues the sweep (its finished runs are kept)"
    assert err.endswith(said + "\n"), err[-2000:]
    assert signal.getsignal(signal.SIGTERM) is handler
    done = len(list(out.glob("*/*/summary.json")))
    assert 1 <= done < 3
    assert main(argv) == 0
    assert f"3 runs, {3 - done} run now, {done} already done" in capsys.readouterr().out
