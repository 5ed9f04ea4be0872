"""Compile lowcomm's Triton kernels for a GPU that is not here, and read what the compiler made.

Triton compiles ahead of time for any target: ``triton.compile`` lowers a kernel to PTX and the
``ptxas`` shipped in the triton wheel assembles it to a cubin, with no GPU and no driver. That
answers, on a CPU machine, questions that otherwise wait for a GPU session: does the kernel
compile for sm_90a / sm_100a at the configuration it launches with, how many registers does a
thread take, does anything spill (registers to the stack frame, in local memory), how much
shared memory does the pipeline need, and which MMA instructions were issued (``wgmma`` on
Hopper; ``mma.sync`` would mean the tensor cores of the previous generation). It says nothing
about speed.

    python -m lowcomm.kernels.triton_static --arch 90 --arch 100      # JSON lines
    python benchmarks/kernels.py --static                              # the same into a JSON file

Each kernel module lists what it launches in ``static_specs()``; :func:`compile_report` compiles
one of them. Not under ``TRITON_INTERPRET=1``: the interpreter's kernels are Python, not IR.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

__all__ = ["KernelSpec", "compile_report", "all_specs", "report", "blocks_per_sm", "SM_SHARED_BYTES"]

# shared memory one block may use (opt-in maximum): H100/H200 227 KB, B200 227 KB
SM_SHARED_BYTES = {90: 227 * 1024, 100: 227 * 1024}
# what one SM of sm_90 and sm_100 holds at once (docs/references.md, "FP8 on Hopper")
SM_REGISTERS = 65536  # 32-bit registers
SM_THREADS = 2048
SM_BLOCKS = 32
SM_SHARED_TOTAL = 228 * 1024  # bytes of shared memory, of which each block also takes:
BLOCK_SHARED_RESERVED = 1024
#: the oldest triton that compiles for Blackwell (sm_100)
BLACKWELL_TRITON = (3, 3)


@dataclass
class KernelSpec:
    """One kernel at one launch configuration, as the library launches it on CUDA.

    ``signature`` maps every non-constexpr argument to a Triton type ("*fp8e4nv", "i32", ...)
    (a constexpr one may be left out or typed "constexpr");
    ``constexprs`` holds the constexpr arguments and any integer argument the launch specializes
    (Triton specializes an int equal to 1, e.g. a unit stride). Pointers and the ints named in
    ``aligned`` are taken as multiples of 16, as Triton's launcher marks them when they are.
    """

    name: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    aligned: tuple = field(default_factory=tuple)


def _ast_source(ASTSource, spec: KernelSpec, attrs: dict):
    """The kernel's source for triton.compile: ``attrs`` maps ``(index,)`` to its properties (triton
    >= 3.3); triton 3.2 takes the constexprs as ``constants`` and the properties as an
    AttrsDescriptor."""
    import inspect

    # every argument in the kernel's order, a constexpr one typed so (triton 3.3 indexes the
    # signature by argument position: one that leaves a constexpr out fails to compile there)
    signature = {name: spec.signature.get(name, "constexpr") for name in spec.fn.arg_names}
    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:
        return ASTSource(fn=spec.fn, signature=signature, constexprs=spec.constexprs, attrs=attrs)
    from triton.backends.compiler import AttrsDescriptor

    desc = AttrsDescriptor()
    desc.arg_properties["tt.divisibility"] = [index for (index,) in attrs]
    desc._init_slots()
    return ASTSource(fn=spec.fn, signature=signature, constants=spec.constexprs, attrs=desc)


def _bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    """What ``cuobjdump <flag>`` prints about a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run(
            [_bin("cuobjdump"), flag, f.name], capture_output=True, text=True, check=True
        ).stdout


def _resources(cubin: bytes) -> dict:
    """Registers, local and stack bytes per thread from ``cuobjdump``. ptxas puts the registers it
    spills in the thread's stack frame (``STACK``), not in ``LOCAL`` (a kernel's own local arrays):
    :func:`_spill_instructions` counts the spills themselves."""
    got = dict(re.findall(r"\b(REG|LOCAL|STACK):(\d+)", _cuobjdump(cubin, "--dump-resource-usage")))
    return {
        "registers": int(got.get("REG", -1)),
        "local_bytes": int(got.get("LOCAL", -1)),
        "stack_bytes": int(got.get("STACK", -1)),
    }


