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


def _launch(script: str, out: Path, *flags: str, replicas: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lowcomm", "launch", "--replicas", str(replicas), "--"]
    cmd += [sys.executable, str(EXAMPLES / script), "--out", str(out), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def _results(out: Path, replicas: int = 2) -> list[dict]:
    return [json.loads((out / f"replica{r}" / "result.json").read_text()) for r in range(replicas)]


@pytest.mark.parametrize("script", ["lightning_diloco.py", "hf_diloco.py"])
def test_an_example_changes_at_most_five_lines_of_the_plain_script(script):
    marked = [line for line in (EXAMPLES / script).read_text().splitlines() if "# DiLoCo" in line]
    code = [line for line in marked if not line.lstrip().startswith(("#", '"', "`")) and "``" not in line]
    assert 1 <= len(code) <= 5, code


def test_lightning_example_trains_two_replicas_and_resumes_bit_for_bit(tmp_path):
    """Three epochs; then from the checkpoint of epoch 2 (a round in flight: overlap=1), epoch 3
    again: the same bits as the uninterrupted run, so DiLoCo's state (restored by Lightning before
    the optimizer exists) came back whole."""
    out = tmp_path / "run"
    _launch("lightning_diloco.py", out, "--epochs", "3")
    first = _results(out)
    assert first[0]["global_step"] == 48 and first[0]["params"] == first[1]["params"]  # final sync
    for r in range(2):  # resume from the end of epoch 2: "last" is made that checkpoint
        ckpts = out / f"replica{r}" / "checkpoints"
        (ckpts / "last.ckpt").unlink()
        shutil.copyfile(ckpts / "epoch=1-step=32.ckpt", ckpts / "last.ckpt")
    _launch("lightning_diloco.py", out, "--epochs", "3", "--resume")
    again = _results(out)
    assert [a["params"] for a in again] == [f["params"] for f in first]


def test_hf_example_trains_two_replicas_unwrapped_and_resumes_bit_for_bit(tmp_path):
    """48 steps with checkpoints at 24 and 48; then from checkpoint-24 again: the same bits. The
    Trainer saw one process (no DDP) and every replica saved its checkpoints, model included."""
    out = tmp_path / "run"
    _launch("hf_diloco.py", out, "--steps", "48", "--save-every", "24")
    first = _results(out)
    assert all(f["world_size"] == 1 and f["wrapped"] == "GPT2LMHeadModel" for f in first)
    assert first[0]["global_step"] == 48 and first[0]["params"] == first[1]["params"]
    for r in range(2):
        folder = out / f"replica{r}" / "checkpoint-24"
        assert (folder / "diloco.pt").exists() and (folder / "model.safetensors").exists()
        shutil.rmtree(out / f"replica{r}" / "checkpoint-48")
    _launch("hf_diloco.py", out, "--steps", "48", "--save-every", "24", "--resume")
    again = _results(out)
    assert [a["params"] for a in again] == [f["params"] for f in first]


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
        logger=False,
        callbacks=[callback],
    )
    trainer.fit(Regressor(), data(seed=0))  # 16 batches: 4 optimizer steps
    assert trainer.global_step == 4 and callback.diloco.step_count == 4
    assert len(callback.diloco.drain_round_stats()) == 2  # rounds at steps 3 and the final sync


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


def test_hf_callback_refuses_a_resume_without_diloco_state_and_warns_under_ddp(tmp_path, caplog):
    from lowcomm.integrations.hf import DiLoCoTrainerCallback

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    callback = DiLoCoTrainerCallback(LocalGroup.create(1)[0], sync_every=2)
    (tmp_path / "checkpoint-7").mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"resuming at step 7 but .*checkpoint-7/diloco.pt does not exist"
    ):
        callback.on_train_begin(_hf_args(tmp_path), types.SimpleNamespace(global_step=7), None, model, opt)
    with caplog.at_level(logging.WARNING, logger="lowcomm"):
        callback.on_train_begin(_hf_args(tmp_path, 2), types.SimpleNamespace(global_step=0), None, model, opt)
    assert "the HF Trainer sees 2 processes and wraps the model in DDP" in caplog.text
    callback.on_train_end(_hf_args(tmp_path), None, None)


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
    callback.on_train_end(_hf_args(tmp_path), None, None)
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
    assert diloco_config_from_toml(tomllib.loads(both)) == DiLoCoConfig(sync_every=9)


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
        ("[diloco]\nsync_evry = 6\n", r"unknown key\(s\) \['sync_evry'\] in \[diloco\]; allowed: \["),
        ("[diloco]\ncodec = 'int3'\n", "codec='int3'"),
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
    common._own_gpu_only()
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_RANK", "11")
    common._own_gpu_only()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3" and not current  # 11 % 8
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # a job given 4 GPUs by name
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a, GPU-b,GPU-c,GPU-d")
    monkeypatch.setenv("LOCAL_RANK", "6")
    common._own_gpu_only()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-c"
    runtime_sees[0] = 4  # the runtime started before the call: the GPUs it sees are fixed
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a,GPU-b,GPU-c,GPU-d")
    with caplog.at_level("WARNING", logger="lowcomm.integrations.common"):
        common._own_gpu_only()
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
    with pytest.raises(
        ValueError, match="LOWCOMM_PROCS_PER_REPLICA=2: the integrations take one process per replica"
    ):
        replica_group()
