"""lowcomm.integrations: the Lightning callback, the HF TrainerCallback and the TOML table, each
on a tiny model; the two examples run under ``lowcomm launch`` as a user runs them."""

import json
import logging
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from lowcomm import DiLoCo, DiLoCoConfig, LocalGroup
from lowcomm._compat import tomllib
from lowcomm.lm import GPT, GPTConfig

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(Path(__file__).parent))
from helpers import srun_tasks  # noqa: E402

#: what each example's processes import first, imported once by the launcher's fork server
#: (Lightning's import is ~8 s of CPU a process, transformers' ~6 s)
PRELOAD = {
    "lightning_diloco.py": ["lightning.pytorch", "lowcomm.integrations.lightning"],
    "hf_diloco.py": ["transformers.trainer", "transformers.models.gpt2", "lowcomm.integrations.hf"],
}


def _launch(
    script: str,
    out: Path,
    *flags: str,
    replicas: int = 2,
    procs: int = 1,
    check: bool = True,
    restarts: int = 0,
    path: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run an example (or ``path``, a script that runs it) under ``lowcomm launch``."""
    cmd = [sys.executable, "-m", "lowcomm", "launch", "--replicas", str(replicas)]
    cmd += ["--procs-per-replica", str(procs), "--start", "forkserver", "--max-restarts", str(restarts)]
    cmd += [a for m in PRELOAD[script] for a in ("--preload", m)] + ["--"]
    cmd += [sys.executable, str(path or EXAMPLES / script), "--out", str(out), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0 or not check, res.stderr[-4000:]
    return res


def _results(out: Path, replicas: int = 2, procs: int = 1) -> list[dict]:
    """Every process's result, replica by replica (the examples' first process of a replica writes
    result.json, the others result.rankN.json)."""
    names = ["result.json"] + [f"result.rank{i}.json" for i in range(1, procs)]
    return [json.loads((out / f"replica{r}" / n).read_text()) for r in range(replicas) for n in names]


def _parts(state: dict) -> list[str]:
    return sorted(k for k in state if k.startswith("part "))


@pytest.mark.parametrize("script", ["lightning_diloco.py", "hf_diloco.py"])
def test_an_example_changes_at_most_five_lines_of_the_plain_script(script):
    """Five to add DiLoCo, and a sixth, the call that picks the checkpoint to resume from."""
    marked = [line for line in (EXAMPLES / script).read_text().splitlines() if "# DiLoCo" in line]
    code = [line for line in marked if not line.lstrip().startswith(("#", '"', "`")) and "``" not in line]
    resume = [line for line in code if "resume_checkpoint(group" in line]
    assert len(resume) == 1 and 1 <= len(code) - 1 <= 5, code


@pytest.mark.parametrize("procs", [1, 2])
def test_lightning_example_trains_two_replicas_and_resumes_those_of_two_bit_for_bit(tmp_path, procs):
    """Three epochs; then, with replicas of 2, replica 1's checkpoint of epoch 3 lost (killed while
    replica 0 wrote it): both replicas resume from epoch 2's (the newest both hold, a round in
    flight: overlap=1) and train epoch 3 again: the same bits as the uninterrupted run, so DiLoCo's
    state (restored by Lightning before the optimizer exists) came back whole. (With one process a
    replica the resume is the same path less the gathering of parts, and the HF test resumes
    replicas of one process; here that job is resumed with a third replica instead, which has no
    checkpoint: it hung until the group's timeout, then was refused naming each replica's steps;
    it now resumes from replica 0's checkpoint of the step the others resume from, taking the
    job's part of DiLoCo's state, and the three end alike.)

    With 2 processes a replica, replica_group() shows Lightning its replica's 2 processes as the
    whole job (a rendezvous of its own), so Lightning's DDP runs inside the replica (the data
    sharded in two: 8 optimizer steps an epoch, not 16) and DiLoCo between the replicas, each
    process syncing its half of every fragment (shard_group) with its place in the other replica.
    Lightning writes the replica's first process's checkpoint, which holds both halves of DiLoCo's
    state; all four processes end with the same bits."""
    out, epoch = tmp_path / "run", 16 // procs
    _launch("lightning_diloco.py", out, "--epochs", "3", "--devices", str(procs), procs=procs)
    first = _results(out, procs=procs)
    assert [(f["world_size"], f["global_step"]) for f in first] == [(procs, 3 * epoch)] * 2 * procs
    assert all(f["params"] == first[0]["params"] for f in first)  # final sync (and DDP)
    ckpts = [out / f"replica{r}" / "checkpoints" for r in range(2)]
    for name in (f"epoch=2-step={3 * epoch}.ckpt", "last.ckpt"):  # replica 1 killed before epoch 3's
        (ckpts[1] / name).unlink()
    saved = torch.load(ckpts[0] / f"epoch=1-step={2 * epoch}.ckpt", weights_only=False)
    assert _parts(saved["callbacks"]["DiLoCoCallback"]) == [
        f"part {i} of {procs}" for i in range(procs) if procs > 1
    ]
    if procs == 1:  # resumed with a third replica, which has no checkpoint: from replica 0's
        res = _launch("lightning_diloco.py", out, "--epochs", "3", "--resume", replicas=3)
        took = f"replica 2 holds no checkpoint in {out}/replica2: it resumes from replica 0's of step 32"
        assert took in res.stderr and f"{ckpts[0]}/epoch=1-step=32.ckpt" in res.stderr, res.stderr[-4000:]
        assert "replica 2 takes replica 0's DiLoCo state (step 32): the job's part of it" in res.stderr
        done = _results(out, replicas=3)
        assert [d["global_step"] for d in done] == [48] * 3
        assert done[0]["params"] == done[1]["params"] == done[2]["params"]  # (the final sync)
        assert done[0]["params"] != first[0]["params"]  # (three replicas' average, not two's)
        return
    _launch("lightning_diloco.py", out, "--epochs", "3", "--devices", str(procs), "--resume", procs=procs)
    again = _results(out, procs=procs)
    assert [a["params"] for a in again] == [f["params"] for f in first]


def test_a_lightning_job_whose_replica_died_before_its_checkpoint_restarts_from_one_both_hold(tmp_path):
    """The Lightning example under ``lowcomm launch --max-restarts 1``, always passed --resume (a
    fresh start the first time: no replica holds a checkpoint). Replica 1 is killed at the end of
    epoch 3, before it writes that epoch's checkpoint, which replica 0 writes; the job is started
    again and resume_checkpoint() takes both replicas back to epoch 2's, the newest both hold
    (Lightning's "last" would have taken replica 0 to epoch 3's and replica 1 to epoch 2's: refused
    by the callback as replicas that resume from different steps, at every restart)."""
    script = tmp_path / "dies.py"
    script.write_text(
        "import os, runpy, signal, sys\n"
        "import lightning.pytorch as pl\n"
        "from lowcomm.integrations.common import HIDDEN\n"
        "class Dies(pl.Callback):  # (runs before ModelCheckpoint's hook of the same epoch end)\n"
        "    def on_train_epoch_end(self, trainer, module):\n"
        "        first = os.environ['TORCHELASTIC_RESTART_COUNT'] == '0'\n"
        "        if first and HIDDEN['RANK'] == '1' and trainer.current_epoch == 2:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "build = pl.Trainer.__init__\n"
        "def with_dies(self, *args, callbacks=(), **kw):\n"
        "    build(self, *args, callbacks=[Dies(), *callbacks], **kw)\n"
        "pl.Trainer.__init__ = with_dies\n"
        f"sys.argv = [{str(EXAMPLES / 'lightning_diloco.py')!r}, *sys.argv[1:]]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    out = tmp_path / "run"
    res = _launch("lightning_diloco.py", out, "--epochs", "4", "--resume", restarts=1, path=script)
    held = [sorted(p.name for p in (out / f"replica{r}" / "checkpoints").glob("epoch=*")) for r in range(2)]
    every = [f"epoch={e}-step={16 * (e + 1)}.ckpt" for e in range(4)]
    # replica 0 wrote epoch 3's again after the restart, beside its first (Lightning's "-v1")
    assert held == [sorted([*every, "epoch=2-step=48-v1.ckpt"]), every], held
    for r in range(2):  # each from its own folder, at the step both held
        assert f"checkpoint path at {out}/replica{r}/checkpoints/epoch=1-step=32.ckpt" in res.stderr, r
    done = _results(out)
    assert [d["global_step"] for d in done] == [64, 64] and done[0]["params"] == done[1]["params"]


def test_the_lightning_example_runs_as_the_tasks_of_an_srun_step(tmp_path):
    """``srun -n 2 python examples/lightning_diloco.py``, no torchrun (the tasks' variables as srun
    sets them, on this machine): replica_group() found no launcher and made each task a replica
    of its own, both writing into replica0/, and Lightning took the step for its SLURM job (DDP
    across the tasks: gradients all-reduced every step). The tasks are now the job's two replicas,
    and Lightning, SLURM_NTASKS hidden from it, sees one process in each."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(EXAMPLES / "lightning_diloco.py"), "--out", str(out), "--epochs", "1"]
    done = srun_tasks(cmd, tmp_path)
    assert [d.returncode for d in done] == [0, 0], [d.stderr[-3000:] for d in done]
    results = _results(out)
    assert [(r["world_size"], r["global_step"]) for r in results] == [(1, 16), (1, 16)]
    assert results[0]["params"] == results[1]["params"]  # the final sync: DiLoCo between the tasks


