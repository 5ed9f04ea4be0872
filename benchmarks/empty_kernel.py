"""An empty Triton kernel, for what a launch costs the host (common.empty_launches). In a module of
its own: Triton (3.2 at least) resolves the names a kernel uses, ``tl`` among them, in its module's
globals, not in the function that defines it."""

import triton
import triton.language as tl


@triton.jit
def empty(ptr, BLOCK: tl.constexpr):
    tl.store(ptr + tl.arange(0, BLOCK), tl.zeros([BLOCK], dtype=tl.float32))