def _spill_instructions(sass: str) -> int:
    """Local-memory loads and stores (``LDL``, ``STL``) in the SASS: a Triton kernel has no local
    arrays of its own, so these are registers spilled and read back (static count)."""
    return len(re.findall(r"\b(?:LDL|STL)(?:\.\w+)*\s", sass))


def _sass_instructions(sass: str) -> int:
    """Machine instructions in a kernel's code (``cuobjdump -sass``), a static count (a branch
    not taken counts too, a loop's body once): for a quantize kernel without loops, divided by the
    elements a thread holds, about what each element costs the SMs' issue slots. An H200 (132 SMs,
    four warp instructions a clock each at up to 1.98 GHz: 3.3e13 thread instructions a second)
    copying bf16 at the 4.0 TB/s measured there moves 1e12 elements a second: 33 instructions an
    element keep pace with a copy."""
    return len(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?[A-Z][A-Z0-9_.]*", sass))


def blocks_per_sm(registers: int, num_warps: int, shared_bytes: int) -> int:
    """How many blocks of a kernel one SM holds at once (sm_90 / sm_100), by its registers (a
    thread's count rounded up to a multiple of 8, as they are allocated), its threads and its shared
    memory: 0 means a block cannot launch. A memory-bound kernel's reads in flight are what the
    resident warps have issued, so few warps an SM, each waiting on its own load, leave the memory
    system idle between them."""
    threads = 32 * num_warps
    by_registers = SM_REGISTERS // (-(-registers // 8) * 8 * threads)
    by_shared = SM_SHARED_TOTAL // (shared_bytes + BLOCK_SHARED_RESERVED)
    return min(by_registers, SM_THREADS // threads, SM_BLOCKS, by_shared)


def _mma_kind(ptx: str) -> str | None:
    """The first tensor-core instruction with its shape and types, e.g.
    ``wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3``."""
    m = re.search(r"\b(tcgen05\.mma[\w.:]*|wgmma\.mma_async[\w.]*|mma\.sync[\w.]*)", ptx)
    return m.group(1) if m else None


_WIDTH = re.compile(r"\bst\.global(?:\.\w+)*?(?:\.v(\d))?\.[bsuf](\d+)\b")


def _sync_and_stores(ptx: str) -> dict:
    """What a memory-bound kernel's PTX costs beyond its loads: ``async_copies`` (``cp.async``
    global-to-shared copies: a loop the compiler pipelined, its next reads issued before its
    arithmetic), ``barriers`` (CTA-wide ``bar.sync``), ``shuffles`` (``shfl.sync``: values moved
    between a warp's threads) and ``global_stores`` ({bytes per thread per store instruction: how
    many}; 16 is a whole 16-byte packet). Static counts of the instructions, not of their
    executions."""
    stores: dict[int, int] = {}
    for vec, bits in _WIDTH.findall(ptx):
        width = int(vec or 1) * int(bits) // 8
        stores[width] = stores.get(width, 0) + 1
    return {
        "async_copies": len(re.findall(r"\bcp\.async\.(?:ca|cg)\b", ptx)),
        "barriers": len(re.findall(r"\b(?:bar|barrier)\.sync\b", ptx)),
        "shuffles": len(re.findall(r"\bshfl\.sync\b", ptx)),
        "global_stores": dict(sorted(stores.items())),
    }


def _constexprs(spec: KernelSpec) -> dict:
    return {p.name: spec.constexprs.get(p.name, p.default) for p in spec.fn.params if p.is_constexpr}


def compile_report(spec: KernelSpec, arch: int = 90) -> dict:
    """Compile ``spec`` for CUDA ``sm_<arch>`` (90: Hopper, 100: Blackwell) and describe the result.

    Returns:
        ``{"kernel", "arch", "num_warps", "num_stages", "constexprs", "registers", "local_bytes",
        "stack_bytes" (where spilled registers live), "spill_instructions" (0 is wanted: see
        :func:`_spill_instructions`), "shared_bytes", "shared_fits" (within the SM's opt-in maximum),
        "mma" (the tensor-core instruction issued, or None), "wgmma_waits" (the pending-group counts
        of its ``wgmma.wait_group``s: [0] means each MMA is waited for at once), "async_copies", "barriers",
        "shuffles", "global_stores" (see :func:`_sync_and_stores`), "sass_instructions" (see
        :func:`_sass_instructions`), "ftz" (an instruction flushes fp32 subnormals to zero),
        "blocks_per_sm" and "warps_per_sm" (what an SM holds at once: :func:`blocks_per_sm`),
        "compile_s"}``, or
        the first five keys with ``"error"`` when it does not compile.

    Raises:
        RuntimeError: triton is not installed.
    """
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:  # pragma: no cover - triton is in the dev extra
        raise RuntimeError("compile_report needs triton (pip install triton)") from e
    row = {
        "kernel": spec.name,
        "arch": f"sm_{arch}",
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
        "constexprs": _constexprs(spec),
    }
    from .triton_quantize import TRITON_VERSION

    if arch >= 100 and TRITON_VERSION < BLACKWELL_TRITON:  # 3.2 aborts the process on a Blackwell dot
        row["error"] = f"triton {triton.__version__} cannot compile for sm_{arch}: it needs triton >= 3.3"
        return row
    t0 = time.perf_counter()
    try:
        names = spec.fn.arg_names
        attrs = {
            (names.index(k),): [["tt.divisibility", 16]]
            for k, t in spec.signature.items()
            if t.startswith("*") or k in spec.aligned
        }
        src = _ast_source(ASTSource, spec, attrs)
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
    except Exception as e:  # a kernel that does not compile is the finding, not a crash
        lines = str(e).strip().splitlines() or [""]
        row["error"] = f"{type(e).__name__}: {lines[-1][:300]}"
        return row
    row.update(_resources(compiled.asm["cubin"]))
    sass = _cuobjdump(compiled.asm["cubin"], "-sass")
    row["sass_instructions"] = _sass_instructions(sass)
    row["spill_instructions"] = _spill_instructions(sass)
    row["ftz"] = ".ftz" in compiled.asm["ptx"]
    row["shared_bytes"] = int(compiled.metadata.shared)
    row["shared_fits"] = row["shared_bytes"] <= SM_SHARED_BYTES.get(arch, 227 * 1024)
    row["blocks_per_sm"] = blocks_per_sm(row["registers"], spec.num_warps, row["shared_bytes"])
    row["warps_per_sm"] = row["blocks_per_sm"] * spec.num_warps
    row["mma"] = _mma_kind(compiled.asm["ptx"])
    # how many wgmma groups may stay in flight where the kernel waits: all 0 means every MMA is
    # waited for before the next instruction that needs its result (nothing hides behind it)
    waits = re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", compiled.asm["ptx"])
    row["wgmma_waits"] = sorted({int(w) for w in waits})
    row.update(_sync_and_stores(compiled.asm["ptx"]))
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    return row


def all_specs() -> list[KernelSpec]:
    """Every Triton kernel of lowcomm at every configuration it launches with on CUDA.

    Raises:
        RuntimeError: ``TRITON_INTERPRET=1`` is set (kernels are then interpreted, not compiled).
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compiling kernels needs TRITON_INTERPRET unset (it is 1 in this process)")
    from . import triton_adamw, triton_codec, triton_fp8, triton_mx_gemm, triton_quantize

    return [
        *triton_mx_gemm.static_specs(),
        *triton_quantize.static_specs(),
        *triton_fp8.static_specs(),
        *triton_adamw.static_specs(),
        *triton_codec.static_specs(),
    ]


def report(archs=(90, 100), only=("",)) -> list[dict]:
    """:func:`compile_report` for every spec whose name contains one of ``only``, for each arch."""
    specs = [s for s in all_specs() if any(o in s.name for o in only)]
    return [compile_report(s, a) for a in archs for s in specs]


def main(argv=None) -> None:
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", help="CUDA arch: 90 (Hopper), 100 (Blackwell)")
    ap.add_argument("--only", action="append", help="kernels whose name contains this (repeatable)")
    args = ap.parse_args(argv)
    for row in report(tuple(args.arch or (90, 100)), tuple(args.only or ("",))):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