@pytest.mark.parametrize("procs", [1, 2])
def test_hf_example_trains_two_replicas_and_resumes_bit_for_bit(tmp_path, procs):
    """48 steps with checkpoints at 24 and 48; then, replica 1's checkpoint-48 lost, both from
    checkpoint-24 (the newest both hold) again: the same bits; then on with a third replica, which
    starts from replica 0's checkpoint. With one process a replica the
    Trainer saw one process (no DDP) and every replica saved its checkpoints, model included; with
    two, the Trainer's DDP ran inside the replica and its first
    process wrote both halves of DiLoCo's state (not resumed here, to spare CI a launch of four
    processes: the Lightning test resumes a replica of two from such a state)."""
    out = tmp_path / "run"
    _launch("hf_diloco.py", out, "--steps", "48", "--save-every", "24", procs=procs)
    first = _results(out, procs=procs)
    wrapped = "GPT2LMHeadModel" if procs == 1 else "DistributedDataParallel"
    assert all(f["world_size"] == procs and f["wrapped"] == wrapped for f in first)
    assert first[0]["global_step"] == 48 and all(f["params"] == first[0]["params"] for f in first)
    assert all(f["rounds_logged"] > 0 for f in first)  # (in each replica's trainer_state history)
    for r in range(2):
        folder = out / f"replica{r}" / "checkpoint-24"
        assert (folder / "diloco.pt").exists() and (folder / "model.safetensors").exists()
        saved = torch.load(folder / "diloco.pt", weights_only=True)
        assert _parts(saved) == [f"part {i} of {procs}" for i in range(procs) if procs > 1]
    shutil.rmtree(out / "replica1" / "checkpoint-48")
    if procs > 1:
        return
    _launch("hf_diloco.py", out, "--steps", "48", "--save-every", "24", "--resume", procs=procs)
    again = _results(out, procs=procs)
    assert [a["params"] for a in again] == [f["params"] for f in first]
    # on to 72 with a third replica, which has no checkpoint: the Trainer and DiLoCo's state from
    # replica 0's checkpoint-48 (the callback is told the step, not the folder: resume_checkpoint's)
    res = _launch("hf_diloco.py", out, "--steps", "72", "--save-every", "24", "--resume", replicas=3)
    took = f"replica 2 holds no checkpoint in {out}/replica2: it resumes from replica 0's of step 48"
    assert took in res.stderr and "replica 2 takes replica 0's DiLoCo state (step 48)" in res.stderr
    done = _results(out, replicas=3)
    assert [d["global_step"] for d in done] == [72] * 3
    assert done[0]["params"] == done[1]["params"] == done[2]["params"]
    assert (out / "replica2" / "checkpoint-72" / "diloco.pt").exists()


