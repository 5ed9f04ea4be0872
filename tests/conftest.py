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
