"""The example scripts a user copies from run as documented (real processes on 127.0.0.1)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *args: str) -> str:
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=240
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_embed_local_keeps_replicas_identical_and_learns(caplog):
    spec = importlib.util.spec_from_file_location("embed_local", EXAMPLES / "embed_local.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    torch.set_num_threads(1)
    with caplog.at_level("WARNING", logger="lowcomm"):
        result = example.main()
    assert len(result["digests"]) == 4 and len(set(result["digests"])) == 1  # bitwise-identical globals
    assert result["loss_end"] < 0.5 * result["loss_start"]
    assert not caplog.records, caplog.text  # the README's example warns of nothing (it did: uneven fragments)


def test_a_users_own_elastic_loop_gets_the_fault_plan_and_the_guards():
    out = _run("embed_elastic.py", "--steps", "60")
    # the demo plan corrupts w1's payload in round 2: every worker excluded it, by name
    assert "{'2': {'w1': 'corrupt payload" in out
    assert "w1: loss" in out and "faults ['corrupt']" in out and "faults ['slow-link']" in out
    assert "all workers hold identical global parameters and BatchNorm statistics" in out