def test_lightning_callback_counts_optimizer_steps_under_gradient_accumulation(tmp_path):
    import lightning.pytorch as pl

    sys.path.insert(0, str(EXAMPLES))
    try:
        from lightning_diloco import Regressor, data
    finally:
        sys.path.remove(str(EXAMPLES))
    from lowcomm.integrations.lightning import DiLoCoCallback

    callback = DiLoCoCallback(LocalGroup.create(1)[0], sync_every=3)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        accumulate_grad_batches=4,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=pl.loggers.CSVLogger(tmp_path, name="log", version=0),
        callbacks=[callback],
    )
    trainer.fit(Regressor(), data(seed=0))  # 16 batches: 4 optimizer steps
    assert trainer.global_step == 4 and callback.diloco.step_count == 4
    # the round at step 3 went to the logger at that step (not a multiple of log_every_n_steps),
    # the final sync's at the last step (it was left undrained)
    assert callback.diloco.drain_round_stats() == []
    rows = (tmp_path / "log" / "version_0" / "metrics.csv").read_text().splitlines()
    head, logged = rows[0].split(","), [dict(zip(rows[0].split(","), r.split(","))) for r in rows[1:]]
    assert {"diloco/rounds", "diloco/bytes_sent", "diloco/pseudo_grad_norm", "diloco/wait_s"} <= set(head)
    rounds = [r for r in logged if r["diloco/rounds"]]
    assert [(r["step"], r["diloco/rounds"]) for r in rounds] == [("3", "1.0"), ("4", "1.0")]  # global steps
    assert all(float(r["diloco/pseudo_grad_norm"]) > 0 and float(r["diloco/bytes_sent"]) == 0 for r in rounds)


def test_lightning_callback_replaces_the_diloco_a_failed_fit_left_attached():
    """A fit that raised never reached on_fit_end: the next fit's DiLoCo replaces it, and one
    DiLoCo (not two) steps with the optimizer."""
    from lowcomm.integrations.lightning import DiLoCoCallback

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = types.SimpleNamespace(
        optimizers=[opt], strategy=types.SimpleNamespace(model=model), is_global_zero=True, loggers=[]
    )
    callback = DiLoCoCallback(LocalGroup.create(1)[0], sync_every=2)
    callback.on_fit_start(trainer, model)
    first = callback.diloco
    callback.on_fit_start(trainer, model)  # (the fit before it raised)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    assert callback.diloco is not first and (callback.diloco.step_count, first.step_count) == (1, 0)
    callback.on_fit_end(trainer, model)


def test_lightning_callback_warns_when_the_trainer_spans_replicas(caplog):
    """Under a launcher without replica_group() first, Lightning saw WORLD_SIZE and ran DDP across
    the replicas, all-reducing gradients every step; the HF callback said so, this one did not."""
    from lowcomm.integrations.lightning import DiLoCoCallback

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    callback = DiLoCoCallback(LocalGroup.create(1)[0], sync_every=2)
    for world_size in (1, 2):
        trainer = types.SimpleNamespace(
            optimizers=[opt], strategy=types.SimpleNamespace(model=model), world_size=world_size
        )
        with caplog.at_level(logging.WARNING, logger="lowcomm"):
            callback.on_fit_start(trainer, model)
        warned = "the Lightning Trainer sees 2 processes and wraps the model in DDP" in caplog.text
        assert warned == (world_size == 2) and ("before building the Trainer" in caplog.text) == warned
        callback.on_fit_end(trainer, model)


def test_lightning_callback_refuses_two_optimizers(tmp_path):
    import lightning.pytorch as pl

    from lowcomm.integrations.lightning import DiLoCoCallback

    class Two(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            return torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)

    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[DiLoCoCallback(LocalGroup.create(1)[0])],
    )
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(2, 2)))
    with pytest.raises(ValueError, match="DiLoCoCallback takes one optimizer, the module configured 2"):
        trainer.fit(Two(), loader)


def _hf_args(tmp_path, world_size=1):
    return types.SimpleNamespace(output_dir=str(tmp_path), world_size=world_size)


