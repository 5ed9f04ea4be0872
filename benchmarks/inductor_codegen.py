"""What torch.compile generates for a block of the reference model on a GPU, without a GPU. Prints JSON.

    python benchmarks/inductor_codegen.py --recipe fp8_rowwise --quantize inductor --json out.json

One transformer block of the reference GPT (d=1024, 16 heads, 16 sequences of 1024 tokens: the FP8
issue's training size; ``--size small`` for d=512, T=256) with its Linear layers in ``--recipe``
(a low-precision layer recipe; ``--quantize``: the fp8 layers' compiled quantize), compiled as the
trainer compiles its step (Dynamo, then AOT autograd's forward and backward graphs, split as
Inductor splits them) on meta tensors under bf16 autocast (the layers' outputs bf16, the layer
norms fp32; fp8_delayed at a step after its first, scaled from its history, its buffers inputs
of the graphs as a compiled module's are), then each graph lowered by
Inductor for a pretend sm_90 GPU with 132 SMs (an H100/H200): the Triton kernels it writes, each
with the ATen operators it fused, its iteration sizes, its reduction kind (``per``: a row held
whole; ``red``: a loop), the tensors it reads and writes and whether it writes one across the way
it reads (``transposed_store``; each graph's ``transposed_stores`` counts them by kind), then
each launch of a kernel of lowcomm's that Inductor calls as it is (kind ``user``: fp8_transpose,
the compiled fp8 recipes' transposed copies on a GPU), its bytes from its arguments. Nothing
is compiled to machine code, run or timed: this tells where Inductor puts each pass over memory
(which of the quantize's maxima and casts it fused into the kernel making the tensor, and how),
the question a profile's kernel names, cut short, cannot answer. A kernel's speed needs the GPU
(``benchmarks/kernels.py``'s compiled training rows keep their slowest kernels' code).

Attention is traced as the H200 ran it (``--attention cudnn``, the default): cuDNN's fused
kernel, an extern call to Inductor like a GEMM, its output laid out as its query. ``--attention
math`` traces SDPA's decomposition instead (its softmax, and copies of q, k and v, in generated
kernels), as the pretend GPU made the tool do before 2026-12-05.

The pretend GPU replaces, for the run and restored after, what torch asks the CUDA driver (the
device count, capability and properties, the RNG state, the current device; Dynamo is told there
is no accelerator, so it asks for no current stream), Inductor's passes that run small CUDA
computations while compiling (its pattern matchers and constant folding are off: on a GPU they may
first rewrite a few patterns, such as attention's; the rewrite of view scatters is left out, so
fp8_delayed's 3-element maxima updates stay scatters), and its Triton compilation
(each kernel's source is recorded instead; Triton's driver names the target, for the IR of a
kernel of lowcomm's, whose writes Inductor reads there); a torch whose Inductor asks more than
that fails with its own error. Made on torch 2.11 (a CUDA build, without a GPU) and 2.13 (CPU).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import os
import re
import sys
import types
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import replacing, stamp, write_result  # noqa: E402

SIZES = {
    "issue": dict(n_embd=1024, n_head=16, seq_len=1024, batch=16),
    "small": dict(n_embd=512, n_head=8, seq_len=256, batch=16),
    "smoke": dict(n_embd=128, n_head=2, seq_len=128, batch=2),  # (the tests')
}
#: the GPU pretended: an H100/H200's (sm_90, 132 SMs)
GPU = dict(name="NVIDIA H200", major=9, minor=0, multi_processor_count=132, warp_size=32)


@contextlib.contextmanager
def pretend_gpu(count_bytes: bool = False):
    """A pretend sm_90 GPU for Inductor's code generation; everything replaced is put back."""
    import torch._inductor.config as config
    import torch._subclasses.fake_tensor as fake_tensor
    import torch.utils._triton as utils_triton
    from torch._inductor import async_compile
    from torch._inductor.fx_passes import joint_graph, post_grad, reinplace
    from torch._inductor.runtime.hints import DeviceProperties

    props = types.SimpleNamespace(
        **GPU,
        total_memory=141 << 30,
        max_threads_per_multi_processor=2048,
        regs_per_multiprocessor=65536,
        max_threads_per_block=1024,
        shared_memory_per_block_optin=232448,
        shared_memory_per_multiprocessor=233472,
        shared_memory_per_block=49152,
        L2_cache_size=60 << 20,
        gcnArchName="",
    )
    sources: dict[str, str] = {}

    def device_properties(device=None):
        return DeviceProperties(
            type="cuda",
            index=0,
            multi_processor_count=GPU["multi_processor_count"],
            cc=GPU["major"] * 10 + GPU["minor"],
            major=GPU["major"],
            regs_per_multiprocessor=65536,
            max_threads_per_multi_processor=2048,
            warp_size=GPU["warp_size"],
        )

    def record(self, kernel_name, source_code, *args, **kwargs):  # Triton compilation, not done
        sources[kernel_name] = source_code
        return types.SimpleNamespace(run=lambda *a, **k: None)

    replaced = [
        (torch.cuda, "is_available", lambda: True),
        (torch.cuda, "device_count", lambda: 1),
        (torch.cuda, "current_device", lambda: 0),
        (torch.cuda, "set_device", lambda device: None),
        (torch.cuda, "get_device_capability", lambda device=None: (GPU["major"], GPU["minor"])),
        (torch.cuda, "get_device_properties", lambda device=None: props),
        (torch.cuda, "get_device_name", lambda device=None: GPU["name"]),
        (torch.cuda, "get_rng_state", lambda device="cuda": torch.zeros(16, dtype=torch.uint8)),
        (torch.cuda, "set_rng_state", lambda state, device="cuda": None),
        (torch.cuda, "_lazy_init", lambda: None),
        (torch.cuda, "_exchange_device", lambda index: 0),
        (torch.cuda, "_maybe_exchange_device", lambda index: 0),
        (fake_tensor, "init_gpu_context", lambda *a, **k: None),
        (DeviceProperties, "create", staticmethod(device_properties)),
        (joint_graph, "lazy_init", lambda *a, **k: None),  # pattern matchers traced on the device
        (post_grad, "lazy_init", lambda *a, **k: None),
        # its rewrite of view scatters (the fp8_delayed maxima's 3-element updates) copies on the
        # fake GPU, which a torch without a GPU cannot: they stay scatters
        (reinplace, "canonicalize_view_scatter_ops", lambda graph: None),
        (utils_triton, "triton_hash_with_backend", lambda: "pretend-gpu"),
        (utils_triton, "triton_backend", lambda: None),
        (async_compile.AsyncCompile, "triton", record),
        (config, "compile_threads", 1),
        (config, "pattern_matcher", False),
        (config, "joint_graph_constant_folding", False),  # (it runs the folded operations)
        (config, "fx_graph_cache", False),
    ]
    if count_bytes:  # each kernel's source then states the bytes it moves
        replaced.append((config, "benchmark_kernel", True))
    if hasattr(torch, "accelerator"):  # Dynamo asks it for the current stream (the CUDA runtime's)
        replaced.append((torch.accelerator, "is_available", lambda: False))
    try:  # a user-defined Triton kernel (lowcomm's fp8_transpose) is compiled to its IR for the
        # GPU to find which arguments it writes: Triton's driver names the target
        import triton
        from triton.backends.compiler import GPUTarget

        target = GPUTarget("cuda", GPU["major"] * 10 + GPU["minor"], GPU["warp_size"])
        driver = types.SimpleNamespace(get_current_target=lambda: target)
        replaced.append((triton.runtime.driver, "_active", driver))
    except ImportError:
        pass
    _build_dynamo_tables()
    with replacing(replaced):
        _forget_devices()  # what torch found out about the GPUs before (none), asked again
        try:
            yield sources
        finally:
            _forget_devices()  # and what it found out about the pretend one


