import os

import pytest
import torch

# Triton kernels run in the interpreter on CPU-only machines (CI): set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny models gain nothing from intra-op threads, and on a 2-core CI machine threads that spin while
# another process computes make tests slower by an order of magnitude.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep corpora built by tests out of the user's cache, shared across the session."""
    monkeypatch.setenv(
        "LOWCOMM_CACHE", os.environ.get("LOWCOMM_TEST_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    )


# The suite runs in two pytest-xdist workers where xdist is installed (the dev extra) and the
# command line does not choose (`-n 0` runs it in one process): on CI's 2 cores the tests that
# start several processes of their own leave a core idle much of the time, and the single-process
# tests fill it. Those tests stay one after the other, in one worker (one xdist group), as they
# ran before: two of them at once would put ten processes on two cores.
WORKERS = 2
PROCESS_HEAVY = {
    "test_elastic.py",
    "test_distributed.py",
    "test_faults.py",
    "test_hardening.py",
    "test_control_plane.py",
}


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    if hasattr(config, "workerinput") or not config.pluginmanager.hasplugin("xdist"):
        return
    if config.getoption("numprocesses", None) is None and not config.getoption("collectonly"):
        config.option.numprocesses = WORKERS
        config.option.dist = "loadgroup"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in PROCESS_HEAVY:
            item.add_marker(pytest.mark.xdist_group("processes"))