def test_hf_callback_refuses_a_resume_without_diloco_state_and_warns_of_ddp_and_best_models(tmp_path, caplog):
    from lowcomm.integrations.hf import DiLoCoTrainerCallback

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    callback = DiLoCoTrainerCallback(LocalGroup.create(1)[0], sync_every=2)
    (tmp_path / "checkpoint-7").mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"resuming at step 7 but .*checkpoint-7/diloco.pt does not exist"
    ):
        callback.on_train_begin(_hf_args(tmp_path), types.SimpleNamespace(global_step=7), None, model, opt)
    (tmp_path / "checkpoint-7" / "diloco.pt").write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(ValueError, match=r"checkpoint-7/diloco.pt: not a readable DiLoCo state"):
        callback.on_train_begin(_hf_args(tmp_path), types.SimpleNamespace(global_step=7), None, model, opt)
    with caplog.at_level(logging.WARNING, logger="lowcomm"):
        callback.on_train_begin(_hf_args(tmp_path, 2), types.SimpleNamespace(global_step=0), None, model, opt)
    assert "the HF Trainer sees 2 processes and wraps the model in DDP" in caplog.text
    assert "load_best_model_at_end" not in caplog.text and "report_to" not in caplog.text
    # reporters that log before the callback (it was not put first by add_to) are warned of
    reporting = types.SimpleNamespace(**vars(_hf_args(tmp_path)), report_to=["tensorboard", "wandb"])
    with caplog.at_level(logging.WARNING, logger="lowcomm"):
        callback.on_train_begin(reporting, types.SimpleNamespace(global_step=0), None, model, opt)
    assert "the reporters of report_to (tensorboard, wandb) log before DiLoCoTrainerCallback" in caplog.text
    best = types.SimpleNamespace(**vars(_hf_args(tmp_path)), load_best_model_at_end=True)
    with caplog.at_level(logging.WARNING, logger="lowcomm"):
        callback.on_train_begin(best, types.SimpleNamespace(global_step=0), None, model, opt)
    assert "load_best_model_at_end: when training ends the Trainer loads this replica's own" in caplog.text
    # a train() that raised never reached on_train_end: the next one replaces its DiLoCo
    first = callback.diloco
    callback.on_train_begin(_hf_args(tmp_path), types.SimpleNamespace(global_step=0), None, model, opt)
    assert callback.diloco is not first
    model(torch.ones(1, 2)).sum().backward()
    opt.step()  # one DiLoCo steps with the optimizer, not two
    assert (callback.diloco.step_count, first.step_count) == (1, 0)
    end = types.SimpleNamespace(global_step=1, log_history=[])
    callback.on_train_end(_hf_args(tmp_path), end, None)
    (final,) = end.log_history  # the final sync's round (the one step's progress), after the last log
    assert final["step"] == 1 and final["diloco/rounds"] == 1.0


def test_hf_callback_adds_each_log_s_rounds_for_the_reporters_and_the_history(tmp_path):
    """The HF callback gave the Trainer's reporters nothing (Lightning's gets every round): each
    log now carries the rounds since the one before, in trainer_state.json's history, and for the
    reporters where ``add_to`` put the callback before them (a recorder stands in for them)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from lowcomm.integrations.hf import DiLoCoTrainerCallback

    class Recorder(TrainerCallback):  # where the Trainer puts its reporters: before a user's callbacks
        seen: list = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.seen.append(dict(logs))

    class Regression(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, x, labels):
            return {"loss": torch.nn.functional.mse_loss(self.lin(x).squeeze(-1), labels)}

    torch.manual_seed(0)
    data = [{"x": torch.randn(4), "labels": torch.randn(())} for _ in range(72)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=18,
        per_device_train_batch_size=4,
        logging_steps=4,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    recorder = Recorder()
    callback = DiLoCoTrainerCallback(LocalGroup.create(1)[0], sync_every=4)
    trainer = Trainer(model=Regression(), args=args, train_dataset=data, callbacks=[recorder, callback])
    with pytest.raises(TypeError, match="add_to takes a transformers Trainer, not a TrainingArguments"):
        callback.add_to(args)
    assert callback.add_to(trainer) is trainer
    handler = trainer.callback_handler.callbacks
    assert handler[0] is callback and handler.count(callback) == 1 and recorder in handler
    trainer.train()
    steps = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in steps] == [4, 8, 12, 16]
    assert [e["diloco/rounds"] for e in steps] == [1.0] * 4  # a round at each 4th step, logged there
    # (one replica: it sends nothing, and its pseudo-gradient is the mean)
    assert all(e["diloco/pseudo_grad_norm"] > 0 and abs(e["diloco/cosine_to_mean"] - 1) < 1e-5 for e in steps)
    assert all(e["diloco/bytes_sent"] == 0 for e in steps)
    seen = [e for e in recorder.seen if "loss" in e]
    assert [e["diloco/rounds"] for e in seen] == [1.0] * 4
    # the final sync's round (steps 17-18) follows the Trainer's last log, in the history alone
    assert "train_runtime" in trainer.state.log_history[-2]  # (the Trainer's last log)
    last = trainer.state.log_history[-1]
    assert last["step"] == 18 and last["diloco/rounds"] == 1.0 and last["diloco/pseudo_grad_norm"] > 0


def test_diloco_steps_from_the_optimizer_inside_an_accelerate_loop():
    """A plain loop with accelerate (``Accelerator.prepare``) hands out an ``AcceleratedOptimizer``,
    which holds no step hooks of its own: DiLoCo over it failed with an AttributeError from inside
    torch. It now steps from the optimizer inside, so accelerate's gradient accumulation (no inner
    step until the last batch) counts optimizer steps: 8 batches, 2 to a step, 4 DiLoCo steps."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    model, opt = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    assert type(opt).__name__ == "AcceleratedOptimizer"
    diloco = DiLoCo(model, opt, LocalGroup.create(1)[0], sync_every=2).attach()
    for _ in range(8):
        with acc.accumulate(model):
            acc.backward(model(torch.randn(8, 4)).pow(2).mean())
            opt.step()
            opt.zero_grad()
    assert diloco.step_count == 4 and diloco.inner_optimizer is opt.optimizer
    diloco.detach()