def _build_dynamo_tables() -> None:
    """Builds Dynamo's tables of torch functions (those it folds to constants, those it handles
    itself, those it puts in the graph), which it builds once a process from the objects it finds
    then: built before the pretend GPU's stand-ins are in place, they hold torch's own functions,
    not stand-ins that would stay in them for the process's later compiles."""
    import torch._dynamo.trace_rules as trace_rules
    from torch._dynamo.variables import torch as torch_variables  # (some are built on import)

    trace_rules.get_torch_obj_rule_map()
    torch_variables.tracing_state_functions()
    torch_variables.get_overridable_functions()
    torch_variables.TorchInGraphFunctionVariable._get_handlers()


def _forget_devices() -> None:
    """Clears what torch caches about the machine's GPUs: whether Triton has one, and each
    device's properties and current index."""
    import torch._dynamo.device_interface as device_interface
    import torch.utils._triton as utils_triton

    utils_triton.has_triton.cache_clear()
    for cache in ("caching_worker_device_properties", "caching_worker_current_devices"):
        getattr(device_interface, cache, {}).pop("cuda", None)


def block_graphs(
    recipe: str, quantize: str, size: dict, attention: str = "cudnn"
) -> list[torch.fx.GraphModule]:
    """The forward and backward graphs torch.compile (Dynamo, AOT autograd) makes of one block's
    step (meta tensors), with Inductor's decompositions and partitioner, as the trainer's compiled
    step under bf16 autocast would trace it:
    the low-precision layers see an sm_90 GPU and write bf16 (autocast's dtype); the layer norms,
    the residual stream and the parameters stay fp32."""
    import lowcomm.kernels.gemm as gemm
    import lowcomm.kernels.linear as linear
    from lowcomm.kernels import convert_to_low_precision
    from lowcomm.lm.model import Block, GPTConfig

    cfg = GPTConfig(
        vocab_size=256, seq_len=size["seq_len"], n_layer=1, n_head=size["n_head"], n_embd=size["n_embd"]
    )
    with torch.device("meta"):
        block = Block(cfg)
    if recipe != "bf16":
        convert_to_low_precision(block, recipe)
    for layer in block.modules():
        if type(layer) is nn.Linear:  # the rest (bf16: every Linear) multiplies as autocast would
            layer.forward = functools.partial(_autocast_linear, layer)
        elif getattr(layer, "recipe", None) == "fp8_delayed":  # a step after the first: scaled
            layer._fp8_started = True  # from the history
    names = [n for n, _ in block.named_parameters()]
    # buffers (fp8_delayed's maxima and history) are inputs of the graphs too, as a compiled
    # module's are: not constants captured from the meta module
    buffer_names = [n for n, _ in block.named_buffers()]

    def step(x, *tensors):
        return torch.func.functional_call(block, dict(zip(names + buffer_names, tensors)), (x,))

    from lowcomm.kernels.triton_quantize import HAVE_TRITON

    stand_ins = [
        (gemm, "_capability", lambda device: (GPU["major"], GPU["minor"])),
        # the layers' GPU route (quantize each tensor once, in Triton or in torch ops), on meta
        (gemm, "_triton_runs_on", lambda device: HAVE_TRITON),
        (linear, "_triton_runs_on", lambda device: HAVE_TRITON),
        (linear, "autocast_dtype", lambda device_type: torch.bfloat16),  # autocast's output dtype
        (linear, "COMPILED_QUANTIZE", quantize),
    ]
    params = [p.detach().requires_grad_() for p in block.parameters()]
    x = torch.empty(size["batch"], size["seq_len"], size["n_embd"], device="meta", requires_grad=True)
    return _traced(step, [x, *params, *block.buffers()], stand_ins, attention)


