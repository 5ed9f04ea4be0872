"""How long a call takes the GPU alone, where calling it costs the host more than running it.

triton.testing.do_bench times each call between two events on the stream, with no wait between
calls. Where a call's launches and allocations take the host longer than its kernels take the
GPU (small tensors; a few launches a call), the GPU reaches the first event and then waits for
the host to queue the rest: the time measured is the host's. :func:`gpu_ms` first holds the GPU
with a spin kernel (``torch.cuda._sleep``) long enough for the host to queue every timed call,
so the GPU runs them back to back, and checks that it did: the GPU must still be held when the
last call is queued (the event after the spin not yet reached); else the hold is made longer.
"""

from __future__ import annotations

import time

import torch

__all__ = ["gpu_ms", "SLEEP_HZ", "FLUSH_BYTES"]

#: the GPU clock taken to turn seconds into torch.cuda._sleep's cycles (H100/H200 boost at most
#: 1.98 GHz: a slower clock only holds the GPU longer)
SLEEP_HZ = 2e9
#: what is written before each call to empty the L2 cache (as do_bench does: 256 MB, more than any
#: GPU's L2), so that each call reads its inputs from memory
FLUSH_BYTES = 256 << 20
#: tries, each holding the GPU 4x longer than the last
TRIES = 3


def gpu_ms(fn, calls: int = 20, *, quantiles=None, cuda=torch.cuda, device="cuda", flush_bytes=FLUSH_BYTES):
    """Milliseconds ``fn`` takes the GPU, the median of ``calls`` calls run back to back (each
    after an L2 flush, not timed), or with ``quantiles`` those quantiles (do_bench's interface:
    what Triton's autotuner asks for). ``fn`` is called once first (compiled, its memory cached).

    The hold starts at twice the host's time for ``calls`` calls, as the first call took it (at
    least 1 ms). RuntimeError if the host could not queue them within the hold in ``TRIES`` tries.
    ``cuda``, ``device``: torch.cuda and the device (a test's stand-ins)."""
    flush = torch.empty(flush_bytes, dtype=torch.int8, device=device)
    fn()
    cuda.synchronize()
    t0 = time.perf_counter()
    flush.zero_()
    fn()
    host_s = time.perf_counter() - t0  # the host's share of one call (the GPU runs meanwhile)
    cuda.synchronize()
    hold_s = max(2 * calls * host_s, 1e-3)
    for _ in range(TRIES):
        starts = [cuda.Event(enable_timing=True) for _ in range(calls)]
        ends = [cuda.Event(enable_timing=True) for _ in range(calls)]
        held = cuda.Event()
        cuda._sleep(int(hold_s * SLEEP_HZ))
        held.record()
        for start, end in zip(starts, ends):
            flush.zero_()
            start.record()
            fn()
            end.record()
        ahead = not held.query()  # every call queued while the GPU was still held
        cuda.synchronize()
        if ahead:
            times = torch.tensor([s.elapsed_time(e) for s, e in zip(starts, ends)], dtype=torch.float64)
            if quantiles is not None:
                return torch.quantile(times, torch.tensor(quantiles, dtype=torch.float64)).tolist()
            return float(times.median())
        hold_s *= 4
    raise RuntimeError(f"gpu_ms: the host could not queue {calls} calls within a {hold_s / 4:.3f} s hold")