def test_hf_callback_finds_the_optimizer_where_transformers_4_47_to_4_49_put_it(tmp_path):
    """Those releases hand callbacks optimizer=None and keep the Trainer's optimizer on the state:
    DiLoCo is built on it and steps after its step(); with no optimizer anywhere the callback says
    what to do."""
    from lowcomm.integrations.hf import DiLoCoTrainerCallback

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    callback = DiLoCoTrainerCallback(LocalGroup.create(1)[0], sync_every=2)
    state = types.SimpleNamespace(global_step=0, optimizer=opt)
    callback.on_train_begin(_hf_args(tmp_path), state, None, model, None)
    for _ in range(2):
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
    assert callback.diloco.inner_optimizer is opt and callback.diloco.step_count == 2
    callback.on_train_end(_hf_args(tmp_path), types.SimpleNamespace(global_step=2, log_history=[]), None)
    with pytest.raises(RuntimeError, match=r"handed its callbacks no optimizer.*optimizers=\(optimizer"):
        DiLoCoTrainerCallback(LocalGroup.create(1)[0]).on_train_begin(
            _hf_args(tmp_path), types.SimpleNamespace(global_step=0), None, model, None
        )


TOML = """
[job]
name = "other tables are left to their owners"

[diloco]
sync_every = 6
fragments = [["blocks.0", "blocks.1"], ["blocks.2", "wte", "wpe", "ln_f", "head"]]
overlap = 1
codec = "e3m0"
alpha = 0.5
"""


def test_a_toml_diloco_table_builds_the_wrapper_with_fragments_by_module_name(tmp_path):
    from lowcomm.integrations.titan import diloco_config_from_toml, diloco_from_toml

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, seq_len=8, n_layer=3, n_head=2, n_embd=16))
    names = [n for n, _ in model.named_parameters()]
    path = tmp_path / "job.toml"
    path.write_text(TOML)
    opt = torch.optim.AdamW(model.parameters())
    diloco = diloco_from_toml(model, opt, LocalGroup.create(1)[0], path)
    assert isinstance(diloco, DiLoCo) and diloco.sync_every == 6 and diloco.overlap == 1
    assert diloco.codec.name == "e3m0" and diloco.alpha == 0.5
    frags = diloco.fragment_names
    assert frags[0] == [n for n in names if n.startswith(("blocks.0.", "blocks.1."))]
    assert sorted(frags[0] + frags[1]) == sorted(names)
    fragments = [["blocks.0", "blocks.1"], ["blocks.2", "wte", "wpe", "ln_f", "head"]]
    expected = DiLoCoConfig(sync_every=6, fragments=fragments, overlap=1, codec="e3m0", alpha=0.5)
    assert diloco_config_from_toml(path) == expected


TORCHFT = """
[job]
description = "a torchtitan job file written for torchft"

[fault_tolerance]
enable = true
replica_id = 0
group_size = 2
semi_sync_method = "diloco"
sync_steps = 6
num_fragments = 3
module_fqns_per_model_fragment = [["blocks.0", "blocks.1"], ["blocks.2", "wte", "wpe", "ln_f", "head"]]
fragment_sync_delay = 1
fragment_update_alpha = 0.5
should_quantize = true
"""


def test_a_torchtitan_fault_tolerance_table_builds_the_wrapper_it_describes(tmp_path, caplog):
    """torchft's semi-sync keys (in a job file without a [diloco] table) mean the same here: its
    explicit fragments win over its count, should_quantize sends fp8, local_sgd averages the
    parameters (outer lr 1, no momentum); torchft's runtime keys are left alone and logged."""
    from lowcomm.integrations.titan import diloco_config_from_toml, diloco_from_toml

    path = tmp_path / "job.toml"
    path.write_text(TORCHFT)
    model = GPT(GPTConfig(vocab_size=32, seq_len=8, n_layer=3, n_head=2, n_embd=16))
    with caplog.at_level("INFO", logger="lowcomm.integrations.titan"):
        diloco = diloco_from_toml(model, None, LocalGroup.create(1)[0], path)
    assert "['enable', 'group_size', 'replica_id'] are torchft's runtime settings" in caplog.text
    fragments = [["blocks.0", "blocks.1"], ["blocks.2", "wte", "wpe", "ln_f", "head"]]
    assert diloco.config == DiLoCoConfig(
        sync_every=6, fragments=fragments, overlap=1, alpha=0.5, codec="fp8_e4m3"
    )
    assert diloco.num_fragments == 2 and diloco.outer_lr == 0.7 and diloco.outer_momentum == 0.9
    local_sgd = TORCHFT.replace('"diloco"', '"local_sgd"').replace("module_fqns_per_model_fragment", "# x")
    got = diloco_config_from_toml(tomllib.loads(local_sgd))
    assert (got.outer_lr, got.outer_momentum, got.fragments, got.sync_every) == (1.0, 0.0, 3, 6)
    both = TORCHFT + "\n[diloco]\nsync_every = 9\n"  # a [diloco] table is lowcomm's own: it wins
    caplog.clear()
    assert diloco_config_from_toml(tomllib.loads(both)) == DiLoCoConfig(sync_every=9)
    assert "semi_sync_method='diloco' and its semi-sync keys are not used" in caplog.text  # and says so