def batched_block_graphs(size: dict, replicas: int, attention: str = "cudnn") -> list[torch.fx.GraphModule]:
    """:func:`block_graphs` for the trainer's batched replicas (:mod:`lowcomm.lm.batched`): one
    block of ``replicas`` stacked replicas (the size's sequences shared among them; 1: DP's one
    set of weights reading every replica's batch), its matrices multiplied through their bf16
    copies (ReplicaAdamW's, leaves of the graph as the trainer's are), biases and layer norms
    fp32, as the trainer's compiled ``batched_gpt_loss`` traces it under bf16 autocast."""
    import lowcomm.lm.batched as batched
    from lowcomm.lm.model import Block, GPTConfig

    B, T, C = size["batch"], size["seq_len"], size["n_embd"]
    cfg = GPTConfig(vocab_size=256, seq_len=T, n_layer=1, n_head=size["n_head"], n_embd=C)
    with torch.device("meta"):
        block = Block(cfg)
        params = {
            f"blocks.0.{n}": torch.empty(replicas, *q.shape, requires_grad=True)
            for n, q in block.named_parameters()
        }
    copies = {
        n: params[n].detach().bfloat16().requires_grad_() for n in batched.linear_weights(cfg) if n in params
    }
    names, copy_names = list(params), list(copies)

    def step(x, *tensors):
        ps = dict(zip(names, tensors[: len(names)]))
        ws = {**ps, **dict(zip(copy_names, tensors[len(names) :]))}
        return batched.batched_block(x, ps, ws, "blocks.0.", n_head=cfg.n_head, seq_len=T)

    stand_ins = [(batched, "autocast_dtype", lambda device_type: torch.bfloat16)]  # autocast's casts
    x = torch.empty(replicas, B // replicas * T, C, device="meta", requires_grad=True)
    return _traced(step, [x, *params.values(), *copies.values()], stand_ins, attention)


def _traced(step, inputs: list, stand_ins: list, attention: str) -> list[torch.fx.GraphModule]:
    """The forward and backward graphs of ``step(*inputs)`` and its backward, compiled whole
    (:func:`_capturing_backend`) with ``stand_ins`` in place, autocast stood in for (the casts are
    the stand-ins' to make: torch.autocast refuses meta tensors) and the attention
    ``attention``'s (:func:`_attention`)."""
    graphs: list = []
    no_autocast = (torch, "autocast", lambda *a, **k: contextlib.nullcontext())
    with replacing([*stand_ins, no_autocast, *_attention(attention)]):
        run = torch.compile(step, backend=_capturing_backend(graphs), fullgraph=True)
        y = run(*inputs)
        y.backward(torch.empty_like(y))
    return graphs


def _capturing_backend(graphs: list):
    """AOT autograd with Inductor's decompositions and partitioner, appending the forward and
    backward graphs it makes to ``graphs`` (split as Inductor splits them)."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    def capture(gm, inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(
        fw_compiler=capture,
        bw_compiler=capture,
        partition_fn=min_cut_rematerialization_partition,
        decompositions=select_decomp_table(),
        keep_inference_input_mutations=True,
    )


def _autocast_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` with bf16 autocast's casts (the tool's stand-in autocast does none): x, the
    weight and the bias in bf16, a bf16 output."""
    bias = layer.bias.to(torch.bfloat16) if layer.bias is not None else None
    return nn.functional.linear(x.to(torch.bfloat16), layer.weight.to(torch.bfloat16), bias)


#: how the blocks' attention is traced (``--attention``): "cudnn", the fused kernel SDPA ran on
#: the H200 (cuDNN's, an extern kernel to Inductor like a GEMM, its output laid out as its query,
#: as torch's own kernel lays it out); "math", SDPA's decomposition on the pretend GPU (its
#: softmax, and copies of q, k and v, in generated kernels)
ATTENTIONS = ("cudnn", "math")


def _cudnn_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    """``F.scaled_dot_product_attention`` as an H100/H200 runs the reference model's (causal, no
    mask, no dropout): cuDNN's fused attention, the operator itself."""
    if attn_mask is not None or dropout_p or kw:
        raise ValueError("the cudnn stand-in takes causal attention without a mask or dropout")
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, is_causal, False, scale=scale
    )
    return out[0]


