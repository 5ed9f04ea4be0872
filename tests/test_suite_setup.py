"""The suite's own set-up (tests/conftest.py), run as pytest runs it: in a pytest of its own."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("xdist")  # the dev extra installs it; without it conftest chooses no workers


def test_a_test_that_takes_its_worker_down_fails_the_run_instead_of_hanging_it(tmp_path):
    # The process-heavy group and a test that kills its process (as a crash in compiled code does),
    # run by this suite's conftest: two workers, loadgroup. With pytest-xdist 3.8 replacing the
    # crashed worker, such a run hung; conftest turns restarts off, so it ends, the test named.
    tests = tmp_path / "tests"
    tests.mkdir()
    shutil.copy(Path(__file__).with_name("conftest.py"), tests / "conftest.py")
    grouped = "def test_grouped_1():\n    pass\n\ndef test_grouped_2():\n    pass\n"
    (tests / "test_faults.py").write_text(grouped)
    (tests / "test_crash.py").write_text(
        "import os\n\ndef test_before():\n    pass\n\n"
        "def test_takes_its_worker_down():\n    os._exit(3)\n\ndef test_after():\n    pass\n"
    )
    (tmp_path / "pyproject.toml").write_text('[tool.pytest.ini_options]\ntestpaths = ["tests"]\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = run.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        out, _ = run.communicate()
        pytest.fail(f"the run hung after its worker crashed (killed after 120 s):\n{out[-3000:]}")
    assert run.returncode == 1, out[-3000:]
    assert "crashed while running 'tests/test_crash.py::test_takes_its_worker_down'" in out, out[-3000:]
    assert "1 failed" in out, out[-3000:]