@pytest.mark.parametrize(
    "text,match",
    [
        ("[job]\nx = 1\n", r"has no \[diloco\] table \(nor a \[fault_tolerance\] table with a semi_sync"),
        ("[fault_tolerance]\nenable = true\n", r"has no \[diloco\] table"),
        (
            "[fault_tolerance]\nsemi_sync_method = 'hsdp'\n",
            r"semi_sync_method='hsdp' in \[fault_tolerance\] is not allowed: one of \['diloco', 'local_sgd",
        ),
        (
            "[fault_tolerance]\nsemi_sync_method = 'diloco'\nsync_step = 5\n",
            r"unknown key\(s\) \['sync_step'\] in \[fault_tolerance\]",
        ),
        (
            "[fault_tolerance]\nsemi_sync_method = 'diloco'\nsync_steps = 0\n",
            r"\[fault_tolerance\] \(sync_steps as sync_every\): sync_every=0",
        ),
        (  # a string: "false" would have been true
            "[fault_tolerance]\nsemi_sync_method = 'diloco'\nshould_quantize = 'false'\n",
            r"should_quantize='false' in \[fault_tolerance\] is not allowed: true or false",
        ),
        ("[diloco]\nsync_evry = 6\n", r"unknown key\(s\) \['sync_evry'\] in \[diloco\]; allowed: \["),
        (  # a name alone, not in a list, was taken letter by letter
            "[diloco]\nfragments = [['blocks.0'], 'blocks.1']\n",
            r"fragments\[1\]='blocks.1' is not allowed: a list of parameter names or modules, such as \['blo",
        ),
        ("[diloco]\ncodec = 'int3'\n", "codec='int3'"),
        ("[diloco\nsync_every = 6\n", r"config file '.*job.toml' is not valid TOML: Expected '\]'"),
        (
            "[diloco]\nfragments = [['blocks.9']]\n",
            "'blocks.9' is neither a trainable parameter nor a module",
        ),
    ],
)
def test_a_bad_toml_diloco_table_is_refused_naming_the_value(tmp_path, text, match):
    from lowcomm.integrations.titan import diloco_from_toml

    path = tmp_path / "job.toml"
    path.write_text(text)
    model = GPT(GPTConfig(vocab_size=32, seq_len=8, n_layer=3, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match=match):
        diloco_from_toml(model, None, LocalGroup.create(1)[0], path)


def test_a_replica_of_a_launcher_is_shown_its_own_gpu_only(monkeypatch, caplog):
    """On a machine with 8 GPUs (torch's GPU count and the CUDA runtime's stubbed: the rule, not
    the hardware), replica_group() shows each process of a launcher its own GPU, as the frameworks
    it hides the launcher from would otherwise take cuda:0 (Lightning) or wrap the model in
    DataParallel over all 8 (the HF Trainer). Where the CUDA runtime had already started and kept
    every GPU, the variable is put back, the GPU made current, and a warning says so."""
    from lowcomm.integrations import common

    runtime_sees, current = [1], []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch._C, "_cuda_getDeviceCount", lambda: runtime_sees[0], raising=False)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")  # a lone process: nothing to place
    common._own_gpus()
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_RANK", "11")
    common._own_gpus()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3" and not current  # 11 % 8
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # a job given 4 GPUs by name
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a, GPU-b,GPU-c,GPU-d")
    monkeypatch.setenv("LOCAL_RANK", "6")
    common._own_gpus()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-c"
    runtime_sees[0] = 4  # the runtime started before the call: the GPUs it sees are fixed
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a,GPU-b,GPU-c,GPU-d")
    with caplog.at_level("WARNING", logger="lowcomm.integrations.common"):
        common._own_gpus()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-a,GPU-b,GPU-c,GPU-d" and current == [2]
    assert "CUDA had started before replica_group()" in caplog.text