def _attention(attention: str) -> list:
    """The stand-ins that make the blocks' attention ``attention``'s (:data:`ATTENTIONS`)."""
    if attention == "math":
        return []
    return [(nn.functional, "scaled_dot_product_attention", _cudnn_attention)]


def lower(gm: torch.fx.GraphModule) -> dict:
    """One graph through Inductor for the pretend GPU: its kernels in launch order (as
    :func:`kernels` reads them) and where the output code was written."""
    from torch._inductor import codecache
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._subclasses.fake_tensor import FakeTensorMode

    for node in gm.graph.nodes:  # constants made on the traced device go to the GPU's
        if node.kwargs.get("device") == torch.device("meta"):
            node.kwargs = {**node.kwargs, "device": torch.device("cuda", 0)}
    gm.recompile()
    written: list[str] = []
    load = codecache.PyCodeCache.load_by_key_path

    def keep_path(key, path, *args, **kwargs):
        written.append(path)
        return load(key, path, *args, **kwargs)

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        inputs = [
            torch.empty_strided(
                n.meta["val"].shape, n.meta["val"].stride(), dtype=n.meta["val"].dtype, device="cuda"
            )
            for n in gm.graph.nodes
            if n.op == "placeholder"
        ]
    try:
        with replacing([(codecache.PyCodeCache, "load_by_key_path", keep_path)]), mode:
            compile_fx_inner(gm, inputs)
    except Exception as e:  # (loading it asks the CUDA runtime for a stream: the code is written by then)
        if not written:
            raise RuntimeError(f"Inductor wrote no code for the pretend GPU: {type(e).__name__}: {e}") from e
    codes = [(path, Path(path).read_text()) for path in reversed(written)]
    output, code = next(((p, c) for p, c in codes if "async_compile.triton(" in c), codes[0])
    found = {"output_code": output, "kernels": kernels(code)}
    gb = [k["gb"] for k in found["kernels"]]
    total = sum(gb) if None not in gb else None  # (counted with --bytes only)
    return {**found, "transposed_stores": transposed_stores(found), "gb": total}


