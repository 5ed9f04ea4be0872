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
# tests fill it. Those tests stay one after the other, in one worker (one xdist group), and go
# first, being the longest unit of work: two of them at once would put ten processes on two cores.
# (The control plane's tests and the hardening ones start a coordinator and a worker or two each:
# they share the other worker.) A test that takes its worker down (a crash in compiled code, an
# os._exit) ends the run, reported as failed, instead of a new worker taking over: pytest-xdist
# 3.8's loadgroup hangs after it replaces a crashed worker (pytest-dev/pytest-xdist#1327, #1378;
# measured here: 3 runs of 3 hung), and CI would wait for its time-out. `--max-worker-restart N`
# on the command line chooses otherwise.
WORKERS = 2
PROCESS_HEAVY = {"test_elastic.py", "test_distributed.py", "test_faults.py"}


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:  # a worker parses the command line anew: the groups come in workerinput
        if workerinput.get("lowcomm_groups"):
            config.option.loadgroup = True
        return
    if not config.pluginmanager.hasplugin("xdist"):
        return
    if config.getoption("numprocesses", None) is None and not config.getoption("collectonly"):
        config.option.numprocesses = WORKERS
        config.option.dist = "loadgroup"
        if config.getoption("maxworkerrestart", None) is None:
            config.option.maxworkerrestart = 0


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """xdist's controller, for each worker: it groups the tests when this file chose the workers."""
    node.workerinput["lowcomm_groups"] = node.config.getvalue("dist") == "loadgroup"


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups off the marks
def pytest_collection_modifyitems(config, items):
    if config.pluginmanager.hasplugin("xdist"):  # (without it the mark would be an unknown one)
        for item in items:
            if item.path.name in PROCESS_HEAVY:
                item.add_marker(pytest.mark.xdist_group("processes"))
    items.sort(key=lambda item: item.path.name not in PROCESS_HEAVY)  # stable: the files' order kept