def test_replica_group_in_a_lone_process_is_a_group_of_one_and_hides_the_launcher(monkeypatch):
    from lowcomm.integrations import common, replica_group

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(common, "HIDDEN", {})
    group = replica_group()
    assert group.size == 1 and group.rank == 0
    assert "RANK" not in os.environ and common.HIDDEN["RANK"] == "0"
    monkeypatch.setenv("LOWCOMM_PROCS_PER_REPLICA", "2")
    with pytest.raises(ValueError, match=r"LOWCOMM_PROCS_PER_REPLICA=2 must be >= 1 and divide WORLD_SIZE=1"):
        replica_group()
    monkeypatch.setenv("LOWCOMM_PROCS_PER_REPLICA", "two")
    with pytest.raises(ValueError, match=r"LOWCOMM_PROCS_PER_REPLICA='two' is not an integer"):
        replica_group()
    # one replica of two processes: the launcher's job is the replica's, left as it is
    monkeypatch.setenv("LOWCOMM_PROCS_PER_REPLICA", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    group = replica_group()
    assert group.size == 1 and os.environ["RANK"] == "1" and os.environ["WORLD_SIZE"] == "2"


def test_replicas_resuming_from_different_steps_are_refused_before_diloco_is_built():
    """A replica with no checkpoint among replicas that resume (a job resumed with more replicas
    than it saved) is refused naming the steps; a Lightning job so resumed hung until its group's
    timeout (the new replica broadcast its weights to replicas that never entered the broadcast)."""
    from lowcomm.integrations.common import check_same_start

    groups = LocalGroup.create(3)
    check_same_start(groups[0], {"version": 2, "step": 32, "config": {}})
    check_same_start(groups[1], {"version": 2, "part 0 of 2": {"step": 32}, "part 1 of 2": {"step": 32}})
    with pytest.raises(ValueError) as e:
        check_same_start(groups[2], None)
    assert str(e.value).startswith(
        "replica(s) [2] differ from replica 0 in the DiLoCo step each resumes from: "
        "{'step': {'replica 0': 32, 'replica 2': None}} (None: no checkpoint, a fresh start): resume every"
    )


def test_resume_checkpoint_finds_the_newest_step_a_replica_holds_and_passes_over_a_torn_one(tmp_path, caplog):
    """The layouts of both frameworks, read by the DiLoCo state inside: Lightning's ``*.ckpt``
    files at any depth (a step's own file before last.ckpt) and the HF Trainer's ``checkpoint-N``
    folders (the folder is returned). A torn file is passed over with a warning; a folder with no
    checkpoint is a fresh start. (Across replicas, under a launcher: the examples' tests.)"""
    from lowcomm.integrations import resume_checkpoint

    group = LocalGroup.create(1)[0]
    assert resume_checkpoint(group, tmp_path / "nothing") is None
    pl_dir = tmp_path / "pl" / "version_0" / "checkpoints"
    pl_dir.mkdir(parents=True)
    for step in (8, 16):
        ckpt = {"global_step": step, "callbacks": {"DiLoCoCallback": {"version": 2, "step": step}}}
        torch.save(ckpt, pl_dir / f"epoch={step // 8 - 1}-step={step}.ckpt")
    shutil.copyfile(pl_dir / "epoch=1-step=16.ckpt", pl_dir / "last.ckpt")
    (pl_dir / "epoch=2-step=24.ckpt").write_bytes(b"PK\x03\x04 torn")  # killed while writing
    torch.save(torch.zeros(2), pl_dir / "weights.ckpt")  # a file of another kind: not one of ours
    with caplog.at_level(logging.WARNING, logger="lowcomm.integrations.common"):
        assert resume_checkpoint(group, tmp_path / "pl") == str(pl_dir / "epoch=1-step=16.ckpt")
    assert "epoch=2-step=24.ckpt: not read" in caplog.text and "passed over" in caplog.text
    for step in (24, 48):  # the HF Trainer's, the later one of two processes' parts
        (tmp_path / "hf" / f"checkpoint-{step}").mkdir(parents=True)
        state = {"version": 2, "part 0 of 2": {"step": step}, "part 1 of 2": {"step": step}}
        torch.save(state, tmp_path / "hf" / f"checkpoint-{step}" / "diloco.pt")
    assert resume_checkpoint(group, tmp_path / "hf") == str(tmp_path / "hf" / "checkpoint-48")


class _Gathered:
    """A replica's view of resume_checkpoint's one collective: the others' answers, given."""

    def __init__(self, rank: int, answers: list):
        self.rank, self.size, self.answers = rank, len(answers), answers

    def all_gather_json(self, mine):
        return [mine if r == self.rank else a for r, a in enumerate(self.answers)]


def test_a_replica_without_checkpoints_resumes_from_the_first_holder_s_or_names_what_it_cannot_read(
    tmp_path, caplog
):
    """A replica added to a resumed job (or killed before its first checkpoint) takes the
    checkpoint of the step the others resume from of the first replica holding it, which it must
    be able to read; replicas holding checkpoints with no step in common are still refused."""
    from lowcomm.integrations import common, resume_checkpoint

    common.CHOSEN["path"] = "/a/path/a/call/before/chose"
    assert resume_checkpoint(_Gathered(0, [{}, {}]), tmp_path / "replica0") is None  # (a fresh start)
    assert common.CHOSEN == {}
    held = tmp_path / "replica1" / "epoch=0-step=16.ckpt"
    held.parent.mkdir()
    held.write_bytes(b"(replica 1's)")
    answers = [
        {"16": "/elsewhere/replica0/epoch=0-step=16.ckpt", "32": "/elsewhere/x.ckpt"},
        {"16": str(held)},
        {},
    ]
    with caplog.at_level(logging.WARNING, logger="lowcomm.integrations.common"):
        assert resume_checkpoint(_Gathered(2, [{}, answers[1], {}]), tmp_path / "replica2") == str(held)
    assert common.CHOSEN["path"] == str(held)
    assert (
        f"replica 2 holds no checkpoint in {tmp_path / 'replica2'}: it resumes from replica 1's"
        in caplog.text
    )
    with pytest.raises(ValueError) as e:  # (replica 0's folder is on another node's disk)
        resume_checkpoint(_Gathered(2, answers), tmp_path / "replica2")
    assert str(e.value) == (
        f"replica 2 holds no checkpoint in {tmp_path / 'replica2'} and would resume from replica 0's of "
        "step 16, /elsewhere/replica0/epoch=0-step=16.ckpt, which this process cannot read: put the "
        "replicas' folders where every node reads them, or copy that checkpoint into this replica's folder"
    )
    with pytest.raises(ValueError, match=r"replica 0 \[32\], replica 1 \[16\], replica 2 none\)"):
        resume_checkpoint(_Gathered(2, [{"32": "/x"}, {"16": "/y"}, {}]), tmp_path / "replica2")


def test_the_newest_common_step_is_the_newest_all_hold_or_names_each_ones_steps():
    """The one rule of both resumes (the trainer's processes, the integrations' replicas)."""
    from lowcomm._checks import newest_common_step

    assert newest_common_step([[90, 80, 70], [70, 60], [80, 70]], "rank") == 70
    with pytest.raises(ValueError) as e:
        newest_common_step([[90, 80], [70, 60], []], "replica")
    want = "on every replica (replica 0 [80, 90], replica 1 [60, 70], replica 2 none)"
    assert str(e.value) == "no step has a checkpoint " + want
    # (skip_empty: those that hold none take another's checkpoint; the message names them still)
    assert newest_common_step([[90, 80], [], [80, 70]], "replica", skip_empty=True) == 80
    with pytest.raises(ValueError) as e:
        newest_common_step([[90, 80], [70, 60], []], "replica", skip_empty=True)
    assert str(e.value) == "no step has a checkpoint " + want


def test_replica_group_called_again_returns_the_group_it_joined_and_meets_again_after_a_restart(tmp_path):
    """Two replicas under torchrun --max-restarts 1, each calling replica_group() twice (a
    notebook cell run again, a second fit): the second call read the launcher's variables the
    first had hidden and made a group of one replica that never synced, without a word. Now it
    returns the same group, whose collectives still reach the other replica. Rank 1 is then
    killed and torchrun starts the job again: the groups met in torchrun's store under the keys
    of the attempt before, a dead process's address, and the restart failed or hung now and then
    (4 in 6 of a plain torch script); each attempt now has keys of its own."""
    script = tmp_path / "twice.py"
    script.write_text(
        "import json, os, pathlib, signal, sys, torch\n"
        "from lowcomm.integrations import replica_group\n"
        "first, again = replica_group(), replica_group()\n"
        "t = torch.tensor([float(first.rank + 1)])\n"
        "again.broadcast_(t)  # replica 0's value, on both\n"
        "result = {'same': first is again, 'size': again.size, 'value': t.item()}\n"
        "attempt = os.environ['TORCHELASTIC_RESTART_COUNT']\n"
        "pathlib.Path(sys.argv[1], f'r{first.rank}-{attempt}.json').write_text(json.dumps(result))\n"
        "if attempt == '0' and first.rank == 1:\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "if attempt == '0':\n"
        "    again.broadcast_(t)  # (waits for rank 1, which is gone: torchrun stops this one)\n"
    )
    from helpers import torchrun

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    (res,) = torchrun(2, "--max-restarts", "1", str(script), str(tmp_path), timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    for attempt in (0, 1):
        results = [json.loads((tmp_path / f"r{r}-{attempt}.json").read_text()) for r in range(2)]
        assert results == [{"same": True, "size": 2, "value": 1.0}] * 2, (attempt, results)
    assert "connectFullMesh" not in res.stderr


def test_a_replica_of_several_processes_takes_the_frameworks_ddp_over_its_own_processes(monkeypatch):
    """DiLoCo's shard_group inside a framework: None with one process a replica; with two, the
    framework's DDP over the replica's 2 processes, else a one-line refusal naming what it got."""
    from lowcomm.integrations.common import replica_shard_group

    monkeypatch.delenv("LOWCOMM_PROCS_PER_REPLICA", raising=False)
    assert replica_shard_group("FSDPStrategy", False) is None
    monkeypatch.setenv("LOWCOMM_PROCS_PER_REPLICA", "2")
    # no process group (Trainer(devices=1), or replica_group() not called): named first
    with pytest.raises(
        ValueError, match="the framework's job is 1 process where a replica is 2 .*give it 2 devices"
    ):
        replica_shard_group("SingleDeviceStrategy", False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(
        ValueError, match="inside it, where each process holds the whole model; FSDPStrategy is not"
    ):
        replica_shard_group("FSDPStrategy", False)
    assert replica_shard_group("DDPStrategy", True) is torch.distributed.group.WORLD


@pytest.mark.parametrize(
    "rank, k, local_rank, local_world, seen",
    [
        # lowcomm launch: one machine, 2 replicas of 2; rank 3 is replica 1's second process
        (3, 2, 3, 4, dict(RANK=1, WORLD_SIZE=2, LOCAL_RANK=1, LOCAL_WORLD_SIZE=2, GROUP_RANK=0)),
        # torchrun, 8 processes a machine, replicas of 4: two replicas a machine (rank 13: machine 1)
        (13, 4, 5, 8, dict(RANK=1, WORLD_SIZE=4, LOCAL_RANK=1, LOCAL_WORLD_SIZE=4, GROUP_RANK=0)),
        # replicas of 16 over two machines of 8: rank 27 is on replica 1's second machine
        (27, 16, 3, 8, dict(RANK=11, WORLD_SIZE=16, LOCAL_RANK=3, LOCAL_WORLD_SIZE=8, GROUP_RANK=1)),
    ],
)
def test_a_process_of_a_replica_of_several_sees_the_replicas_job(rank, k, local_rank, local_world, seen):
    from lowcomm.integrations.common import replica_env

    env = replica_env(rank, k, local_rank, local_world)
    assert {name: int(env[name]) for name in seen} == seen
    assert env["NODE_RANK"] == env["GROUP_RANK"] and env["ROLE_RANK"] == env["RANK"]
    assert int(env["GROUP_WORLD_SIZE"]) * int(env["LOCAL_WORLD_SIZE"]) == k
    assert env["TORCHELASTIC_USE_AGENT_STORE"] == "False"  # (the replica's rendezvous is its own)


def test_replicas_that_would_share_machines_unevenly_are_refused():
    """Replicas of 3 on machines of 4: replica 1 would be one process on the first machine and two
    on the second, which no framework numbers right."""
    from lowcomm.integrations.common import replica_env

    with pytest.raises(ValueError, match="replicas of 3 processes .* on machines of 4 .*fill whole machines"):
        replica_env(4, 3, 0, 4)


def test_a_replica_of_several_processes_is_shown_its_gpus_on_the_machine(monkeypatch, caplog):
    """The replica's processes here are shown the GPUs they hold (a framework then takes
    cuda:LOCAL_RANK of them); where they would share GPUs, the GPUs are left as they are."""
    from lowcomm.integrations import common

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch._C, "_cuda_getDeviceCount", lambda: 4, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    common._own_gpus(4, 4)  # replica 1 of two a machine
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with caplog.at_level("WARNING", logger="lowcomm.integrations.common"):
        common._own_gpus(0, 4)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1" and "share this machine's 2 GPUs" in caplog.text