def kernels(code: str) -> list[dict]:
    """The Triton kernels of an Inductor output code, in launch order: name, kind (pointwise,
    ``per``sistent or looped ``red``uction), iteration sizes, reduction hint, the ATen operators
    fused, the (pointer, index) of each load and store, and ``gb``: Inductor's own count of the
    bytes it reads and writes (``kernel_num_gb``, each tensor it touches once, in 10^9 bytes;
    with ``--bytes``, else None)."""
    found = {}
    block = (
        r"# Topologically Sorted Source Nodes: \[.*?\], Original ATen: \[(.*?)\]\n.*?"
        r"(triton_\w+) = async_compile\.triton\('\w+', '''(.*?)'''"
    )
    for m in re.finditer(block, code, re.S):
        aten, name, body = m.groups()
        hint = re.search(r"reduction_hint=ReductionHint\.(\w+)", body)
        found[name] = {
            "name": name,
            "kind": name.split("_")[1],
            "sizes": ast.literal_eval(re.search(r"size_hints=(\{.*?\})", body).group(1)),
            "reduction_hint": hint.group(1) if hint else None,
            "aten": [a.removeprefix("aten.") for a in aten.split(", ")],
            "loads": _accesses("load", body),
            "stores": _accesses("store", body),
            "gb": float(gb.group(1)) if (gb := re.search(r"'kernel_num_gb': ([0-9.e+-]+)", body)) else None,
        }
    for k in found.values():
        k["transposed_store"] = _transposed_store(k)
    main = code.split("def call(")[-1]  # (with --bytes each kernel's source has a call() of its own)
    order = re.findall(r"(triton_\w+)\.run\(", main)
    return (
        [found[n] for n in dict.fromkeys(order) if n in found]
        + [k for n, k in found.items() if n not in order]
        + _user_launches(code, main)
    )


#: lowcomm's Triton kernels that Inductor launches as they are (``torch.library.triton_op``,
#: fused with nothing): the bytes a launch reads and writes, from its arguments
USER_KERNEL_BYTES = {
    # fp8_transpose: (R, C) one-byte elements read, (C, R) written
    "_transpose_bytes_kernel": lambda args: 2 * int(args[2]) * int(args[3]),
}


def _user_launches(code: str, main: str) -> list[dict]:
    """Each launch of a user-defined Triton kernel (kind ``user``), in launch order: its kernel,
    its arguments, and ``gb`` from :data:`USER_KERNEL_BYTES` (None for a kernel not there)."""
    kernel_of = dict(re.findall(r"^(\w+) = async_compile\.triton\('(\w+)', '''", code, re.M))
    launches = []
    for name, args in re.findall(r"(\w+)\.run\(([^)]*)\)", main):
        kernel = kernel_of.get(name)
        if kernel is None or name.startswith("triton_"):
            continue
        args = [a.strip() for a in args.split(",") if "=" not in a]
        count = USER_KERNEL_BYTES.get(kernel)
        launches.append(
            {
                "name": name,
                "kind": "user",
                "kernel": kernel,
                "args": args,
                "sizes": None,
                "reduction_hint": None,
                "aten": [],  # (none fused into it)
                "loads": [],
                "stores": [],
                "gb": count(args) / 1e9 if count else None,
                "transposed_store": None,  # (of Inductor's own kernels only)
            }
        )
    return launches


def _accesses(op: str, body: str) -> list[tuple[str, str]]:
    """Each ``tl.<op>(pointer + (index), ...)`` of a kernel's source: (pointer, index), the index
    whole (to its closing parenthesis: a modulo's or a division's parentheses inside it)."""
    found = []
    for m in re.finditer(rf"tl\.{op}\((\w+) \+ \(", body):
        depth, end = 1, m.end()
        while depth and end < len(body):
            depth += {"(": 1, ")": -1}.get(body[end], 0)
            end += 1
        found.append((m.group(1), body[m.end() : end - 1]))
    return found


def _transposed_store(kernel: dict) -> str | None:
    """Where a kernel writes a tensor across the way it reads it. A reduction over rows (hint
    other than OUTER) reads along its loop; "reduction": one storing along that loop's index at
    a stride (loads ``r0_1 + 1024*x0``, a store ``x0 + 16384*r0_1``: a byte a row, the next one a
    row away, as the H200's slow compiled fp8 kernels did; or a split reduction's
    ``32*x0 + 16384*((r0_1 % 1024)) + (r0_1 // 1024)``, the same across a slice of 32 rows). A
    pointwise kernel reads along the unit-stride variable of its loads; "tiled": one over (y, x)
    tiles storing that variable at a stride (Inductor's tiling for a transpose), "pointwise": one
    over a flat range doing so. None where every store follows the reads (a column reduction reads
    and writes along columns)."""

    def linear(index: str) -> bool:  # a sum of variables times strides (not a modulo's, a view's)
        return "*" in index and "(" not in index

    def unit(index: str) -> set:
        return set(re.findall(r"(?:^|\+ )((?:x|y|r0_)\d+)(?= \+|$)", index))

    if kernel["kind"] in ("red", "per"):  # the loop's index times a stride, or its modulo's,
        # where the kernel also walks along that index, reading or writing at unit stride (a
        # reduction down columns reads and writes alike, the same index, in place: no transpose)
        across = r"\d+\*\(*r0_\d+\b(?!\s*//)"
        accesses = kernel["loads"] + kernel["stores"]
        along = any(v.startswith("r0_") for _, index in accesses for v in unit(index))
        if (
            along
            and kernel["reduction_hint"] != "OUTER"
            and any(re.search(across, i) for _, i in kernel["stores"])
        ):
            return "reduction"
        return None
    stores = [index for _, index in kernel["stores"] if linear(index)]
    walked = set().union(*(unit(index) for _, index in kernel["loads"] if linear(index))) or {"x0", "x1"}
    for index in stores:
        if any(re.search(rf"\d+\*{v}\b", index) and v not in unit(index) for v in walked):
            return "tiled" if "y" in kernel["sizes"] else "pointwise"
    return None


def transposed_stores(lowered: dict) -> dict:
    """How many of a graph's kernels write across the way they read, by :func:`_transposed_store`'s
    kind."""
    kinds = [k["transposed_store"] for k in lowered["kernels"]]
    return {kind: kinds.count(kind) for kind in ("reduction", "tiled", "pointwise")}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--recipe", default="fp8_rowwise", help="a low-precision layer recipe, or bf16 (autocast's Linear)"
    )
    p.add_argument(
        "--quantize", default="inductor", choices=["inductor", "triton"], help="LOWCOMM_COMPILED_QUANTIZE"
    )
    p.add_argument("--size", default="issue", choices=sorted(SIZES))
    p.add_argument(
        "--replicas",
        type=int,
        default=0,
        help="the trainer's batched model instead of the plain block: this many stacked replicas "
        "sharing the size's sequences (1: DP's one set of weights; bf16 only)",
    )
    p.add_argument(
        "--bytes",
        action="store_true",
        help="count the bytes each kernel moves (Inductor's benchmark_kernel, which may fuse a few "
        "kernels otherwise: the counts of kernels are those of a run without it)",
    )
    p.add_argument(
        "--attention",
        default="cudnn",
        choices=ATTENTIONS,
        help="cudnn: the fused kernel SDPA ran on the H200 (extern, not counted); math: SDPA's "
        "decomposition (its softmax and copies in generated kernels; the tool's figures before 2026-12-05)",
    )
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    from lowcomm.kernels.linear import LAYER_RECIPES

    if args.recipe not in ("bf16", *LAYER_RECIPES):
        p.error(f"--recipe: unknown recipe {args.recipe!r}; allowed: {['bf16', *LAYER_RECIPES]}")
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    size = SIZES[args.size]
    if args.replicas < 0 or (args.replicas and (args.recipe != "bf16" or size["batch"] % args.replicas)):
        p.error(
            f"--replicas {args.replicas}: allowed 0 (the plain block) or, with --recipe bf16, a "
            f"divisor of the size's {size['batch']} sequences"
        )
    with pretend_gpu(count_bytes=args.bytes):
        if args.replicas:
            graphs = batched_block_graphs(size, args.replicas, args.attention)
        else:
            graphs = block_graphs(args.recipe, args.quantize, size, args.attention)
        lowered = {which: lower(gm) for which, gm in zip(("forward", "backward"), graphs)}
    out = {
        **stamp("inductor_codegen"),
        "gpu": GPU,
        "recipe": args.recipe,
        "quantize": args.quantize,
        "size": size,
        "model": f"batched, {args.replicas} replicas" if args.replicas else "plain",
        "attention": args.attention,
        "bytes_counted": args.bytes,
        **lowered,
    }
    write_result(out, args.json)
    return out


if __name__ == "__main__":
    main()
