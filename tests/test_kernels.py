"""Low-precision formats, GEMMs and Linear layers on CPU (the emulated path every kernel is held to)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import fp8_gemm_tolerance, load_benchmark, needs_triton

from lowcomm import _compat
from lowcomm.kernels import (
    E8M0_NAN,
    Float8Linear,
    LowPrecisionLinear,
    MXFP8Linear,
    choose_backend,
    convert_to_low_precision,
    dequantize_mx,
    qmatmul,
    quantize_fp8,
    quantize_mx,
    to_cublas_blocked,
)


def test_rceil_scale_never_saturates_and_floor_follows_ocp():
    # amax 448·1.5 = 672: rceil picks 2^1 (672/2 = 336 <= 448); OCP floor: floor(log2 672) - 8 = 1
    x = torch.zeros(1, 32)
    x[0, 0] = 672.0
    _, s = quantize_mx(x, scale_rule="rceil")
    assert int(s) - 127 == 1
    _, s = quantize_mx(x, scale_rule="floor")
    assert int(s) - 127 == 1
    # amax 500: rceil -> 2^1 (500/448 > 1); floor -> 2^0 and 500 saturates to 448
    x[0, 0] = 500.0
    d, s = quantize_mx(x, scale_rule="rceil")
    assert int(s) - 127 == 1 and float(dequantize_mx(d, s)[0, 0]) == 512.0  # 250 rounds to 256 in E4M3
    d, s = quantize_mx(x, scale_rule="floor")
    assert int(s) - 127 == 0 and float(dequantize_mx(d, s)[0, 0]) == 448.0


def test_mx_blocks_follow_the_axis_and_zero_blocks_are_exact():
    x = torch.randn(64, 96)
    d, s = quantize_mx(x, block=32, axis=0)
    assert d.shape == x.shape and s.shape == (2, 96) and s.dtype == torch.uint8
    y = dequantize_mx(d, s, block=32, axis=0)
    assert float(((y - x).abs() / x.abs().clamp_min(1e-3)).max()) < 2**-3
    z = torch.zeros(4, 32)
    assert torch.equal(dequantize_mx(*quantize_mx(z)), z)


def test_mx_subnormals_and_nan():
    x = torch.zeros(2, 32)
    x[0, 0], x[0, 1] = 1.0, 2.0**-9 * 1.0  # 2^-9 / 2^-8 scale-adjusted lands in e4m3 subnormals
    x[1, 3] = float("nan")
    d, s = quantize_mx(x)
    y = dequantize_mx(d, s)
    assert float(y[0, 1]) == 2.0**-9
    assert int(s[1, 0]) == E8M0_NAN and bool(torch.isnan(y[1]).all())


def test_e5m2_reaches_its_range():
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1] = 57344.0, 1.0
    d, s = quantize_mx(x, elem="e5m2")
    assert float(dequantize_mx(d, s)[0, 0]) == 57344.0


@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
def test_fp8_dynamic_scaling_maps_amax_to_the_format_max(scaling):
    x = torch.randn(8, 64) * torch.arange(1, 9).reshape(8, 1)
    d, s = quantize_fp8(x, scaling=scaling)
    assert d.dtype == torch.float8_e4m3fn
    assert float(d.float().abs().max()) == 448.0
    assert float(((d.float() * s - x).abs() / x.abs().clamp_min(1e-2)).max()) < 2**-3


def test_fp8_scales_stop_at_the_smallest_normal_float_whose_reciprocal_is_finite():
    """The cast multiplies by the reciprocal of the scale: a tensor whose maximum / 448 is below
    2^-126 gets the scale 2^-126 (its reciprocal 2^126 is finite) and still quantizes with fp8's
    relative precision (e4m3: 3 mantissa bits) where its scaled values are normal in fp8."""
    from lowcomm.kernels.formats import FP8_MIN_SCALE
    from lowcomm.kernels.gemm import fp8_cast

    x = torch.randn(4, 64) * 1e-37  # a maximum about 3e-37: 448 x 2^-126 is 5.3e-36
    d, s = quantize_fp8(x, scaling="tensorwise")
    assert float(s) == FP8_MIN_SCALE == 2.0**-126 and bool(torch.isfinite(d.float()).all())
    back, big = d.float() * s, x.abs() > 2**-6 * FP8_MIN_SCALE  # fp8-normal after scaling
    assert float(((back - x).abs() / x.abs())[big].max()) <= 2**-4
    ordinary = torch.randn(8, 8)  # elsewhere within an ulp of fp32 of x / scale before rounding
    scale = ordinary.abs().amax() / 448
    near = (ordinary.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    assert float((fp8_cast(ordinary, scale).float() - near).abs().max()) <= float(near.abs().max()) * 2**-3


@pytest.mark.parametrize("recipe", ["fp8_tensorwise", "fp8_rowwise", "mxfp8", "mxfp8_fast"])
def test_emulated_gemm_is_close_to_fp64(recipe):
    torch.manual_seed(0)
    a, b = torch.randn(64, 200), torch.randn(200, 48)  # K = 200 is padded to 224 for MX
    y = qmatmul(a, b, recipe, backend="emulated")
    ref = a.double() @ b.double()
    rel = float((y.double() - ref).norm() / ref.norm())
    assert rel < 0.06  # E4M3 keeps 3 mantissa bits: SQNR about 28 dB
    sqnr = 20 * math.log10(1 / rel)
    assert sqnr > 24


def test_backend_choice_refuses_what_the_device_cannot_serve():
    assert choose_backend("mxfp8", torch.device("cpu")) == "emulated"
    with pytest.raises(ValueError, match="scaled_mm.*sm_100"):
        choose_backend("mxfp8", torch.device("cpu"), "scaled_mm")
    with pytest.raises(ValueError, match="unknown recipe"):
        choose_backend("fp4", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"\(M, K\) @ \(K, N\)"):
        qmatmul(torch.zeros(2, 3), torch.zeros(4, 5))


@pytest.mark.parametrize(
    "cap,served",
    [
        ((8, 0), []),  # A100: no fp8 tensor cores
        ((8, 9), ["fp8_tensorwise", "fp8_rowwise", "fp8_delayed"]),
        ((9, 0), ["fp8_tensorwise", "fp8_rowwise", "mxfp8", "mxfp8_fast", "fp8_delayed"]),
        ((10, 0), ["fp8_tensorwise", "fp8_rowwise", "mxfp8", "fp8_delayed"]),
    ],
)
def test_a_precision_a_gpu_would_only_emulate_is_refused_naming_what_it_runs(cap, served, monkeypatch):
    """On a GPU every layer recipe runs on the GPU's fp8 or MX hardware or is refused by name (the
    fp32 emulation there is the recipe at a fraction of bf16's speed); on a CPU the emulation is
    the recipe's path. Pretend GPUs: the capability is patched (and sm_90's blockwise cuBLAS probe
    reports none: Triton serves mxfp8_fast; exact MX on sm_100 needs torch's E8M0 dtype)."""
    import lowcomm.kernels.gemm as gemm
    from lowcomm.kernels import check_precision_on, layer_backend
    from lowcomm.kernels.triton_quantize import HAVE_TRITON

    monkeypatch.setattr(gemm, "_capability", lambda device: cap if device.type == "cuda" else None)
    monkeypatch.setattr(gemm, "_blockwise_scaled_mm_works", lambda device: False)
    if cap == (9, 0) and not HAVE_TRITON:
        served = ["fp8_tensorwise", "fp8_rowwise", "fp8_delayed"]
    if cap == (10, 0) and not hasattr(torch, "float8_e8m0fnu"):
        served = [r for r in served if r != "mxfp8"]
    gpu = torch.device("cuda", 0)
    for recipe in ("fp8_tensorwise", "fp8_rowwise", "mxfp8", "mxfp8_fast", "fp8_delayed"):
        check_precision_on(recipe, torch.device("cpu"))  # emulated on purpose: never refused
        assert layer_backend(recipe, torch.device("cpu")) == "emulated"
        if recipe in served:
            check_precision_on(recipe, gpu)
            assert layer_backend(recipe, gpu) != "emulated"
            continue
        with pytest.raises(ValueError) as e:
            check_precision_on(recipe, gpu)
        msg = str(e.value)
        assert msg.startswith(f"precision={recipe!r} is not allowed: {', '.join(['fp32', *served])} ")
        assert f"sm_{cap[0]}{cap[1]}" in msg and "--device cpu" in msg and "\n" not in msg, msg
    check_precision_on("fp32", gpu)
    with pytest.raises(ValueError, match="unknown recipe 'fp4'"):
        layer_backend("fp4", gpu)


def test_the_trainer_refuses_a_precision_its_gpu_would_emulate_before_any_record(monkeypatch, tmp_path):
    """``lowcomm train --device cuda --precision fp8_rowwise`` on an A100 (a pretend one here: the
    device, its capability and set_device patched) is refused at start-up, nothing written."""
    from helpers import write_corpus

    import lowcomm.kernels.gemm as gemm
    from lowcomm.runtime import TrainConfig, train
    from lowcomm.runtime.trainer.config import RunConfig

    corpus = write_corpus(tmp_path / "corpus", lines=200)
    monkeypatch.setattr(RunConfig, "torch_device", lambda self: torch.device("cuda", 0))
    monkeypatch.setattr(RunConfig, "compute_dtype", lambda self, device: torch.float32)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(gemm, "_capability", lambda device: (8, 0))
    cfg = TrainConfig.from_flat(corpus=str(corpus), run_dir=str(tmp_path / "run"), precision="fp8_rowwise")
    refusal = r"precision='fp8_rowwise' is not allowed: fp32 on this GPU \(sm_80\)"
    with pytest.raises(ValueError, match=refusal):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_cublas_blocked_layout_places_each_scale_by_the_documented_formula():
    rows, cols = 130, 6
    s = torch.arange(rows * cols, dtype=torch.int64).reshape(rows, cols) % 251
    flat = to_cublas_blocked(s.to(torch.uint8))
    assert flat.numel() == 256 * 8  # padded to 2 x 128 rows and 2 x 4 columns
    C = 2
    for r, c in [(0, 0), (1, 0), (31, 3), (32, 0), (127, 2), (128, 5), (129, 4)]:
        tile = (r // 128) * C + c // 4
        rr, cc = r % 128, c % 4
        off = tile * 512 + (rr % 32) * 16 + (rr // 32) * 4 + cc
        assert int(flat[off]) == int(s[r, c])


@pytest.mark.parametrize(
    "cls,kw",
    [
        (MXFP8Linear, {}),
        (Float8Linear, {"scaling": "rowwise"}),
        (Float8Linear, {"scaling": "tensorwise"}),
        (MXFP8Linear, {"grad_elem": "e5m2"}),
        (LowPrecisionLinear, {"recipe": "mxfp8_fast"}),  # 128x128 weight tiles, 1x128 activations
    ],
)
def test_low_precision_linear_gradients_track_fp32(cls, kw):
    torch.manual_seed(1)
    ref = torch.nn.Linear(64, 96)
    layer = cls(64, 96, **kw)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(4, 10, 64, requires_grad=True)  # 40 tokens: padded to 64 for the MX wgrad
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn(4, 10, 96)
    (layer(x) * g).sum().backward()
    (ref(x2) * g).sum().backward()

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    tol = 0.12 if kw.get("grad_elem") == "e5m2" else 0.07
    assert rel(layer(x).detach(), ref(x2).detach()) < 0.06
    assert rel(x.grad, x2.grad) < tol
    assert rel(layer.weight.grad, ref.weight.grad) < tol
    assert torch.allclose(layer.bias.grad, ref.bias.grad, atol=1e-5)


@pytest.mark.parametrize("recipe", ["fp8_tensorwise", "fp8_rowwise", "fp8_delayed", "mxfp8", "mxfp8_fast"])
def test_under_autocast_a_layer_outputs_the_autocast_dtype_and_keeps_its_own_arithmetic(recipe):
    """Under bf16 autocast (how the trainer runs on a GPU) a low-precision layer returns bf16, as
    the nn.Linear it replaced would: its fp32 result rounded to bf16, plus the bias in bf16; the
    recipe's arithmetic inside is not autocast (the emulated GEMM stays fp32), in forward or in a
    backward called inside the autocast region; gradients reach x and the fp32 parameters in
    their dtypes."""
    torch.manual_seed(2)
    layer = LowPrecisionLinear(64, 96, recipe=recipe, backend="emulated")
    plain = LowPrecisionLinear(64, 96, bias=False, recipe=recipe, backend="emulated")
    plain.weight = layer.weight
    x, gy = torch.randn(2, 20, 64), torch.randn(2, 20, 96)
    with torch.no_grad():  # fp32, no autocast (a delayed layer's first step is dynamic either way)
        want = plain(x).to(torch.bfloat16) + layer.bias.to(torch.bfloat16)
    grads = []
    for backward_inside in (False, True):
        xi = x.clone().requires_grad_()
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(xi)
            if backward_inside:
                y.backward(gy.to(torch.bfloat16))
        if not backward_inside:
            y.backward(gy.to(torch.bfloat16))
        assert y.dtype == torch.bfloat16 and torch.equal(y, want)
        grads.append((xi.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
        if recipe == "fp8_delayed":
            layer._fp8_started = False  # the second pass dynamic too, as the first
    for a, b in zip(*grads):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_convert_swaps_linears_shares_parameters_and_skips_the_head():
    from lowcomm.lm import GPT, GPTConfig

    m = GPT(GPTConfig(vocab_size=64, seq_len=8, n_layer=2, n_head=2, n_embd=32))
    before = {n: p for n, p in m.named_parameters()}
    names = convert_to_low_precision(m, "mxfp8")
    assert "head" not in names and "blocks.0.attn.qkv" in names and len(names) == 8
    assert all(p is before[n] for n, p in m.named_parameters())  # the same Parameter objects
    assert type(m.head) is torch.nn.Linear
    assert convert_to_low_precision(GPT(GPTConfig(n_embd=32, n_head=2, n_layer=1)), "fp32") == []
    with pytest.raises(ValueError, match="unknown precision"):
        convert_to_low_precision(m, "int3")


def test_low_precision_training_of_the_reference_model_tracks_fp32(tmp_path):
    """MXFP8 and fp8 with delayed scaling (emulated GEMMs on CPU) train the reference model to
    within 2% of fp32's loss at equal steps."""
    from helpers import write_corpus

    from lowcomm.runtime import TrainConfig, train

    base = TrainConfig.from_flat(
        corpus=write_corpus(tmp_path / "c", lines=4000),
        model_dim=32,
        layers=2,
        heads=2,
        seq_len=32,
        batch_size=8,
        steps=60,
        replicas=1,
        sync_every=20,
        lr=3e-3,
        warmup=5,
        eval_batches=4,
        threads=1,
        eval_every=0,
    )
    fp32 = train(base.replace(run_dir=str(tmp_path / "fp32")), progress=False)
    assert fp32["final_eval_loss"] < 0.8 * math.log(256)  # it learned
    assert fp32["precision_backend"] is None
    for precision in ("mxfp8", "fp8_delayed"):
        low = train(base.replace(run_dir=str(tmp_path / precision), precision=precision), progress=False)
        assert low["precision"] == precision and low["precision_backend"] == "emulated"  # on a CPU
        assert abs(low["final_eval_loss"] / fp32["final_eval_loss"] - 1) < 0.02, precision


# On a CPU the kernels run interpreted, where a tile is a loop over numpy arrays and every
# candidate costs seconds: there each candidate runs for two formats that between them take both
# elements, both scale rules and both input dtypes (the kernel's tile code does not depend on
# them); a GPU runs every candidate for every format.
_SWEEP_ON_CPU = {(torch.bfloat16, "rceil", "e4m3"), (torch.float32, "floor", "e5m2")}


def _dual_cases():
    for tiles in ("default", "cuda", "64x128"):
        for dtype in (torch.float32, torch.bfloat16):
            for rule in ("rceil", "floor"):
                for elem in ("e4m3", "e5m2"):
                    if tiles != "cuda" or torch.cuda.is_available() or (dtype, rule, elem) in _SWEEP_ON_CPU:
                        yield pytest.param(elem, rule, dtype, tiles, id=f"{tiles}-{dtype}-{rule}-{elem}")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees the NaN block
@pytest.mark.parametrize(("elem", "rule", "dtype", "tiles"), list(_dual_cases()))
def test_fused_dual_axis_triton_quantize_is_bit_identical_to_the_reference(elem, rule, dtype, tiles):
    """Runs the Triton kernel (interpreted on CPU in CI) and compares every byte with quantize_mx,
    also at every CUDA candidate tile (the autotuner may pick any; on a CPU for two formats, see
    _SWEEP_ON_CPU) and at 64 x 128 (the (96, 96) input ends inside a tile)."""
    needs_triton()
    from lowcomm.kernels.triton_quantize import QUANTIZE_CUDA_CONFIGS, mx_quantize_dual

    configs = {"cuda": QUANTIZE_CUDA_CONFIGS, "64x128": [{"BLOCK_R": 64, "BLOCK_C": 128}]}.get(tiles, [None])
    torch.manual_seed(0)
    x = (torch.randn(96, 96) * torch.logspace(-6, 6, 96)).to(dtype)
    x[3, 5] = float("nan")
    x[40, 70] = float("inf")
    x[10, :32] = 0.0
    x[11, 0] = 1e-40 if dtype == torch.float32 else 1e-30  # a subnormal input
    x[12, 40] = -0.0
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    d_r, s_r = quantize_mx(x, elem=elem, scale_rule=rule, axis=-1)
    d_c, s_c = quantize_mx(x, elem=elem, scale_rule=rule, axis=0)
    for config in configs:
        rq, rs, cq, cs = (t.cpu() for t in mx_quantize_dual(x.to(dev), elem, rule, config=config))
        assert torch.equal(rq.view(torch.uint8), d_r.view(torch.uint8)), config
        assert torch.equal(cq.view(torch.uint8), d_c.view(torch.uint8)), config
        assert torch.equal(rs, s_r) and torch.equal(cs, s_c), config


def _stand_in_autotuning(monkeypatch, name: str, candidates: int) -> list:
    """Autotune ``name`` on every device with a stand-in timer (the interpreter has no GPU timer)
    that makes the last of its ``candidates`` fastest; returns the list each timing appends to."""
    import triton

    import lowcomm.kernels.triton_quantize as tq

    timed = []

    def bench(kernel_call, quantiles=None):  # candidates are timed in their order
        kernel_call()
        timed.append(len(timed))
        t = 10.0 - (len(timed) - 1) % candidates
        return [t, t, t]

    monkeypatch.setattr(tq, "_AUTOTUNE_BENCH", bench)
    monkeypatch.setattr(tq, "_TUNED", {})
    monkeypatch.setattr(tq, "autotuning", lambda device: True)
    if not torch.cuda.is_available() and _compat.major_minor(triton.__version__) < (3, 3):
        pytest.skip(  # it hands each candidate options (num_buffers_warp_spec) the interpreter refuses
            f"triton {triton.__version__}'s autotuner cannot run a kernel under the interpreter"
        )
    return timed


def test_the_mx_quantize_autotuner_times_every_candidate_once_per_shape_and_keeps_the_bytes(monkeypatch):
    """On CUDA the MX quantize picks its tiles by timing QUANTIZE_CUDA_CONFIGS; here the timing is
    a stand-in (the interpreter has no GPU timer) that makes the last candidate fastest: it is the
    one taken, the bytes are quantize_mx's, a shape seen before is not timed again, a new one is;
    LOWCOMM_AUTOTUNE=0 pins the first candidate."""
    needs_triton()

    import lowcomm.kernels.triton_quantize as tq

    timed = _stand_in_autotuning(monkeypatch, "mx_quantize_dual", len(tq.QUANTIZE_CUDA_CONFIGS))
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # Triton runs on CUDA tensors there
    x = torch.randn(64, 96)
    for shape_runs, y in ((1, x), (1, x * 2), (2, torch.randn(32, 64))):
        rq, rs, cq, cs = (t.cpu() for t in tq.mx_quantize_dual(y.to(dev)))
        assert len(timed) == shape_runs * len(tq.QUANTIZE_CUDA_CONFIGS)
        assert tq.last_tuned_config() == tq.QUANTIZE_CUDA_CONFIGS[-1]
        # every choice so far, by its shape (the key's leading sizes) and dtype (the key's end)
        choices = tq.tuned_configs()["mx_quantize_dual"]
        assert len(choices) == shape_runs
        assert all(c == tq.QUANTIZE_CUDA_CONFIGS[-1] and "torch.float32" in key for key, c in choices)
        assert [64, 96] == choices[0][0][:2] and (shape_runs == 1 or choices[1][0][:2] == [32, 64])
        d_r, s_r = quantize_mx(y, axis=-1)
        d_c, s_c = quantize_mx(y, axis=0)
        assert torch.equal(rq.view(torch.uint8), d_r.view(torch.uint8)) and torch.equal(rs, s_r)
        assert torch.equal(cq.view(torch.uint8), d_c.view(torch.uint8)) and torch.equal(cs, s_c)
    monkeypatch.undo()
    monkeypatch.setenv("LOWCOMM_AUTOTUNE", "0")
    assert not tq.autotuning(torch.device("cuda")) and not tq.autotuning(torch.device("cpu"))
    monkeypatch.delenv("LOWCOMM_AUTOTUNE")
    assert tq.autotuning(torch.device("cuda"))


def test_the_fp8_quantize_autotuner_times_every_candidate_once_per_shape_and_keeps_the_bytes(monkeypatch):
    """On CUDA the fp8 quantize's amax and cast kernels each pick their tiles by timing
    FP8_CUDA_CONFIGS; here a stand-in timing makes the last candidate fastest: both take it, a
    shape and scaling seen before is not timed again, another scaling is, and so is delayed
    scaling's cast (its flags differ); the bytes and scales are quantize_fp8's, and delayed
    scaling's maxima and copies are those of the pinned tiles."""
    needs_triton()
    import lowcomm.kernels.triton_fp8 as tf
    import lowcomm.kernels.triton_quantize as tq

    n = len(tf.FP8_CUDA_CONFIGS)
    timed = _stand_in_autotuning(monkeypatch, "fp8_cast", n)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(64, 96) * torch.logspace(-3, 3, 96)
    for calls, (y, scaling) in enumerate(((x, "rowwise"), (x * 2, "rowwise"), (x, "tensorwise")), start=1):
        q, s, qt, st = (t.cpu() for t in tf.fp8_quantize_dual(y.to(dev), "e4m3", scaling))
        assert len(timed) == (1 if calls < 3 else 2) * 2 * n, (calls, len(timed))  # amax, then cast
        assert tq.last_tuned_config("fp8_amax") == tq.last_tuned_config("fp8_cast") == tf.FP8_CUDA_CONFIGS[-1]
        rq, rs = quantize_fp8(y, "e4m3", scaling, axis=-1)
        cq, cs = quantize_fp8(y, "e4m3", scaling, axis=0)
        assert _same_fp8(q, rq) and _same_fp8(qt, cq.t().contiguous()), scaling
        assert torch.equal(s, rs) and torch.equal(st, cs), scaling
    scale = torch.tensor(0.5)
    got, amax = [], []
    for tune in (True, False):  # delayed scaling: a scale given, this tensor's maximum recorded
        monkeypatch.setattr(tq, "autotuning", lambda device, tune=tune: tune)
        amax.append(torch.zeros(3, device=dev))
        got.append(tf.fp8_quantize_scaled(x.to(dev), scale.to(dev), amax=amax[-1], index=1))
    assert len(timed) == 5 * n  # the cast's new flags: timed once
    assert torch.equal(amax[0], amax[1]) and float(amax[0][1]) == float(x.abs().max())
    for a, b in zip(*got):  # q, its scale, qt, its scale
        assert torch.equal(a.cpu().float().nan_to_num(), b.cpu().float().nan_to_num()), (a, b)
        assert a.dtype == b.dtype and a.shape == b.shape


def test_the_mxfp8_fast_quantize_autotuner_times_each_warp_count_once_per_shape(monkeypatch):
    """On CUDA mxfp8_fast's quantize picks its warps and tiles a program by timing
    FAST_CUDA_CONFIGS (the static counts leave the choice open: fewer warps, fewer values crossing
    threads but more registers); a stand-in timing makes the last fastest here: it is taken, once
    per shape and block shape, and writes the torch regrouping's bytes."""
    needs_triton()

    import lowcomm.kernels.triton_quantize as tq
    from lowcomm.kernels.gemm import _regroup

    n = len(tq.FAST_CUDA_CONFIGS)
    timed = _stand_in_autotuning(monkeypatch, "mx_fast_quantize_dual", n)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(128, 384)  # 3 tiles along C: the last candidate sweeps them in one program
    for runs, (y, tile) in enumerate(((x, "1x128"), (x * 2, "1x128"), (x, "128x128")), start=1):
        q, s, _, _ = tq.mx_fast_quantize_dual(y.to(dev), tile=tile, cols=False)
        assert len(timed) == (1 if runs < 3 else 2) * n, (runs, len(timed))
        assert tq.last_tuned_config("mx_fast_quantize_dual") == tq.FAST_CUDA_CONFIGS[-1]
        rq, rs = _regroup(*quantize_mx(y, axis=-1), -1, 1 if tile == "1x128" else 128)
        assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s.cpu(), rs)


def test_the_interpreter_is_mended_only_where_triton_calls_int_on_an_array_numpy_refuses(monkeypatch):
    """Before triton 3.7 the interpreter turned a loop's bound into an int with ``int()`` of a
    one-element array, which numpy 2.4 refuses: under torch 2.11 (triton 3.6) 28 kernel tests
    failed so. The mend takes the element instead, and only for a triton before 3.7 under numpy
    2.4 or newer; here a stand-in for 3.6's patch of ``tl.tensor`` and the version it reports."""
    needs_triton()
    import operator
    import types

    import numpy as np
    import triton
    from triton.runtime import interpreter

    refuses = np.lib.NumpyVersion(np.__version__) >= "2.4.0"
    fixed = _compat.major_minor(triton.__version__) >= (3, 7)
    assert _compat.mend_triton_interpreter() == (refuses and not fixed)  # this process's triton

    class Tensor:  # what the interpreter hands a loop's bound: a tensor whose handle holds a (1,) array
        def __init__(self, value):
            self.handle = types.SimpleNamespace(data=np.array([value], dtype=np.int32))

    def before_3_7(tensor, scope=None):
        tensor.__index__ = lambda self: int(self.handle.data)

    mend = _compat.mend_triton_interpreter.__wrapped__  # (the cached one ran once, above)
    for version in ("3.7.0", "3.9.0"):
        monkeypatch.setattr(triton, "__version__", version)
        monkeypatch.setattr(interpreter, "_patch_lang_tensor", before_3_7)
        assert not mend() and interpreter._patch_lang_tensor is before_3_7
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    before_3_7(Tensor)
    if refuses:
        with pytest.raises(TypeError, match="0-dimensional"):
            operator.index(Tensor(5))
    assert mend() == refuses
    interpreter._patch_lang_tensor(Tensor, object())
    assert operator.index(Tensor(5)) == 5 and list(range(0, Tensor(7), 3)) == [0, 3, 6]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees the NaN block
@pytest.mark.parametrize("axis", [-1, 0])
def test_single_axis_triton_quantize_is_bit_identical_and_takes_a_ragged_other_side(axis):
    """mx_quantize (the dual kernel writing one copy) equals quantize_mx bit for bit; the side that
    is not blocked may end anywhere (40 here), at the default and the CUDA tiles."""
    needs_triton()
    from lowcomm.kernels.triton_quantize import QUANTIZE_CUDA_CONFIG, mx_quantize

    torch.manual_seed(1)
    x = torch.randn(96, 40) if axis == 0 else torch.randn(40, 96)
    x = (x * torch.logspace(-5, 5, x.shape[1])).to(torch.bfloat16)
    x[7, 3] = float("nan")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    d_ref, s_ref = quantize_mx(x, axis=axis)
    for config in (None, QUANTIZE_CUDA_CONFIG):
        d, sc = (t.cpu() for t in mx_quantize(x.to(dev), axis=axis, config=config))
        assert torch.equal(d.view(torch.uint8), d_ref.view(torch.uint8)) and torch.equal(sc, s_ref)
    with pytest.raises(ValueError, match="rows multiples of 32" if axis == 0 else "columns multiples"):
        mx_quantize(x.t().contiguous(), axis=axis)


def test_fused_quantize_refuses_shapes_it_cannot_take():
    needs_triton()
    from lowcomm.kernels.triton_quantize import mx_quantize_dual

    with pytest.raises(ValueError, match="multiples of 32"):
        mx_quantize_dual(torch.zeros(30, 64))
    with pytest.raises(ValueError, match="elem"):
        mx_quantize_dual(torch.zeros(32, 32), elem="e2m1")


def test_exact_mx_triton_gemm_matches_the_emulated_path():
    """The Hopper kernel (interpreted on CPU in CI) equals dequantize-then-matmul up to fp32 order."""
    needs_triton()
    torch.manual_seed(2)
    a = torch.randn(48, 96) * torch.logspace(-3, 3, 96)  # scales differ block to block
    b = torch.randn(96, 40)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    got = qmatmul(a.to(dev), b.to(dev), "mxfp8", backend="triton").cpu()
    ref = qmatmul(a, b, "mxfp8", backend="emulated")
    assert float((got - ref).abs().max() / ref.abs().max()) < fp8_gemm_tolerance(dev)


def test_the_triton_gemms_write_bf16_as_their_fp32_sums_rounded_once():
    """out_dtype=bfloat16 (what the MX layer writes under the trainer's autocast): each element is
    the fp32 result rounded to bf16, bit for bit, with no fp32 copy made; an integer output is
    refused by name."""
    needs_triton()
    from lowcomm.kernels.triton_mx_gemm import blockwise_matmul, mx_matmul

    torch.manual_seed(6)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    da, sa = quantize_mx(torch.randn(48, 128, device=dev), axis=1)
    db, sb = quantize_mx(torch.randn(128, 40, device=dev), axis=0)
    sa[0, 0] = 255  # a NaN block: row 0 is NaN either way
    got = mx_matmul(da, sa, db, sb, out_dtype=torch.bfloat16)
    want = mx_matmul(da, sa, db, sb).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got[0].isnan().all()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    qa, ga = torch.randn(48, 128, device=dev).to(torch.float8_e4m3fn), torch.rand(48, 1, device=dev) + 0.5
    qb, gb = torch.randn(128, 40, device=dev).to(torch.float8_e4m3fn), torch.rand(1, 40, device=dev) + 0.5
    got = blockwise_matmul(qa, ga, qb, gb, out_dtype=torch.bfloat16)
    assert torch.equal(got, blockwise_matmul(qa, ga, qb, gb).to(torch.bfloat16))
    with pytest.raises(ValueError, match="mx_matmul writes .*not torch.int32"):
        mx_matmul(da, sa, db, sb, out_dtype=torch.int32)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit as bf16, NaN for NaN."""
    return bool(((a.view(torch.int16) == b.view(torch.int16)) | (a.isnan() & b.isnan())).all())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's 0 x inf for NaN blocks
@pytest.mark.parametrize("elem", ["e4m3", "e5m2"])
def test_mx_dequantize_writes_the_references_bf16_bit_for_bit(elem):
    """The one-pass dequantize to bf16 equals ``dequantize_mx(..., dtype=bfloat16)`` bit for bit:
    every fp8 byte at every E8M0 scale (the NaN scale, and the smallest scales, whose values fall
    into bf16's subnormals and are rounded half to even), along rows and columns, and on data the
    quantize wrote (zeros, -0, NaN and inf blocks, blocks scaled near 2^-127). Above 2^-126 every
    value is exact: bf16 holds an MX value's 4 significant bits at fp32's range."""
    needs_triton()
    from lowcomm.kernels.triton_quantize import mx_dequantize

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    fp8 = torch.float8_e4m3fn if elem == "e4m3" else torch.float8_e5m2
    every = torch.arange(256, dtype=torch.uint8, device=dev).repeat(256, 1)  # a byte a column
    scale = torch.arange(256, dtype=torch.uint8, device=dev).view(256, 1)  # a scale a row
    got = mx_dequantize(every.view(fp8), scale.repeat(1, 8), -1)
    want = dequantize_mx(every.view(fp8), scale.repeat(1, 8), axis=-1, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16 and _same_bits(got, want)
    assert _same_bits(mx_dequantize(every.t().contiguous().view(fp8), scale.t().repeat(8, 1), 0), want.t())
    subnormal = want[:4].float().abs()  # scales 2^-127..2^-124: some values below 2^-126, rounded
    assert ((subnormal > 0) & (subnormal < 2.0**-126)).any()
    torch.manual_seed(5)
    x = torch.randn(64, 96, device=dev) * torch.logspace(-38, 38, 96, device=dev)
    x[3, :40], x[5, 7], x[9, 1], x[10, 70] = 0.0, -0.0, float("nan"), float("inf")
    x[11] *= 2.0**-100
    for axis in (-1, 0):
        d, s = quantize_mx(x, elem=elem, axis=axis)
        assert _same_bits(mx_dequantize(d, s, axis), dequantize_mx(d, s, axis=axis, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"scales \(R/32, C\), got \(64, 96\) and \(64, 3\)"):
        mx_dequantize(d, quantize_mx(x, axis=-1)[1], 0)
    with pytest.raises(ValueError, match="float8_e4m3fn or float8_e5m2 data, got torch.float32"):
        mx_dequantize(x, s, 0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's 0 x inf for NaN blocks
def test_the_mx_dequantize_autotuner_times_each_tile_once_per_shape_and_every_tile_writes_the_same_bits(
    monkeypatch,
):
    """On CUDA the dequantize picks its tile by timing DEQUANT_CUDA_CONFIGS; each candidate, pinned,
    writes dequantize_mx's bf16 bit for bit along either axis (a tile wider or taller than the
    tensor, a tensor of several tiles, NaN, inf, zeros, blocks near 2^-127); with a stand-in
    timing that makes the last candidate fastest it is taken, and a shape seen before is not
    timed again."""
    needs_triton()
    import lowcomm.kernels.triton_quantize as tq

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(6)
    x = torch.randn(160, 96) * torch.logspace(-38, 38, 96)
    x[3, :40], x[5, 7], x[9, 1], x[100, 70] = 0.0, -0.0, float("nan"), float("inf")
    x[11] *= 2.0**-100
    for axis in (-1, 0):
        d, s = quantize_mx(x, elem="e4m3", axis=axis)
        want = dequantize_mx(d, s, axis=axis, dtype=torch.bfloat16)
        for cfg in tq.DEQUANT_CUDA_CONFIGS:
            got = tq._run_dequant(d.to(dev), s.to(dev), axis != 0, False, config=cfg).cpu()
            assert _same_bits(got, want), (axis, cfg)
    timed = _stand_in_autotuning(monkeypatch, "mx_dequantize", len(tq.DEQUANT_CUDA_CONFIGS))
    for runs, axis in ((1, -1), (1, -1), (2, 0)):  # a shape and axis seen before are not timed again
        d, s = quantize_mx(x, elem="e4m3", axis=axis)
        got = tq.mx_dequantize(d.to(dev), s.to(dev), axis).cpu()
        assert len(timed) == runs * len(tq.DEQUANT_CUDA_CONFIGS), (axis, len(timed))
        assert tq.last_tuned_config("mx_dequantize") == tq.DEQUANT_CUDA_CONFIGS[-1]
        assert _same_bits(got, dequantize_mx(d, s, axis=axis, dtype=torch.bfloat16)), axis


def test_the_dequant_backend_is_exact_mx_through_a_bf16_gemm():
    """``backend="dequant"``: the operands quantized by the fused kernel, dequantized exactly to
    bf16 and multiplied by the bf16 GEMM give the emulated exact-MX product up to fp32 summation
    order (on this CPU: the same values, the same fp32 matmul, bit for bit), for operands read in
    place as transposed views too, with a bf16 result the fp32 one rounded; it serves mxfp8 only,
    and ``auto`` takes it for mxfp8 on sm_90 where torch.mm writes fp32 from bf16 (torch >= 2.8;
    before, the exact Triton GEMM), not for mxfp8_fast."""
    needs_triton()
    import lowcomm.kernels.gemm as gemm
    from lowcomm.kernels import triton_mx_gemm
    from lowcomm.kernels.triton_mx_gemm import mx_dequant_matmul

    torch.manual_seed(2)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(48, 96) * torch.logspace(-3, 3, 96)  # scales differ block to block
    b = torch.randn(96, 40)
    ref = qmatmul(a, b, "mxfp8", backend="emulated")
    got = qmatmul(a.to(dev), b.to(dev), "mxfp8", backend="dequant").cpu()
    assert float((got - ref).abs().max() / ref.abs().max()) < fp8_gemm_tolerance(dev)
    if dev == "cpu":
        assert torch.equal(got, ref)
    da, sa = quantize_mx(a.to(dev), axis=1)
    db, sb = quantize_mx(b.t().contiguous().to(dev), axis=1)  # B stored (N, K): read as its transpose
    c = mx_dequant_matmul(da, sa, db.t(), sb.t())
    other = mx_dequant_matmul(da, sa, db.t().contiguous(), sb.t().contiguous())  # B copied, not a view
    if dev == "cpu":
        assert torch.equal(c, other)
    else:  # cuBLAS may sum the two layouts in other orders
        assert float((c - other).abs().max() / c.abs().max()) < fp8_gemm_tolerance(dev)
    c16 = mx_dequant_matmul(da, sa, db.t(), sb.t(), out_dtype=torch.bfloat16)
    assert c16.dtype == torch.bfloat16 and float((c16.float() - c).abs().max() / c.abs().max()) <= 2**-8
    with pytest.raises(ValueError, match="backend 'dequant' serves mxfp8 only, not mxfp8_fast"):
        qmatmul(a, b, "mxfp8_fast", backend="dequant")
    with pytest.raises(ValueError, match="multiple of 32"):
        mx_dequant_matmul(da, sa, db[:, :64].t(), sb.t())
    for have_mm_dtype, want in ((True, "dequant"), (False, "triton")):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(gemm, "_capability", lambda device: (9, 0))
            mp.setattr(gemm, "_blockwise_scaled_mm_works", lambda device: False)
            mp.setattr(triton_mx_gemm, "MM_OUT_DTYPE", have_mm_dtype)
            assert choose_backend("mxfp8", torch.device("cuda", 0)) == want
            assert choose_backend("mxfp8_fast", torch.device("cuda", 0)) != "dequant"
            mp.setattr(gemm, "_capability", lambda device: (8, 0))
            with pytest.raises(ValueError, match=r"capability \(8, 0\).*sm_89 or newer"):
                choose_backend("mxfp8", torch.device("cuda", 0), "dequant")
    # what the CUDA path calls: torch.mm of bf16 operands writing fp32, checked on meta tensors,
    # whose kernel takes out_dtype from torch 2.10 (2.8's and 2.9's do not: CUDA's does, and a
    # compiled layer reaches it through lowcomm's operator, whose shape function is its own)
    if triton_mx_gemm.MM_OUT_DTYPE and torch.__version__ >= "2.10":
        meta = torch.zeros(4, 64, dtype=torch.bfloat16, device="meta")
        assert torch.mm(meta, meta.t(), out_dtype=torch.float32).dtype == torch.float32


def test_exact_mx_triton_gemm_refuses_what_it_cannot_serve():
    needs_triton()
    from lowcomm.kernels.triton_mx_gemm import mx_matmul

    d = torch.zeros(32, 64, dtype=torch.float8_e4m3fn)
    s = torch.full((32, 2), 127, dtype=torch.uint8)
    with pytest.raises(ValueError, match="multiple of 32"):
        mx_matmul(d, s, torch.zeros(48, 8, dtype=torch.float8_e4m3fn), s)
    with pytest.raises(ValueError, match="one device"):
        mx_matmul(d, s, d.t().contiguous(), s.t().to("meta"))
    with pytest.raises(ValueError, match="mxfp8 and mxfp8_fast only"):
        qmatmul(torch.zeros(4, 32), torch.zeros(32, 4), "fp8_rowwise", backend="triton")


@pytest.mark.parametrize("b_tile", ["1x128", "128x128"])
def test_fast_mx_triton_gemm_matches_the_emulated_fast_path(b_tile):
    """The block-scaled kernel (interpreted on CPU in CI) equals the emulated mxfp8_fast recipe up
    to fp32 order, K padded to whole groups of 128 (200 -> 256), B in 1x128 blocks or 128x128
    tiles (N padded 24 -> 128 for those)."""
    needs_triton()
    torch.manual_seed(3)
    a = torch.randn(40, 200) * torch.logspace(-4, 4, 200)  # block scales differ inside a group
    b = torch.randn(200, 24) * torch.logspace(-2, 2, 24)  # and across columns
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    got = qmatmul(a.to(dev), b.to(dev), "mxfp8_fast", backend="triton", b_tile=b_tile).cpu()
    ref = qmatmul(a, b, "mxfp8_fast", backend="emulated", b_tile=b_tile)
    assert got.shape == (40, 24)
    assert float((got - ref).abs().max() / ref.abs().max()) < fp8_gemm_tolerance(dev)
    exact = qmatmul(a, b, "mxfp8", backend="emulated")
    assert not torch.equal(ref, exact)  # it is the fast recipe's numerics, not exact MX
    if b_tile == "128x128":  # one scale for all 24 columns: the small ones lose precision
        rows = qmatmul(a, b, "mxfp8_fast", backend="emulated")
        err = lambda y: float(((y - exact)[:, :4]).norm() / exact[:, :4].norm())  # noqa: E731
        assert err(ref) > err(rows)


def test_128x128_regrouping_takes_the_tile_max_and_refuses_what_it_cannot_tile():
    from lowcomm.kernels.gemm import regroup_mx_128x128

    torch.manual_seed(7)
    w = torch.randn(256, 128)  # (K, N), blocked along K
    w[:128, 5] *= 64.0  # one column of the first K-tile far above the rest
    d, s = quantize_mx(w, axis=0)
    q, g = regroup_mx_128x128(d, s, axis=0)
    assert g.shape == (2, 1) and q.shape == w.shape
    tiles = s.view(2, 4, 128).int().amax(dim=(1, 2))  # the largest E8M0 byte of each tile
    assert torch.equal(torch.log2(g.view(2)).int() + 127, tiles)
    with pytest.raises(ValueError, match="multiples of 128"):
        regroup_mx_128x128(*quantize_mx(torch.randn(256, 96), axis=0), axis=0)
    with pytest.raises(ValueError, match="b_tile"):
        qmatmul(torch.zeros(4, 128), torch.zeros(128, 4), "mxfp8", b_tile="128x128")


def test_blockwise_triton_gemm_refuses_what_it_cannot_serve():
    needs_triton()
    from lowcomm.kernels.triton_mx_gemm import blockwise_matmul

    d = torch.zeros(4, 128, dtype=torch.float8_e4m3fn)
    e = torch.zeros(128, 8, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="float32 scales"):
        blockwise_matmul(d, torch.ones(4, 1, dtype=torch.uint8), e, torch.ones(1, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(M, K/128\)"):
        blockwise_matmul(d, torch.ones(4, 4), e, torch.ones(1, 8))
    with pytest.raises(ValueError, match="power of two"):
        blockwise_matmul(d, torch.ones(4, 1), e, torch.ones(1, 8), block=96)


def test_fast_mx_path_regroups_to_the_group_max_and_only_loses_small_blocks():
    from lowcomm.kernels.gemm import regroup_mx_1x128

    x = torch.randn(4, 256)
    x[:, 32:64] *= 2.0**-12  # one block of each group far below its neighbours
    d, s = quantize_mx(x)
    q, g = regroup_mx_1x128(d, s)
    assert g.shape == (4, 2) and torch.equal(torch.log2(g).int() + 127, s.view(4, 2, 4).int().amax(-1))
    y = (q.float().view(4, 2, 128) * g.unsqueeze(-1)).view(4, 256)
    exact = dequantize_mx(d, s)
    big = torch.ones(256, dtype=torch.bool)
    big[32:64] = False
    torch.testing.assert_close(y[:, big], exact[:, big], rtol=0, atol=0)  # blocks at the group max: unchanged
    small_err = float(((y[:, ~big] - exact[:, ~big]).abs() / exact[:, ~big].abs().clamp_min(1e-30)).mean())
    assert small_err > 0.05  # the small block lost precision (double rounding, near-underflow)
    with pytest.raises(ValueError, match="emulated"):
        qmatmul(torch.zeros(4, 128), torch.zeros(128, 4), "mxfp8_fast", backend="scaled_mm")


@pytest.mark.parametrize("backend", ["triton", "dequant"])
@pytest.mark.parametrize("grad_elem", ["e4m3", "e5m2"])
def test_fused_mx_linear_on_the_triton_backend_equals_the_emulated_layer(grad_elem, backend, monkeypatch):
    """The Triton training path (one dual quantize per tensor, the GEMMs reading transposed fp8
    copies in place, tokens padded 40 -> 64; interpreted on CPU in CI) gives the emulated layer's
    output and gradients up to fp32 summation order; so does the dequant backend, whose GEMMs
    dequantize those copies to bf16 for the bf16 GEMM (on a GPU its bf16 tensor cores sum at
    least as precisely as the fp8 ones the tolerance is set for)."""
    needs_triton()
    from lowcomm.kernels import LowPrecisionLinear, triton_quantize
    from lowcomm.kernels.triton_mx_gemm import MM_OUT_DTYPE

    if backend == "dequant" and torch.cuda.is_available() and not MM_OUT_DTYPE:  # its fp32 wgrad
        with pytest.raises(ValueError, match=r"torch >= 2\.8"):
            LowPrecisionLinear(64, 96, recipe="mxfp8", backend=backend).cuda()(torch.zeros(32, 64).cuda())
        return

    calls = []
    real = triton_quantize.mx_quantize_dual
    spy = lambda t, *a, **k: calls.append(tuple(t.shape)) or real(t, *a, **k)  # noqa: E731
    monkeypatch.setattr(triton_quantize, "mx_quantize_dual", spy)

    torch.manual_seed(4)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ref = LowPrecisionLinear(64, 96, recipe="mxfp8", grad_elem=grad_elem, backend="emulated")
    tri = LowPrecisionLinear(64, 96, recipe="mxfp8", grad_elem=grad_elem, backend=backend).to(dev)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, 20, 64) * torch.logspace(-2, 2, 64)  # block scales differ along K
    gy = torch.randn(2, 20, 96)
    outs = []
    for layer, d in ((ref, "cpu"), (tri, dev)):
        xi = x.detach().clone().to(d).requires_grad_()  # a leaf on either device
        y = layer(xi)
        y.backward(gy.to(d))
        outs.append([t.detach().cpu() for t in (y, xi.grad, layer.weight.grad, layer.bias.grad)])
    assert calls == [(64, 64), (96, 64), (64, 96)]  # x (padded), W, dy (padded): once each
    with torch.no_grad():  # evaluation: one copy each, no dual pass, the same output
        y = tri(x.to(dev))
    assert len(calls) == 3
    assert torch.equal(y.cpu(), outs[1][0])
    for name, r, t in zip(("y", "dx", "dW", "db"), *outs):
        assert r.shape == t.shape, name
        assert float((t - r).abs().max() / r.abs().max()) < max(1e-5, fp8_gemm_tolerance(dev)), name
    from lowcomm.kernels import triton_mx_gemm

    name = "mx_dequant_matmul" if backend == "dequant" else "mx_matmul"
    gemm, written = getattr(triton_mx_gemm, name), []
    spy_gemm = lambda *a, **k: written.append(k.get("out_dtype")) or gemm(*a, **k)  # noqa: E731
    monkeypatch.setattr(triton_mx_gemm, name, spy_gemm)
    with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16):
        y16 = tri(x.to(dev))
    assert y16.dtype == torch.bfloat16 and written == [torch.bfloat16]  # the GEMM writes bf16 itself
    assert float((y16.float().cpu() - y.cpu()).abs().max() / y.abs().max()) < 2**-8  # bf16 rounding


def test_blocks_per_sm_counts_registers_as_allocated_threads_and_shared_memory():
    """What an SM holds of a kernel (sm_90): its registers rounded up to 8 a thread, at most 2,048
    threads and 32 blocks, shared memory with 1 KiB reserved a block; 0 where a block cannot
    launch."""
    from lowcomm.kernels.triton_static import blocks_per_sm

    assert blocks_per_sm(154, 1, 0) == 12  # 160 registers x 32 threads: 12 of 65,536
    assert blocks_per_sm(125, 16, 16384) == 1  # 128 x 512 threads: the whole register file
    assert blocks_per_sm(64, 32, 0) == 1 and blocks_per_sm(65, 32, 0) == 0  # 72 x 1,024: too many
    assert blocks_per_sm(16, 1, 0) == 32  # the block limit
    assert blocks_per_sm(32, 8, 0) == 8  # 2,048 threads
    assert blocks_per_sm(32, 1, 100 * 1024) == 2  # 228 KiB of shared memory, 101 KiB a block


def test_triton_kernels_compile_for_hopper_and_blackwell_at_their_cuda_configs():
    """Ahead-of-time compile on CPU (triton's own ptxas, no GPU): the GEMM at every operand layout
    the training layers use, the dual quantize, the replicas' AdamW step (per tensor and
    multi-tensor), the clip's sums of squares, the e3m0 codec's encode and decode and the fp8
    transpose, for sm_90a, the exact-MX GEMM also for sm_100a.
    Each must compile with nothing spilled to local memory, fit an SM's shared memory, and the
    GEMMs must issue fp8 tensor-core MMAs (wgmma on Hopper, tcgen05 on Blackwell). Run in a child
    without TRITON_INTERPRET (this process interprets kernels)."""
    needs_triton()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns when unset; this is its default

    def start(arch, *only):
        return subprocess.Popen(
            [sys.executable, "-m", "lowcomm.kernels.triton_static", "--arch", str(arch)]
            + [a for o in only for a in ("--only", o)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def rows(child):
        out, err = child.communicate(timeout=240)
        assert child.returncode == 0, err[-2000:]
        return [json.loads(line) for line in out.splitlines()]

    # the kernels in three children at once (each starts torch and triton; the compiles are one
    # core's work each): the exact-MX GEMMs and the MX quantize (dual, row, col, e5m2 at the default
    # tiles, then the dual at each other candidate); the blockwise GEMMs, mxfp8_fast's quantize
    # (activations, gradients, weights), fp8's (amax and cast, tensorwise and rowwise; delayed's
    # one pass and the step making its scales) and the MX dequantize to bf16; Blackwell's
    children = [
        start(90, "mx_matmul", "bf16 -> e4m3", "fp32 -> e5m2"),
        start(
            90,
            "blockwise_matmul",
            "fp8_quantize",
            "fp8_delayed_step",
            "fp8_transpose",
            "mx_fast_quantize",
            "adamw_replicas",
            "adamw_multi",
            "sumsq_replicas",
            "mx_dequantize",
            "e3m0_",
        ),
        start(100, "mx_matmul (A k-major, B k-major)"),
    ]
    try:
        gemm_and_mx, quantize, blackwell = (rows(c) for c in children)
    finally:
        for c in children:
            c.kill()
            c.communicate()
    hopper = gemm_and_mx + quantize
    gemm = [r for r in hopper if "matmul" in r["kernel"]]
    quant = [r for r in hopper if r["kernel"].startswith("mx_quantize")]
    fast = [r for r in hopper if r["kernel"].startswith("mx_fast_quantize")]
    fp8 = [r for r in hopper if r["kernel"].startswith("fp8_quantize")]
    step = [r for r in hopper if r["kernel"].startswith("fp8_delayed_step")]  # delayed scaling's scales
    transpose = [r for r in hopper if r["kernel"].startswith("fp8_transpose")]  # eager's, compiled's
    adamw = [r for r in hopper if r["kernel"].startswith("adamw_replicas")]
    # the small parameters' one launch and the clip's sums of squares: tensors from a table
    tables = [r for r in hopper if r["kernel"].startswith(("adamw_multi", "sumsq_replicas"))]
    dequant = [r for r in hopper if r["kernel"].startswith("mx_dequantize")]
    codec = [r for r in hopper if r["kernel"].startswith("e3m0_")]  # Streaming's 4-bit codec
    from lowcomm.kernels.triton_quantize import QUANTIZE_CUDA_CONFIGS
    from lowcomm.kernels.triton_quantize import TRITON_VERSION as found
    from lowcomm.kernels.triton_static import BLACKWELL_TRITON

    assert len(gemm) == 6 and len(quant) == 3 + len(QUANTIZE_CUDA_CONFIGS) and len(blackwell) == 1
    if found < BLACKWELL_TRITON:  # an old triton cannot target Blackwell: refused by name, not a crash
        assert "cannot compile for sm_100: it needs triton >= 3.3" in blackwell.pop()["error"]
    from lowcomm.kernels.triton_fp8 import FP8_CUDA_CONFIGS

    # the dual's amax and cast (tensorwise, rowwise), the rowwise pair at each other autotuner
    # candidate, the one-copy kernel (rows' and columns' slices, whole rows of 4096, 8192 and
    # 16384) and delayed scaling's cast
    assert len(fp8) == 10 + 2 * (len(FP8_CUDA_CONFIGS) - 1) and fp8[-1]["constexprs"]["RECORD"], fp8[-1]
    for row in (r for r in fp8 if "whole rows" in r["kernel"]):  # 64 values a thread in registers,
        assert row["spill_instructions"] == 0, row  # none spilled; fp8 out in 16 bytes, scales in 4
        assert set(row["global_stores"]) == {"4", "16"}, row
    from lowcomm.kernels.triton_quantize import DEQUANT_CUDA_CONFIGS, FAST_CUDA_CONFIGS

    assert (
        len(fast) == 3 + len(FAST_CUDA_CONFIGS) - 1
        and len(adamw) == 2
        and len(tables) == 3
        and len(dequant) == 3 + len(DEQUANT_CUDA_CONFIGS) - 1
        and len(step) == 1
        and len(codec) == 2
        and len(transpose) == 2
    )
    for row in fast:  # a block sweeping several tiles has its loop pipelined: the next tile's copy
        assert (row["async_copies"] > 0) == (row["constexprs"]["TILES"] > 1), row  # runs ahead
    for row in adamw:  # the replicas' AdamW: whole-vector accesses, no trip through shared memory
        assert row["shared_bytes"] == 0 and row["barriers"] == 0, row
        assert {int(w) for w in row["global_stores"]} == ({8, 16} if "copy" in row["kernel"] else {16}), row
    for row in codec:  # the codec's payload and values leave in whole 16-byte packets
        widths = {int(w) for w in row["global_stores"]}  # (the encode's scales: a byte each)
        assert 16 in widths and widths <= {1, 16} and row["spill_instructions"] == 0, row
    for row in tables:  # offsets from an aligned argument: whole-vector stores all the same
        assert row["shared_bytes"] <= 64 and set(row["global_stores"]) == {
            "16" if "adamw" in row["kernel"] else "4"
        }, row
    for row in transpose:  # compiled fp8_delayed's and rowwise's transposed copies: 16-byte packets
        assert row["spill_instructions"] == 0, row  # (from triton 3.6; 3.2 writes a byte at a time)
        assert set(row["global_stores"]) == {"16"} if found >= (3, 6) else "1" in row["global_stores"], row
    for row in gemm + quant + blackwell + fp8 + fast + adamw + tables + dequant + step + codec + transpose:
        assert "error" not in row, row
        assert row["local_bytes"] == 0 and row["shared_fits"] and 0 < row["registers"] <= 255, row
        assert row["blocks_per_sm"] >= 1, row  # its registers and shared memory let a block launch
    # spilled registers (in the stack frame): none in what runs on Hopper without autotuning (the
    # first configuration of each kernel); an autotuner's other candidate may spill a few
    # registers (the timing decides: BENCHMARKS.md says which), not a loop's worth: under triton
    # 3.9, CI's. Older ones spill more (compiled here: mxfp8_fast's 4-tile candidates 168/130
    # under 3.2, 154/58 under 3.3, 52/34 under 3.6, its sweep 74 under 3.6; the MX dequantize 2
    # under 3.2)
    default_spills, candidate_spills = (0, 64) if found >= (3, 9) else (8, 256)
    for row in gemm + quant + fp8 + fast + adamw + dequant + step:
        candidate = "warp" in row["kernel"]  # the extra candidates' names give their warps
        assert row["spill_instructions"] <= (candidate_spills if candidate else default_spills), row
    for row in gemm:  # fp8 operands straight into the tensor cores, not an upcast
        assert row["mma"].startswith("wgmma.mma_async") and row["mma"].endswith("e4m3.e4m3"), row
    for row in blackwell:
        assert row["mma"].startswith("tcgen05.mma") and "f8f6f4" in row["mma"], row
    assert all(row["mma"] is None for row in quant + fp8 + fast + adamw + dequant + step + codec)
    for row in dequant:  # the bf16 values leave in whole 16-byte packets; subnormals kept (exactness)
        assert {int(w) for w in row["global_stores"]} == {16} and not row["ftz"], row
    for row in fast:  # fp8 data in whole 16-byte packets (before triton 3.6: the rows copy), fp32 scales
        widths = {int(w) for w in row["global_stores"]}  # (the sweep writes 4 scales a store)
        want = {16} if row["constexprs"]["SWEEP"] else {4, 16}
        assert widths == want if found >= (3, 6) else 16 in widths, row
    for row in quant:  # the MX data leaves in whole 16-byte packets (scales: a byte each)
        widths = {int(w) for w in row["global_stores"]}  # JSON keys: bytes per store
        assert max(widths) == 16 and widths <= {1, 2, 16}, row
    # fp8: every copy in 16-byte packets (the scales, where the kernel writes them: fp32, 8 bytes
    # a thread where a 1-warp tile gives a thread two columns). Triton 3.2 writes the transposed
    # copies a byte at a time (the same bytes, slower); 3.6 (the GPU image's) and 3.9 do not
    for row in [row for row in fp8 if " cast " in row["kernel"] or "one copy" in row["kernel"]]:
        widths = {int(w) for w in row["global_stores"]}
        want = {16} if "delayed" in row["kernel"] else {4, 16}
        old_ok = "columns" in row["kernel"] or 16 in widths  # only a transposed copy: byte stores
        if "warps)" in row["kernel"]:  # an autotuner candidate
            assert 16 in widths and widths <= {4, 8, 16} if found >= (3, 6) else old_ok, row
        else:
            assert widths == want if found >= (3, 6) else old_ok, row
    if found >= (3, 6):  # the default tile: each column's block in one warp (3.2 still syncs)
        assert quant[0]["barriers"] == 0, quant[0]


def test_on_a_gpu_the_quantize_kernels_leave_the_fp8_rounding_to_the_conversion():
    """Compiled for a GPU (HW_CVT, as every quantize kernel is launched on CUDA) the kernels round
    to fp8 with the conversion instruction (round half to even, as torch's conversion), not in
    fp32 arithmetic first: the rounding was about a dozen instructions per value (the MX dual
    quantize took 42 a value, above the 33 an H200 issues per value at copy bandwidth; it ran at
    43% of copy there). The compiled code is shorter by a tenth or more (triton 3.9:
    a third for the MX kernels, 18% for fp8's, whose IEEE division stays). The interpreter keeps
    the arithmetic rounding (its conversion mis-rounds), which the byte-for-byte tests check; on a
    GPU the same tests check the conversion's bytes."""
    needs_triton()
    from lowcomm.kernels import triton_fp8, triton_quantize
    from lowcomm.kernels.triton_quantize import hw_cvt

    assert not hw_cvt(torch.zeros(1))  # CPU tensors run interpreted: the arithmetic rounding
    with pytest.MonkeyPatch.context() as mp:  # a CUDA tensor outside the interpreter: the conversion
        from types import SimpleNamespace

        mp.delenv("TRITON_INTERPRET", raising=False)
        assert hw_cvt(SimpleNamespace(is_cuda=True))
        mp.setenv("LOWCOMM_FP8_HW_CVT", "0")  # unless asked for the arithmetic rounding
        assert not hw_cvt(SimpleNamespace(is_cuda=True))
    specs = triton_quantize.static_specs() + triton_fp8.static_specs()
    # the maxima kernels and the delayed scaling's step convert nothing; the dequantize reads fp8
    skip = ("amax (", "delayed_step", "mx_dequantize", "fp8_transpose")  # (the transpose moves bytes)
    casts = [s for s in specs if not any(k in s.name for k in skip)]
    assert casts and all(s.constexprs["HW_CVT"] is True for s in casts)
    code = """
import dataclasses, json, sys
from lowcomm.kernels import triton_fp8, triton_quantize
from lowcomm.kernels.triton_static import compile_report
specs = triton_quantize.static_specs() + triton_fp8.static_specs()
out = {}
for name in sys.argv[1:]:
    spec = next(s for s in specs if s.name == name)
    arithmetic = dataclasses.replace(spec, constexprs={**spec.constexprs, "HW_CVT": False})
    out[name] = [compile_report(spec)["sass_instructions"], compile_report(arithmetic)["sass_instructions"]]
print(json.dumps(out))
"""
    names = [
        "mx_quantize_dual (bf16 -> e4m3, rceil)",
        "mx_fast_quantize_dual (1x128, both copies, bf16 to e4m3)",
        "fp8_quantize_dual cast (tensorwise, bf16 to e4m3)",
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", code, *names], env=env, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for name, (conversion, arithmetic) in json.loads(out.stdout.splitlines()[-1]).items():
        assert 0 < conversion <= 0.9 * arithmetic, (name, conversion, arithmetic)


def _emulated_and_scaled_mm_layers(
    recipe: str, tokens: int, between=lambda: None, device="cpu", features=(64, 96), backend="scaled_mm"
) -> list[list[torch.Tensor]]:
    """y, dx and dW of one Linear (``features``, 2 x ``tokens`` tokens) in ``recipe``, emulated and
    through ``backend`` (torch._scaled_mm: whatever stands in for it); ``between()`` runs after
    the first."""
    torch.manual_seed(8)
    k, n = features
    ref = LowPrecisionLinear(k, n, recipe=recipe, backend="emulated", device=device)
    fast = LowPrecisionLinear(k, n, recipe=recipe, backend=backend, device=device)
    fast.load_state_dict(ref.state_dict())
    x = (torch.randn(2, tokens, k) * torch.logspace(-1, 1, k)).to(device)
    gy = torch.randn(2, tokens, n).to(device)
    outs = []
    for layer in (ref, fast):
        xi = x.detach().clone().requires_grad_()
        y = layer(xi)
        y.backward(gy)
        outs.append([t.detach() for t in (y, xi.grad, layer.weight.grad)])
        between()
    return outs


def _same_fp8(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal bytes, except that a NaN may have either sign (x86 makes -NaN of inf/inf, CUDA +NaN)."""
    g, w = got.view(torch.uint8), want.view(torch.uint8)
    nan = want.float().isnan()
    return torch.equal(got.float().isnan(), nan) and torch.equal(g[~nan], w[~nan])


def _hard_input(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Values over 12 decades (by column), a zero row, a row of values about 1e-37 (an fp8
    rowwise scale of its maximum / 448 would be below FP8_MIN_SCALE), NaN, both infinities and a
    subnormal."""
    torch.manual_seed(seed)
    x = (torch.randn(rows, cols) * torch.logspace(-6, 6, cols)).to(dtype)
    x[2] = 0.0
    # normal floats (Triton's interpreter misreads bf16 subnormals; a GPU and torch do not)
    x[13] = ((1 + torch.rand(cols)) * torch.randn(cols).sign() * 1e-37).to(dtype)
    x[3, 5] = float("nan")
    x[6, 7], x[9, cols - 20] = float("inf"), float("-inf")
    x[11, 4] = 1e-40 if dtype == torch.float32 else 1e-30
    return x


def _count_launches(monkeypatch, module, kernel: str) -> list:
    """The grids ``module.<kernel>`` is launched with from now on (it still runs)."""
    launches, real = [], getattr(module, kernel)

    class Counted:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(module, kernel, Counted())
    return launches


def _fp8_dual_cases():  # (on a CPU each candidate for two formats, as _dual_cases)
    on_cpu = {(torch.bfloat16, "e4m3", "rowwise"), (torch.float32, "e5m2", "tensorwise")}
    for tiles in ("default", *range(5)):
        for dtype in (torch.float32, torch.bfloat16):
            for elem in ("e4m3", "e5m2"):
                for scaling in ("rowwise", "tensorwise"):
                    if tiles == "default" or torch.cuda.is_available() or (dtype, elem, scaling) in on_cpu:
                        case = f"{tiles}-{dtype}-{elem}-{scaling}"
                        yield pytest.param(scaling, elem, dtype, tiles, id=case)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees inf/inf
@pytest.mark.parametrize(("scaling", "elem", "dtype", "tiles"), list(_fp8_dual_cases()))
def test_fp8_quantize_dual_is_bit_identical_to_quantize_fp8(scaling, elem, dtype, tiles):
    """The Triton fp8 quantize (interpreted on CPU in CI) against the torch reference, byte for
    byte, for the copy as it is and the transposed one, at the default tiles and at each CUDA
    candidate the autotuner may take (on a CPU for two formats that take both elements, both
    scalings and both input dtypes): a (70, 100) input ends inside every tile; a zero row, NaN,
    infinities, a subnormal input and values over 12 decades."""
    needs_triton()
    from lowcomm.kernels.triton_fp8 import FP8_CUDA_CONFIGS, fp8_quantize_dual

    assert len(FP8_CUDA_CONFIGS) == 5  # (the parameters above name each)
    x = _hard_input(70, 100, dtype, seed=1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    config = None if tiles == "default" else FP8_CUDA_CONFIGS[tiles]
    q, s, qt, st = (t.cpu() for t in fp8_quantize_dual(x.to(dev), elem, scaling, config=config))
    rq, rs = quantize_fp8(x, elem, scaling, axis=-1)
    cq, cs = quantize_fp8(x, elem, scaling, axis=0)
    assert q.shape == (70, 100) and qt.shape == (100, 70) and qt.is_contiguous()
    assert _same_fp8(q, rq) and _same_fp8(qt, cq.t().contiguous())
    assert s.shape == rs.shape and st.shape == cs.shape
    assert torch.equal(s, rs) and torch.equal(st, cs)  # every scale finite: NaN rows get scale 1


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees inf/inf
@pytest.mark.parametrize("elem,rule", [("e4m3", "rceil"), ("e5m2", "floor")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mx_fast_quantize_dual_is_bit_identical_to_the_torch_regrouping(elem, rule, dtype):
    """mxfp8_fast's operands in one pass (interpreted on CPU in CI) against quantize_mx regrouped
    in torch ops, byte for byte and scale for scale, in 1x128 blocks and 128x128 tiles, both
    copies and each alone, from bf16 at every CUDA candidate (a program of 4 tiles sweeps 3; the
    one-warp program reads its tiles in 32 x 64 parts), with the strides cuBLAS's blockwise GEMM
    reads: values over 12 decades, a zero row, an all-zero tile (scale 2^-127), NaN and
    infinities (a group holding one: scale inf, its finite blocks 0), a subnormal."""
    needs_triton()
    from lowcomm.kernels.gemm import _regroup
    from lowcomm.kernels.triton_quantize import FAST_CUDA_CONFIGS, mx_fast_quantize_dual

    x = _hard_input(256, 384, dtype, seed=7)
    x[128:, 256:] = 0.0
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for tile, across in (("1x128", 1), ("128x128", 128)):
        rq, rs = _regroup(*quantize_mx(x.float(), elem=elem, scale_rule=rule, axis=-1), -1, across)
        cq, cs = _regroup(*quantize_mx(x.float(), elem=elem, scale_rule=rule, axis=0), 0, across)
        # the default, and for bf16 (what the layers hand it) every candidate the tuner may pick (on
        # a GPU each compiles: the check's tests section has a slot of seconds; interpreted on a
        # CPU, for e4m3 only: the tiles' code does not depend on the element, see _SWEEP_ON_CPU)
        sweep = dtype == torch.bfloat16 and (elem == "e4m3" or torch.cuda.is_available())
        for config in (None, *FAST_CUDA_CONFIGS) if sweep else (None,):
            q, s, qt, st = mx_fast_quantize_dual(x.to(dev), elem, tile, rule, config=config)
            assert _same_fp8(q.cpu(), rq) and _same_fp8(qt.cpu(), cq.t().contiguous()), (tile, config)
            assert torch.equal(s.cpu(), rs) and torch.equal(st.cpu(), cs), (tile, config)
        assert torch.isinf(s).any() and (s == 2.0**-127).any(), tile  # the NaN group, the zero one
        want = ((1, 256), (384, 1)) if tile == "1x128" else ((3, 1), (1, 2))
        assert (s.stride(), st.stride()) == want, tile
        q1, s1, none, _ = mx_fast_quantize_dual(x.to(dev), elem, tile, rule, cols=False)
        none2, _, qt1, st1 = mx_fast_quantize_dual(x.to(dev), elem, tile, rule, rows=False)
        assert none is None and none2 is None
        assert torch.equal(q1.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s1, s), tile
        assert torch.equal(qt1.view(torch.uint8), qt.view(torch.uint8)) and torch.equal(st1, st), tile


def test_mx_fast_quantize_dual_refuses_bad_input():
    needs_triton()
    from lowcomm.kernels.triton_quantize import mx_fast_quantize_dual

    x = torch.zeros(128, 256)
    with pytest.raises(ValueError, match="multiples of 128, got \\(128, 96\\)"):
        mx_fast_quantize_dual(x[:, :96])
    with pytest.raises(ValueError, match="tile must be one of \\['1x128', '128x128'\\], got '32x32'"):
        mx_fast_quantize_dual(x, tile="32x32")
    with pytest.raises(ValueError, match="at least one copy"):
        mx_fast_quantize_dual(x, rows=False, cols=False)
    with pytest.raises(ValueError, match="elem must be 'e4m3' or 'e5m2', got 'e2m1'"):
        mx_fast_quantize_dual(x, "e2m1")
    with pytest.raises(ValueError, match="takes fp32, bf16 or fp16, got torch.float64"):
        mx_fast_quantize_dual(x.double())
    # a launch config it cannot take: no tiles, an MX tile key, a sweep of several tiles
    for config in ({"TILES": 0}, {"num_warps": 4, "BLOCK_R": 32}, {"TILES": 2, "SWEEP": True}):
        with pytest.raises(
            ValueError, match="config takes num_warps, TILES \\(>= 1\\) and SWEEP \\(with TILES 1\\), got"
        ):
            mx_fast_quantize_dual(x, config=config)
    if hasattr(torch.ops.lowcomm, "mx_fast_quantize"):  # the operator called directly checks too
        with pytest.raises(ValueError, match="multiples of 128, got \\(128, 96\\)"):
            torch.ops.lowcomm.mx_fast_quantize(x[:, :96], "e4m3", "rceil", False, True, True)


@pytest.mark.parametrize("scaling", ["rowwise", "tensorwise"])
def test_fp8_quantize_dual_is_two_launches_and_one_fill(scaling, monkeypatch):
    """Both copies, dynamic scaling: the amax kernel, then the cast kernel, which takes the scales
    from the maxima itself; the only other work on the device is one fill of the maxima's buffer
    (no torch arithmetic for the scales between the kernels: on a GPU each op is a launch)."""
    needs_triton()
    from torch.utils._python_dispatch import TorchDispatchMode

    import lowcomm.kernels.triton_fp8 as triton_fp8

    order = []

    class Stub:  # records the launch, runs nothing: what is counted is the host's work
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: order.append(self.name)

    class Work(TorchDispatchMode):  # operations that launch work: not views, not allocations
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if not getattr(func, "is_view", False) and not name.startswith("aten.empty"):
                order.append(name)
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(triton_fp8, "_fp8_amax_kernel", Stub("amax"))
    monkeypatch.setattr(triton_fp8, "_fp8_cast_kernel", Stub("cast"))
    x = torch.randn(96, 160)
    with Work():
        q, s, qt, st = triton_fp8._fp8_quantize_dual(x, "e4m3", scaling, True, True)
    assert len(order) == 3 and order[0].startswith("aten.zero") and order[1:] == ["amax", "cast"], order
    assert q.shape == (96, 160) and qt.shape == (160, 96)
    want = ((), ()) if scaling == "tensorwise" else ((96, 1), (1, 160))
    assert (s.shape, st.shape) == want
    assert s.data_ptr() != st.data_ptr()  # outputs may not alias


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees inf/inf
@pytest.mark.parametrize("elem", ["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tiles", ["default", "cuda", "slices", "one_row"])
def test_one_rowwise_fp8_copy_is_made_in_one_pass_bit_identical(elem, dtype, tiles, monkeypatch):
    """One rowwise copy (evaluation, or a backward that needs only dx or only dW): one launch that
    takes each slice's maxima and casts it, no amax pass, byte for byte quantize_fp8 along either
    axis; (70, 300) spans several column blocks of the interpreter's tiles and of the slices, with
    a zero row, NaN, infinities and a subnormal. CUDA's tiles for rows of 300 are whole rows, 16
    to a block (read once); one_row: one row a block."""
    needs_triton()
    import lowcomm.kernels.triton_fp8 as triton_fp8

    launches = _count_launches(monkeypatch, triton_fp8, "_fp8_one_copy_kernel")
    monkeypatch.setattr(triton_fp8, "_fp8_amax_kernel", None)  # the two-pass path must not run
    x = _hard_input(70, 300, dtype, seed=5)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    configs = {
        "default": lambda rows: None,
        "cuda": lambda rows: triton_fp8.one_copy_config(x.shape, rows),
        "slices": lambda rows: triton_fp8.FP8_ONE_COPY_CUDA[rows],
        "one_row": lambda rows: {"BLOCK_R": 1, "BLOCK_C": 512, "num_warps": 4} if rows else None,
    }
    assert triton_fp8.one_copy_config(x.shape, True) == {"BLOCK_R": 16, "BLOCK_C": 512, "num_warps": 4}
    for rows in (True, False):
        config = configs[tiles](rows)
        q, s, qt, st = triton_fp8._fp8_one_copy(x.to(dev), elem, rows, config)
        want, want_s = quantize_fp8(x, elem, "rowwise", axis=-1 if rows else 0)
        got, got_s = (q, s) if rows else (qt, st)
        assert _same_fp8(got.cpu(), want if rows else want.t().contiguous()), rows
        assert torch.equal(got_s.cpu(), want_s), rows
    assert len(launches) == 2


@pytest.mark.parametrize("rows", [True, False])
def test_one_rowwise_fp8_copy_takes_one_pass_only_where_its_slices_fill_the_gpu(rows, monkeypatch):
    """On a GPU one pass (a program per slice of whole rows, or of whole columns) is taken where its
    grid gives every SM two programs, two passes over (row, column) tiles elsewhere: a weight's
    columns in 64-column slices ran at half the rows' speed on an H200. On a pretend GPU of 3 SMs: 5 slices of
    128 rows of 40 (one block each) or of 64 columns are too few, 6 are enough; the bytes are the
    same either way."""
    needs_triton()
    import lowcomm.kernels.triton_fp8 as triton_fp8

    assert triton_fp8._one_pass_fills(torch.zeros(1, 1), rows)  # the interpreter: always one pass
    one = _count_launches(monkeypatch, triton_fp8, "_fp8_one_copy_kernel")
    two = _count_launches(monkeypatch, triton_fp8, "_fp8_amax_kernel")
    monkeypatch.setattr(triton_fp8, "_sm_count", lambda device: 3)
    cfg = triton_fp8.one_copy_config((1, 40) if rows else (40, 1), rows)  # rows: 128 whole rows
    slice_ = cfg["BLOCK_R"] if rows else cfg["BLOCK_C"]
    made = []
    for slices in (5, 6):
        n = slices * slice_ - 1  # the last slice part-filled
        x = _hard_input(*((n, 40) if rows else (40, n)), torch.float32, seed=slices)
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        q, s, qt, st = triton_fp8.fp8_quantize_dual(x.to(dev), "e4m3", "rowwise", rows=rows, cols=not rows)
        made.append((len(one), len(two)))
        want, want_s = quantize_fp8(x, "e4m3", "rowwise", axis=-1 if rows else 0)
        got, got_s = (q, s) if rows else (qt, st)
        assert _same_fp8(got.cpu(), want if rows else want.t().contiguous())
        assert torch.equal(got_s.cpu(), want_s)
    assert made == [(0, 1), (1, 1)], made  # 5 slices: two passes; 6: one


@pytest.mark.parametrize("scaling", ["rowwise", "tensorwise"])
def test_fp8_quantize_dual_makes_only_the_copies_asked_for_and_refuses_bad_input(scaling):
    """One copy (evaluation; a backward wanting only dx or only dW) in either scaling: the bytes
    and scale of that copy, nothing written for the other (tensorwise once wrote its scale into
    the empty buffer of the copy not made: a segfault here, an illegal address on a GPU)."""
    needs_triton()
    from lowcomm.kernels.triton_fp8 import fp8_quantize_dual

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # Triton runs on CUDA tensors there
    x = torch.randn(48, 32, device=dev)
    dq, ds = quantize_fp8(x, "e4m3", scaling, axis=0)
    q, s, qt, st = fp8_quantize_dual(x, scaling=scaling, rows=False)
    assert q is None and s is None and _same_fp8(qt, dq.t()) and torch.equal(st.reshape(-1), ds.reshape(-1))
    dq, ds = quantize_fp8(x, "e4m3", scaling)
    q, s, qt, st = fp8_quantize_dual(x, scaling=scaling, cols=False)
    assert qt is None and st is None and _same_fp8(q, dq) and torch.equal(s.reshape(-1), ds.reshape(-1))
    with pytest.raises(ValueError, match="scaling must be one of"):
        fp8_quantize_dual(x, scaling="blockwise")
    with pytest.raises(ValueError, match="elem must be"):
        fp8_quantize_dual(x, elem="e2m1")
    with pytest.raises(ValueError, match="2-D"):
        fp8_quantize_dual(x[None])
    with pytest.raises(ValueError, match="at least one copy"):
        fp8_quantize_dual(x, rows=False, cols=False)
    with pytest.raises(ValueError, match="powers of two"):
        fp8_quantize_dual(x, config={"BLOCK_R": 48})


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees inf/inf
@pytest.mark.parametrize("elem", ["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_quantize_scaled_casts_in_one_pass_and_records_the_maximum(elem, dtype, monkeypatch):
    """Delayed scaling's quantize: one launch of the cast kernel (no amax pass) writes both copies
    byte for byte as fp8_cast with the given scale (values past it saturate), and keeps a running
    maximum of |x| in amax[index] (NaN propagates, as torch's amax does); torch ops where Triton
    does not run write the same bytes and record the same maxima."""
    needs_triton()
    import lowcomm.kernels.gemm as gemm
    import lowcomm.kernels.triton_fp8 as triton_fp8
    from lowcomm.kernels.gemm import fp8_cast
    from lowcomm.kernels.triton_fp8 import fp8_quantize_scaled

    torch.manual_seed(2)
    x = (torch.randn(70, 100) * torch.logspace(-4, 4, 100)).to(dtype)
    x[2] = 0.0
    x[6, 7], x[9, 1] = float("inf"), float("-inf")
    scale = torch.tensor(0.37)  # 448 * 0.37 = 166: larger values saturate
    want = fp8_cast(x, scale, elem)
    top = x.float().abs().max()
    launches = _count_launches(monkeypatch, triton_fp8, "_fp8_cast_kernel")
    monkeypatch.setattr(triton_fp8, "_fp8_amax_kernel", None)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    amax = torch.tensor([5.0, 0.0, 2.0**100], device=dev)
    q, s, qt, st = (t.cpu() for t in fp8_quantize_scaled(x.to(dev), scale.to(dev), elem, amax=amax, index=1))
    assert len(launches) == 1
    assert _same_fp8(q, want) and _same_fp8(qt, want.t().contiguous()) and qt.is_contiguous()
    assert float(s) == float(st) == float(scale)
    assert amax.cpu().tolist() == [5.0, float(top), 2.0**100]  # inf here; the others untouched
    x[6, 7], x[9, 1] = 1.0, 1.0
    fp8_quantize_scaled(x.to(dev), scale.to(dev), elem, amax=amax, index=2, rows=False)
    assert float(amax[2]) == 2.0**100  # a running maximum
    x[3, 3] = float("nan")
    fp8_quantize_scaled(x.to(dev), scale.to(dev), elem, amax=amax, index=0, cols=False)
    assert math.isnan(float(amax[0]))
    q2, _, qt2, _ = fp8_quantize_scaled(x.to(dev), scale.to(dev), elem)  # no amax: nothing recorded
    assert _same_fp8(q2.cpu(), fp8_cast(x, scale, elem)) and len(launches) == 4

    monkeypatch.setattr(gemm, "_triton_runs_on", lambda device: False)  # the torch ops
    amax_t = torch.zeros(3)
    q3, _, qt3, _ = fp8_quantize_scaled(x, scale, elem, amax=amax_t, index=1)
    assert len(launches) == 4 and _same_fp8(q3, q2.cpu()) and _same_fp8(qt3, qt2.cpu())
    assert math.isnan(float(amax_t[1])) and float(amax_t[0]) == 0.0


def test_fp8_quantize_scaled_refuses_bad_input():
    from lowcomm.kernels.triton_fp8 import fp8_quantize_scaled

    x, one = torch.randn(32, 16), torch.tensor(1.0)
    with pytest.raises(ValueError, match="scale must be one fp32 value"):
        fp8_quantize_scaled(x, torch.ones(2))
    with pytest.raises(ValueError, match="scale must be one fp32 value"):
        fp8_quantize_scaled(x, torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="entry at index 3"):
        fp8_quantize_scaled(x, one, amax=torch.zeros(3), index=3)
    with pytest.raises(ValueError, match="1-D fp32"):
        fp8_quantize_scaled(x, one, amax=torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="elem must be"):
        fp8_quantize_scaled(x, one, "e2m1")
    with pytest.raises(ValueError, match="2-D"):
        fp8_quantize_scaled(x[0], one)
    with pytest.raises(ValueError, match="at least one copy"):
        fp8_quantize_scaled(x, one, rows=False, cols=False)
    with pytest.raises(ValueError, match="scale must be on x's device cpu, got meta"):
        fp8_quantize_scaled(x, one.to("meta"))


@pytest.mark.parametrize("shape", [(1, 1), (37, 70), (64, 96), (0, 5)])
def test_fp8_transpose_writes_the_transposed_copy_byte_for_byte(shape, monkeypatch):
    """fp8_transpose (the transposed copy compiled fp8_delayed and fp8_rowwise make on a GPU): one launch
    of the tiled kernel per tensor (none for an empty one) writes ``q.t().contiguous()``'s bytes,
    whatever the one-byte dtype and the tile edges; where Triton does not run, torch's copy. A
    tensor that is not 2-D of one-byte elements is refused by name."""
    needs_triton()
    import lowcomm.kernels.gemm as gemm
    import lowcomm.kernels.triton_fp8 as triton_fp8
    from lowcomm.kernels.triton_fp8 import fp8_transpose

    launches = _count_launches(monkeypatch, triton_fp8, "_transpose_bytes_kernel")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(3)
    raw = torch.randint(0, 256, shape, dtype=torch.uint8)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8):
        q = raw.view(dtype)
        out = fp8_transpose(q.to(dev)).cpu()
        assert out.dtype == dtype and out.shape == shape[::-1] and out.is_contiguous()
        assert torch.equal(out.view(torch.uint8), raw.t().contiguous())  # NaN bytes compare too
    assert len(launches) == (3 if raw.numel() else 0)
    monkeypatch.setattr(gemm, "_triton_runs_on", lambda device: False)
    assert torch.equal(fp8_transpose(raw).view(torch.uint8), raw.t().contiguous())
    assert len(launches) == (3 if raw.numel() else 0)
    with pytest.raises(ValueError, match="2-D tensor of one-byte elements, got torch.bfloat16"):
        fp8_transpose(torch.zeros(4, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"one-byte elements, got torch.uint8 \(2, 2, 2\)"):
        fp8_transpose(torch.zeros(2, 2, 2, dtype=torch.uint8))


def _delayed_reference(x, w, b, gy, sx, sw, sg):
    """y, dx, dW of a tensorwise fp8 Linear with the scales given: fp8_cast of each tensor, the
    products of the dequantized values in fp32 (the emulated recipe)."""
    from lowcomm.kernels.gemm import fp8_cast

    def deq(t, s):
        return fp8_cast(t, s, "e4m3").float() * s

    x2, g2 = x.reshape(-1, x.shape[-1]), gy.reshape(-1, gy.shape[-1])
    y = (deq(x2, sx) @ deq(w, sw).t()).reshape(*x.shape[:-1], -1) + b
    return y, (deq(g2, sg) @ deq(w, sw)).reshape(x.shape), deq(g2, sg).t() @ deq(x2, sx)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_delayed_scaling_scales_each_step_from_the_maxima_of_the_steps_before():
    """fp8_delayed: the first training step is scaled dynamically (the same numbers as
    fp8_tensorwise); each later step takes its scales from the largest finite maxima of x, W and
    dy among the last amax_history_len steps (a step whose x held inf does not set them; a step
    whose x outgrew them saturates), evaluation uses them and records nothing, and the history is
    not part of the model's state."""
    from lowcomm.kernels.gemm import fp8_scale

    torch.manual_seed(4)
    dyn = LowPrecisionLinear(64, 96, recipe="fp8_tensorwise", backend="emulated")
    layer = Float8Linear(64, 96, scaling="delayed", backend="emulated", amax_history_len=2)
    layer.load_state_dict(dyn.state_dict())
    assert set(layer.state_dict()) == {"weight", "bias"}
    w = layer.weight.detach()
    gains = [1.0, 4.0, "inf", 2.0, 0.5]
    maxima = []  # per step: max |x|, max |W|, max |dy|
    for step, gain in enumerate(gains):
        x = torch.randn(2, 20, 64) * (1.0 if gain == "inf" else gain)
        if gain == "inf":
            x[1, 3, 5] = float("inf")
        gy = torch.randn(2, 20, 96) * 1e-3 * (step + 1)
        xi = x.clone().requires_grad_()
        layer.weight.grad = None
        y = layer(xi)
        y.backward(gy)
        got = (y.detach(), xi.grad, layer.weight.grad)
        if step == 0:  # dynamic: each tensor's own maximum
            xd = x.clone().requires_grad_()
            dyn(xd).backward(gy)
            assert torch.equal(got[0], dyn(x).detach()) and torch.equal(got[1], xd.grad)
            assert torch.equal(got[2], dyn.weight.grad)
        else:
            window = torch.tensor(maxima[-2:])  # the last two steps
            top = torch.where(window.isfinite(), window, 0).amax(0)
            sx, sw, sg = fp8_scale(top[0]), fp8_scale(top[1]), fp8_scale(top[2])
            want = _delayed_reference(x, w, layer.bias.detach(), gy, sx, sw, sg)
            for name, g, r in zip(("y", "dx", "dW"), got, want):
                if step == 3:  # x's scale from step 1 (the inf of step 2 left out): all finite
                    assert g.isfinite().all(), name
                torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6, msg=name)
            if step == 1:  # x grew 4x past the step before: its largest values saturated
                assert float(layer.fp8_amax[0]) > 448 * float(sx)
        maxima.append([float(x.abs().max()), float(w.abs().max()), float(gy.abs().max())])
        assert torch.equal(layer.fp8_amax, torch.tensor(maxima[-1]))  # this step's, until the next
        hist = torch.tensor((maxima[:-1][::-1] + [[0.0] * 3] * 2)[:2]).t()  # (3, 2): newest first
        assert torch.equal(layer.fp8_amax_history, hist)
    before = (layer.fp8_amax.clone(), layer.fp8_amax_history.clone())
    with torch.no_grad():
        x = torch.randn(5, 64) * 100
        y = layer(x)
    assert torch.equal(layer.fp8_amax, before[0]) and torch.equal(layer.fp8_amax_history, before[1])
    hist = layer.fp8_amax_history  # steps 3 and 2: x's inf of step 2 is left out
    top = torch.where(hist.isfinite(), hist, 0).amax(1)
    assert math.isinf(hist[0, 1]) and float(top[0]) == float(hist[0, 0])
    sx, sw = fp8_scale(top[0]), fp8_scale(top[1])
    want = _delayed_reference(x, w, layer.bias.detach(), torch.zeros(5, 96), sx, sw, torch.tensor(1.0))[0]
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    layer.to(torch.bfloat16)
    layer(torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True)).sum().backward()
    assert layer.fp8_amax.dtype == layer.fp8_amax_history.dtype == torch.float32  # maxima stay fp32


@pytest.mark.parametrize("length", [16, 5])
def test_the_delayed_step_kernel_moves_the_history_and_scales_as_the_torch_ops_do(length):
    """fp8_delayed_step (one launch a layer and step) against the torch operations it replaces: the
    history moved and the maxima restarted on training steps only, and the scales bit for bit,
    with zero, infinite, NaN, subnormal and tiny maxima (a scale at FP8_MIN_SCALE) among them;
    each scale starts 16-byte aligned, as cuBLASLt reads a scale."""
    needs_triton()
    from lowcomm.kernels.formats import FP8_MIN_SCALE
    from lowcomm.kernels.gemm import fp8_scale
    from lowcomm.kernels.triton_fp8 import fp8_delayed_step

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(length)
    fmax = torch.tensor([448.0, 448.0, 57344.0], device=dev)
    hist, amax = torch.zeros(3, length, device=dev), torch.zeros(3, device=dev)
    k_hist, k_amax = hist.clone(), amax.clone()
    special = [0.0, float("inf"), float("nan"), 1e-40, 3e38, 1e-41]
    for step in range(length + 4):
        new = torch.rand(3, generator=gen) * 10.0 ** torch.randint(-8, 8, (3,), generator=gen)
        if step % 2:
            new[step % 3] = special[step % len(special)]
        amax.copy_(new)
        k_amax.copy_(new)
        shift = step % 4 != 3  # every fourth an evaluation: the history stays
        if shift:
            hist.copy_(torch.cat([amax[:, None], hist[:, :-1]], dim=1))
            amax.zero_()
        want = fp8_scale(torch.nan_to_num(hist, nan=0.0, posinf=0.0, neginf=0.0).amax(dim=1), fmax=fmax)
        got = fp8_delayed_step(k_amax, k_hist, fmax, shift=shift)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (step, got, want)
        assert all(got[i].data_ptr() % 16 == 0 for i in range(3))  # each to a GEMM without a copy
        torch.testing.assert_close(k_hist, hist, rtol=0, atol=0, equal_nan=True, msg=f"step {step}")
        torch.testing.assert_close(k_amax, amax, rtol=0, atol=0, equal_nan=True, msg=f"step {step}")
    # no finite maximum but zeros: scale 1; only tiny ones: the smallest scale; and an ordinary row
    edge = torch.tensor(
        [[0.0, float("nan"), float("inf")], [1e-40, 0.0, 1e-41], [3.0, 896.0, 1.0]], device=dev
    )
    got = fp8_delayed_step(torch.zeros(3, device=dev), edge, fmax, shift=False)
    want = fp8_scale(torch.nan_to_num(edge, nan=0.0, posinf=0.0, neginf=0.0).amax(dim=1), fmax=fmax)
    assert got.tolist() == want.tolist() == [1.0, FP8_MIN_SCALE, 896.0 / 57344.0]


def test_delayed_scaling_refuses_bad_settings_by_name_before_converting_anything():
    from lowcomm.lm import GPT, GPTConfig

    with pytest.raises(ValueError, match=r"unknown backend 'cublas'; allowed: \['auto'"):
        Float8Linear(16, 16, scaling="delayed", backend="cublas")
    with pytest.raises(ValueError, match="'triton' serves mxfp8 and mxfp8_fast only, not fp8_delayed"):
        Float8Linear(16, 16, scaling="delayed", backend="triton")
    if not torch.cuda.is_available():  # a device that cannot serve it, named at the first call
        with pytest.raises(ValueError, match="'scaled_mm' cannot serve fp8_delayed on cpu"):
            Float8Linear(16, 16, scaling="delayed", backend="scaled_mm")(torch.randn(2, 16))

    with pytest.raises(ValueError, match="amax_history_len must be an integer >= 1, got 0"):
        Float8Linear(16, 16, scaling="delayed", amax_history_len=0)
    with pytest.raises(ValueError, match="scaling must be 'tensorwise', 'rowwise' or 'delayed'"):
        Float8Linear(16, 16, scaling="current")
    m = GPT(GPTConfig(vocab_size=64, seq_len=8, n_layer=1, n_head=2, n_embd=32))
    with pytest.raises(ValueError, match="amax_history_len"):
        convert_to_low_precision(m, "fp8_delayed", amax_history_len=True)
    assert not any(isinstance(mod, LowPrecisionLinear) for mod in m.modules())
    assert len(convert_to_low_precision(m, "fp8_delayed", amax_history_len=4)) == 4
    assert m.blocks[0].attn.qkv.fp8_amax_history.shape == (3, 4)


def _fake_blockwise_scaled_mm(a, b, scale_a, scale_b, out_dtype=None, **kw):
    """torch._scaled_mm's blockwise 1x128 x 1x128 contract on CPU: the shape and stride checks of
    ATen's is_blockwise_1x128_scaling (a, and b.t() with scale_b.t()), then the product it
    defines, written as bf16 as the blockwise path does."""

    def size_stride(t, dim, size, stride):  # ATen's check_size_stride: a size-1 dim may have stride 1
        return t.size(dim) == size and (t.stride(dim) == stride or (size == 1 and t.stride(dim) == 1))

    M, K = a.shape
    N = b.shape[1]
    assert a.stride(1) == 1 and b.stride(0) == 1, "a row-major, b column-major"
    assert scale_a.dtype == scale_b.dtype == torch.float32
    assert size_stride(scale_a, 0, M, 1) and size_stride(scale_a, 1, K // 128, M), scale_a.stride()
    st = scale_b.t()
    if st.shape[0] == N:  # 1x128 along K, per column
        assert size_stride(st, 0, N, 1) and size_stride(st, 1, K // 128, N), st.stride()
    else:  # 128x128 tiles: is_blockwise_128x128_scaling(b.t(), scale_b.t())
        assert size_stride(st, 0, N // 128, K // 128) and size_stride(st, 1, K // 128, 1), st.stride()
        scale_b = scale_b.repeat_interleave(128, dim=1)
    assert out_dtype == torch.bfloat16
    deq_a = a.float() * scale_a.repeat_interleave(128, dim=1)
    deq_b = b.float() * scale_b.repeat_interleave(128, dim=0)
    return (deq_a @ deq_b).to(out_dtype)


def _unswizzle(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The inverse of to_cublas_blocked: (rows, cols) E8M0 bytes from cuBLAS's 128x4 tile layout."""
    R, C = -(-rows // 128), -(-cols // 4)
    tiles = flat.view(torch.uint8).reshape(R, C, 32, 4, 4).permute(0, 1, 3, 2, 4)  # (R, C, q, p, c)
    return tiles.reshape(R, C, 128, 4).permute(0, 2, 1, 3).reshape(R * 128, C * 4)[:rows, :cols]


def _replace_scaled_mm(monkeypatch, stand_in) -> None:
    """torch._scaled_mm replaced by ``stand_in`` for a test. Dynamo's table of torch's functions is
    made first: made while the stand-in is in place (the process's first compile), it would hold
    the stand-in, not the operator, and every later compile of torch._scaled_mm in the process
    (benchmarks/inductor_codegen.py's) would refuse it as a builtin it must skip."""
    from torch._dynamo import trace_rules

    trace_rules.get_torch_obj_rule_map()
    monkeypatch.setattr(torch, "_scaled_mm", stand_in)


def _pretend_hopper(monkeypatch, scaled_mm=None) -> str:
    """An sm_90 GPU for the layers: torch._scaled_mm replaced by ``scaled_mm`` (default the CPU
    stand-in below, which checks cuBLASLt's layout rules). Returns the device the Triton kernels
    run on: CUDA where there is one (fp32 matmuls without TF32, which the trainer turns on, so the
    stand-in and the emulated path round alike), else the CPU under the interpreter."""
    import lowcomm.kernels.gemm as gemm

    monkeypatch.setattr(gemm, "_capability", lambda device: (9, 0))
    _replace_scaled_mm(monkeypatch, scaled_mm or _fake_scaled_mm)
    if torch.cuda.is_available():
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        return "cuda"
    return "cpu"


def _fake_scaled_mm(a, b, scale_a=None, scale_b=None, out_dtype=None, bias=None, **kw):
    """torch._scaled_mm on CPU, for every scaling mode: ATen's layout rules (the library checks them
    too; this stand-in asserts them again), then the product the scales define (and a bias added
    to its fp32 sums before the output's one rounding, as cuBLASLt's epilogue adds it)."""
    from lowcomm.kernels.gemm import scaled_mm_layout_error

    why = scaled_mm_layout_error(a, b, scale_a, scale_b, out_dtype, bias)
    assert not why, why
    M, K = a.shape
    N = b.shape[1]
    e8m0 = getattr(torch, "float8_e8m0fnu", None)
    if e8m0 is not None and scale_a.dtype == e8m0:
        sa = torch.exp2(_unswizzle(scale_a, M, K // 32).float() - 127).repeat_interleave(32, dim=1)
        sb = torch.exp2(_unswizzle(scale_b, N, K // 32).float() - 127).repeat_interleave(32, dim=1).t()
    elif scale_a.numel() > 1 and scale_b.shape != (1, N):  # ATen takes rowwise's shapes first
        return _fake_blockwise_scaled_mm(a, b, scale_a, scale_b, out_dtype)
    else:
        sa, sb = scale_a, scale_b
    product = (a.float() * sa) @ (b.float() * sb)
    return (product if bias is None else product + bias.float()).to(out_dtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("tokens", [24, 20])
@pytest.mark.parametrize("recipe", ["fp8_rowwise", "fp8_tensorwise"])
def test_an_fp8_layer_quantizes_each_tensor_once_and_saves_only_fp8_copies(recipe, tokens, monkeypatch):
    """On a pretend sm_90 GPU (torch._scaled_mm replaced by a CPU stand-in that checks cuBLASLt's
    layout rules, the Triton quantize interpreted): one fp8_quantize_dual each for x, W and dy, one
    _scaled_mm each for fprop, dgrad and wgrad, fp8 copies (and fp32 scales) saved for backward
    instead of x and W, and the layer equals the emulated recipe up to the output's rounding.
    2 x 20 tokens are padded to 48 for wgrad's contraction."""
    needs_triton()
    import lowcomm.kernels.triton_fp8 as triton_fp8

    calls, quantized = [], []
    dual = triton_fp8.fp8_quantize_dual
    dev = _pretend_hopper(monkeypatch, lambda *a, **k: calls.append(1) or _fake_scaled_mm(*a, **k))
    monkeypatch.setattr(
        triton_fp8, "fp8_quantize_dual", lambda x, *a, **k: quantized.append(x.shape) or dual(x, *a, **k)
    )
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        outs = _emulated_and_scaled_mm_layers(recipe, tokens, between=lambda: saved.append(None), device=dev)
    assert len(calls) == 3 and len(quantized) == 3  # fprop, dgrad, wgrad; x, W, dy
    padded = -(-2 * tokens // 16) * 16
    assert quantized == [(padded, 64), (96, 64), (padded, 96)]
    fast_saved = saved[saved.index(None) + 1 : -1]
    assert fast_saved and set(fast_saved) <= {torch.float8_e4m3fn, torch.float32}, fast_saved
    assert torch.float8_e4m3fn in fast_saved
    tol = 2**-7 if recipe == "fp8_rowwise" else 1e-5  # rowwise writes bf16
    for name, r, t in zip(("y", "dx", "dW"), *outs):
        assert float((t - r).abs().max() / r.abs().max()) < tol, name


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize(
    "recipe, in_features",
    [(r, n) for r in ("fp8_tensorwise", "fp8_rowwise", "fp8_delayed") for n in (64, 40)]
    + [("mxfp8_fast", 128)],
)
def test_an_fp8_layer_asks_for_fast_accumulation_in_the_gemms_its_mode_names(
    recipe, in_features, monkeypatch
):
    """On a pretend sm_90, the use_fast_accum each torch._scaled_mm call of a forward and backward
    gets, fprop then dgrad then wgrad: ``fast_accum`` "fprop" (the default) in the forward only,
    "all" in the three, "none" in none, on the quantize-once path (64 in-features) and per GEMM
    (40: not a multiple of 16; fp8_delayed emulates its GEMMs there: no call). The blockwise
    GEMMs of mxfp8_fast (quantize-once at 128 in-features) never get it: cuBLAS's blockwise GEMM
    promotes its sums whatever the mode."""
    needs_triton()
    calls = []

    def stand_in(*a, **k):
        calls.append(k.get("use_fast_accum", False))
        return _fake_scaled_mm(*a, **k)

    dev = _pretend_hopper(monkeypatch, stand_in)
    emulated = recipe == "fp8_delayed" and in_features == 40
    for mode, want in {"fprop": [True, False, False], "all": [True] * 3, "none": [False] * 3}.items():
        calls.clear()
        kw = {} if mode == "fprop" else {"fast_accum": mode}  # "fprop": the default
        layer = LowPrecisionLinear(in_features, 96, recipe=recipe, device=dev, **kw)
        x = torch.randn(24, in_features, device=dev, requires_grad=True)
        layer(x).backward(torch.randn(24, 96, device=dev))
        if recipe == "mxfp8_fast":
            assert calls and not any(calls), (mode, calls)
        else:
            assert calls == ([] if emulated else want), (mode, calls)
        assert x.grad is not None and layer.weight.grad is not None
    assert "fast_accum=none" in repr(layer) or recipe == "mxfp8_fast"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("recipe", ["fp8_tensorwise", "fp8_rowwise", "fp8_delayed", "mxfp8_fast"])
def test_under_autocast_the_forward_gemm_adds_the_bias_in_its_epilogue(recipe, monkeypatch):
    """On a pretend sm_90 under bf16 autocast (the trainer's GPU dtype), an fp8 layer hands its
    bias to the forward torch._scaled_mm (bf16, N values: cuBLASLt adds it to the fp32 sums before
    the one rounding) instead of adding it in a pass of its own over y; dgrad and wgrad get none.
    y is the emulated layer's within one bf16 rounding (which the fused epilogue saves), the
    bias's gradient dy summed over tokens. mxfp8_fast's blockwise GEMM is not given one (cuBLAS's
    blockwise epilogue is not used here): its forward adds it after. Without autocast (fp32
    output) no bias goes to the GEMM, which ATen would refuse. On a GPU with fp8 GEMMs the calls
    reach the real torch._scaled_mm: cuBLASLt's epilogue itself is checked."""
    needs_triton()
    from lowcomm.kernels.gemm import _blockwise_scaled_mm_works

    calls = []
    real = (
        torch._scaled_mm
        if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
        else None
    )

    def stand_in(*a, **k):
        calls.append(k.get("bias"))
        return (real or _fake_scaled_mm)(*a, **k)

    dev = _pretend_hopper(monkeypatch, stand_in)
    _blockwise_scaled_mm_works.cache_clear()
    try:
        torch.manual_seed(3)
        k, n = 128, 256
        fast = LowPrecisionLinear(k, n, recipe=recipe, backend="auto", device=dev)
        ref = LowPrecisionLinear(k, n, recipe=recipe, backend="emulated", device=dev)
        ref.load_state_dict(fast.state_dict())
        with torch.no_grad():
            fast.bias.normal_()
            ref.bias.copy_(fast.bias)
        x, gy = torch.randn(40, k, device=dev), torch.randn(40, n, device=dev).to(torch.bfloat16)
        from torch.utils._python_dispatch import TorchDispatchMode

        adds = []

        class Adds(TorchDispatchMode):  # additions that write a bf16 tensor of y's shape
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if "add" in str(func) and isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16:
                    adds.append(tuple(out.shape))
                return out

        outs = []
        for layer in (ref, fast):
            for _ in range(2 if recipe == "fp8_delayed" else 1):  # delayed: a step with a history
                calls.clear()
                xi = x.clone().requires_grad_()
                layer.zero_grad()
                with torch.autocast(dev, dtype=torch.bfloat16):
                    if layer is fast:
                        adds.clear()
                        with Adds():
                            y = layer(xi)
                    else:
                        y = layer(xi)
                y.backward(gy)
            outs.append((y.detach().float(), xi.grad, layer.bias.grad))
        if recipe == "mxfp8_fast":
            assert calls and not any(b is not None for b in calls) and adds == [(40, n)], (calls, adds)
        else:
            assert len(calls) == 3 and all(b is None for b in calls[1:]), calls
            bias = calls[0]
            assert bias is not None and bias.dtype == torch.bfloat16 and bias.shape == (n,)
            assert torch.equal(bias, fast.bias.detach().to(torch.bfloat16))
            assert adds == [], adds  # y made by the GEMM alone
        (y_ref, dx_ref, db_ref), (y, dx, db) = outs
        assert float((y - y_ref).abs().max() / y_ref.abs().max()) < 2**-7
        assert float((dx - dx_ref).abs().max() / dx_ref.abs().max()) < 2**-7
        assert torch.allclose(db, gy.float().sum(0), rtol=1e-5, atol=1e-4)
        if recipe != "mxfp8_fast":  # fp32, no autocast: the bias added after the GEMM
            calls.clear()
            fast(x)
            assert calls and all(b is None for b in calls)
    finally:
        _blockwise_scaled_mm_works.cache_clear()


def test_a_bias_for_scaled_mm_is_checked_against_the_rules():
    """The layout check names what a fused bias breaks: an fp32 output (ATen refuses it), a dtype
    other than the output's, a length other than N, and scaling other than tensorwise or rowwise."""
    from lowcomm.kernels.gemm import scaled_mm_layout_error

    a = torch.zeros(32, 64, dtype=torch.uint8).view(torch.float8_e4m3fn)
    b = torch.zeros(48, 64, dtype=torch.uint8).view(torch.float8_e4m3fn).t()
    one = torch.ones(())
    rows, cols = torch.ones(32, 1), torch.ones(1, 48)
    bias = torch.zeros(48, dtype=torch.bfloat16)
    assert scaled_mm_layout_error(a, b, one, one, torch.bfloat16, bias) == ""
    assert scaled_mm_layout_error(a, b, rows, cols, torch.bfloat16, bias) == ""
    assert "bf16 or fp16 output" in scaled_mm_layout_error(a, b, one, one, torch.float32, bias)
    assert "48 contiguous" in scaled_mm_layout_error(a, b, one, one, torch.bfloat16, bias.float())
    assert "48 contiguous" in scaled_mm_layout_error(a, b, one, one, torch.bfloat16, bias[:32])
    assert "48 contiguous" in scaled_mm_layout_error(a, b, one, one, torch.float16, bias)
    a128 = torch.zeros(32, 256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    b128 = torch.zeros(48, 256, dtype=torch.uint8).view(torch.float8_e4m3fn).t()
    blocks_a, blocks_b = torch.ones(2, 32).t(), torch.ones(2, 48)
    assert scaled_mm_layout_error(a128, b128, blocks_a, blocks_b, torch.bfloat16) == ""
    why = scaled_mm_layout_error(a128, b128, blocks_a, blocks_b, torch.bfloat16, bias)
    assert "tensorwise and rowwise" in why


def test_fast_accumulation_reaches_the_gemm_and_a_wrong_mode_is_refused(monkeypatch):
    """qmatmul's fast_accum reaches an fp8 GEMM's torch._scaled_mm (no effect on emulated sums:
    the same result); a mode that is not one of FAST_ACCUM_MODES is refused by name by the layer
    and by convert_to_low_precision before it swaps any layer."""
    from lowcomm.kernels.linear import FAST_ACCUM_MODES
    from lowcomm.lm import GPT, GPTConfig

    calls = []
    dev = _pretend_hopper(
        monkeypatch, lambda *a, **k: calls.append(k["use_fast_accum"]) or _fake_scaled_mm(*a, **k)
    )
    a, b = torch.randn(32, 64, device=dev), torch.randn(64, 48, device=dev)
    for fast in (False, True):
        got = qmatmul(a, b, "fp8_rowwise", backend="scaled_mm", fast_accum=fast)
        ref = qmatmul(a, b, "fp8_rowwise", backend="emulated", fast_accum=fast)
        assert torch.allclose(got, ref, rtol=2**-7, atol=1e-3)  # rowwise writes bf16
    assert calls == [False, True]
    assert FAST_ACCUM_MODES == ("none", "fprop", "all")
    with pytest.raises(ValueError, match=r"fast_accum must be one of \['none', 'fprop', 'all'\], got 'fast'"):
        LowPrecisionLinear(64, 64, recipe="fp8_rowwise", fast_accum="fast")
    model = GPT(GPTConfig(n_embd=32, n_head=2, n_layer=1))
    with pytest.raises(ValueError, match="got True"):
        convert_to_low_precision(model, "fp8_rowwise", fast_accum=True)
    assert not any(isinstance(m, LowPrecisionLinear) for m in model.modules())  # nothing swapped


def test_the_trainer_builds_its_fp8_layers_with_the_configured_fast_accumulation():
    """``--fast-accum`` (``[model] fast_accum``) reaches every low-precision layer the trainer
    builds; "fprop" by default; anything else is refused by name before a model exists."""
    from lowcomm.runtime import TrainConfig
    from lowcomm.runtime.trainer.build import build_model

    shape = dict(model_dim=32, layers=1, heads=2, seq_len=16, precision="fp8_rowwise")
    for kw, want in (({}, "fprop"), ({"fast_accum": "all"}, "all"), ({"fast_accum": "none"}, "none")):
        model = build_model(TrainConfig.from_flat(**shape, **kw), vocab_size=256)
        modes = [m.fast_accum for m in model.modules() if isinstance(m, LowPrecisionLinear)]
        assert len(modes) == 4 and set(modes) == {want}, (kw, modes)
    with pytest.raises(
        ValueError, match=r"fast_accum='fast' is not allowed: one of \['none', 'fprop', 'all'\]"
    ):
        TrainConfig.from_flat(**shape, fast_accum="fast")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("recipe", ["fp8_tensorwise", "fp8_rowwise", "fp8_delayed"])
def test_an_fp8_layer_that_needs_one_copy_of_a_tensor_makes_it_right(recipe, monkeypatch):
    """Evaluation (no_grad: only fprop's copies), a frozen weight (dgrad only: dy's rows) and an
    input that wants no gradient (wgrad only: dy's columns) on a pretend sm_90, the Triton quantize
    making one copy of a tensor: each equals the emulated layer up to the output's rounding. The
    tensorwise quantize once wrote its scale into the empty buffer of the copy not made: an
    illegal address on the H200 that ended every fp8 training run at its first evaluation (a
    segfault here)."""
    needs_triton()
    dev = _pretend_hopper(monkeypatch)
    torch.manual_seed(8)
    ref = LowPrecisionLinear(64, 96, recipe=recipe, backend="emulated", device=dev)
    fast = LowPrecisionLinear(64, 96, recipe=recipe, backend="scaled_mm", device=dev)
    fast.load_state_dict(ref.state_dict())
    x = (torch.randn(2, 24, 64) * torch.logspace(-1, 1, 64)).to(dev)
    gy = torch.randn(2, 24, 96).to(dev)
    tol = 2**-7 if recipe == "fp8_rowwise" else 1e-5  # rowwise writes bf16

    def close(got, want, name):
        assert float((got - want).abs().max() / want.abs().max()) < tol, name

    with torch.no_grad():
        close(fast(x), ref(x), "evaluation")
    for wants in ("dx", "dW"):
        grads = []
        for layer in (ref, fast):
            layer.weight.requires_grad_(wants == "dW")
            xi = x.clone().requires_grad_(wants == "dx")
            layer(xi).backward(gy)
            grads.append(xi.grad if wants == "dx" else layer.weight.grad)
        close(grads[1], grads[0], wants)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_an_mxfp8_fast_layer_quantizes_each_tensor_once_for_the_blockwise_gemm(monkeypatch):
    """mxfp8_fast on a pretend sm_90 whose torch has the blockwise _scaled_mm (a CPU stand-in that
    checks ATen's blockwise layout rules; auto probes it): one mx_fast_quantize_dual each for x
    (1x128), W (128x128 tiles) and dy (1x128), nothing quantized per GEMM (no MX quantize, no
    regrouping in torch ops), one _scaled_mm each for fprop, dgrad and wgrad, only fp8 copies and
    fp32 scales saved; it equals the emulated recipe up to the bf16 the blockwise GEMM writes.
    2 x 20 tokens are padded to 128, whole blocks."""
    needs_triton()
    import lowcomm.kernels.gemm as gemm
    import lowcomm.kernels.triton_quantize as triton_quantize

    calls, quantized = [], []
    fast_dual = triton_quantize.mx_fast_quantize_dual
    mx_quantize, regroup = triton_quantize.mx_quantize, gemm._regroup
    dev = _pretend_hopper(monkeypatch, lambda *a, **k: calls.append(1) or _fake_scaled_mm(*a, **k))
    monkeypatch.setattr(
        triton_quantize,
        "mx_fast_quantize_dual",
        lambda x, *a, **k: quantized.append((tuple(x.shape), a[1])) or fast_dual(x, *a, **k),
    )
    saved = []

    def between():  # after the emulated layer: the per-GEMM quantize and regrouping must not run
        saved.append(None)
        monkeypatch.setattr(triton_quantize, "mx_quantize", None)
        monkeypatch.setattr(gemm, "_regroup", None)

    gemm._blockwise_scaled_mm_works.cache_clear()
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
            outs = _emulated_and_scaled_mm_layers("mxfp8_fast", 20, between, dev, (128, 256), "auto")
    finally:
        gemm._blockwise_scaled_mm_works.cache_clear()
    assert len(calls) == 1 + 3  # the probe, then fprop, dgrad, wgrad
    assert quantized == [((128, 128), "1x128"), ((256, 128), "128x128"), ((128, 256), "1x128")]
    fast_saved = saved[saved.index(None) + 1 : -1]
    assert set(fast_saved) == {torch.float8_e4m3fn, torch.float32}, fast_saved
    for name, r, t in zip(("y", "dx", "dW"), *outs):
        assert float((t - r).abs().max() / r.abs().max()) < 2**-7, name  # the GEMM writes bf16
    # the same layer quantizing per GEMM in torch ops (MX, then regrouped): the same bytes reach
    # the same GEMM, so the same results (on CUDA the stand-in's fp32 matmul may sum a padded
    # operand in another order: then within a rounding of the bf16 output)
    import lowcomm.kernels.linear as linear

    monkeypatch.setattr(triton_quantize, "mx_quantize", mx_quantize)
    monkeypatch.setattr(gemm, "_regroup", regroup)
    monkeypatch.setattr(linear, "_fused_backend", lambda *a: None)
    try:
        per_gemm = _emulated_and_scaled_mm_layers("mxfp8_fast", 20, lambda: None, dev, (128, 256), "auto")
    finally:
        gemm._blockwise_scaled_mm_works.cache_clear()
    for name, r, t in zip(("y", "dx", "dW"), per_gemm[1], outs[1]):
        if dev == "cpu":
            assert torch.equal(t, r), name
        else:
            torch.testing.assert_close(t, r, rtol=2**-7, atol=1e-6, msg=name)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_an_mxfp8_fast_layer_quantizes_once_for_the_triton_gemm_too(monkeypatch):
    """mxfp8_fast where cuBLAS's blockwise GEMM is not used: on the Triton backend (interpreted
    here) the layer also quantizes each tensor once and its three Triton GEMMs read the copies in
    place (a tile's scale repeated per column of W), bit for bit what the per-GEMM Triton path
    computes; and with e5m2 gradients on a pretend sm_90 with the blockwise _scaled_mm, fprop runs
    in cuBLAS and the two gradient GEMMs (e5m2, which cuBLAS's blockwise GEMM does not take) in
    Triton, from the same single quantize per tensor."""
    needs_triton()
    import lowcomm.kernels.gemm as gemm
    import lowcomm.kernels.linear as linear
    import lowcomm.kernels.triton_quantize as triton_quantize

    quantized = []
    fast_dual = triton_quantize.mx_fast_quantize_dual
    monkeypatch.setattr(
        triton_quantize,
        "mx_fast_quantize_dual",
        lambda x, *a, **k: quantized.append(a[0]) or fast_dual(x, *a, **k),
    )
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(9)
    x = torch.randn(40, 128, device=dev)
    gy = torch.randn(40, 128, device=dev)

    def run(backend, grad_elem="e4m3"):
        torch.manual_seed(2)
        layer = LowPrecisionLinear(
            128, 128, recipe="mxfp8_fast", backend=backend, grad_elem=grad_elem, device=dev
        )
        xi = x.clone().requires_grad_()
        layer(xi).backward(gy)
        return [xi.grad, layer.weight.grad, layer(x).detach()]

    fused = run("triton")
    assert quantized == ["e4m3", "e4m3", "e4m3", "e4m3", "e4m3"]  # x, W, dy; then x, W (no grad)
    monkeypatch.setattr(linear, "_fused_backend", lambda *a: None)
    per_gemm = run("triton")
    for name, r, t in zip(("dx", "dW", "y"), per_gemm, fused):
        if dev == "cpu":
            assert torch.equal(t, r), name
        else:
            torch.testing.assert_close(t, r, rtol=1e-5, atol=1e-6, msg=name)
    monkeypatch.undo()
    calls, quantized = [], []
    monkeypatch.setattr(
        triton_quantize,
        "mx_fast_quantize_dual",
        lambda x, *a, **k: quantized.append(a[0]) or fast_dual(x, *a, **k),
    )
    _pretend_hopper(monkeypatch, lambda *a, **k: calls.append(a[0].dtype) or _fake_scaled_mm(*a, **k))
    gemm._blockwise_scaled_mm_works.cache_clear()
    try:
        mixed = run("auto", grad_elem="e5m2")
    finally:
        gemm._blockwise_scaled_mm_works.cache_clear()
    assert quantized == ["e4m3", "e4m3", "e5m2", "e4m3", "e4m3"]
    assert calls == [torch.float8_e4m3fn] * 3  # the probe, fprop, fprop again: no gradient GEMM
    ref = LowPrecisionLinear(128, 128, recipe="mxfp8_fast", backend="emulated", grad_elem="e5m2", device=dev)
    torch.manual_seed(2)
    ref.reset_parameters()
    xi = x.clone().requires_grad_()
    ref(xi).backward(gy)
    # on a GPU the gradients' Triton GEMMs sum each 128-block in the fp8 MMA, which keeps about 14
    # bits on Hopper (DeepSeek-V3 §3.3.2; docs/references.md), not fp32's 24: 2**-10 of the largest
    # output allows a few of its ulps per block (the H200 measured 2.4e-4); interpreted, exact
    tol = 2**-10 if dev == "cuda" else 1e-5
    for name, r, t in zip(("dx", "dW"), (xi.grad, ref.weight.grad), mixed):
        assert float((t - r).abs().max() / r.abs().max()) < tol, name


#: torch.compile(fullgraph=True) of a layer, forward and backward: from torch 2.7 (before, the
#: trainer's --compile runs the layers outside the graph and says so: test_train_paths.py)
compiles_layer_backward = pytest.mark.skipif(
    not _compat.compiles_layer_backward(),
    reason="torch < 2.7 cannot compile the low-precision layers' backward (strict mode bans Tensor.stride)",
)


def _eager_and_compiled(model, layer, x: torch.Tensor, **compile_kwargs) -> list:
    """y, dx and the layer's dW of ``model`` on ``x``, eager and under torch.compile(fullgraph)."""
    outs = []
    for fn in (model, torch.compile(model, fullgraph=True, **compile_kwargs)):
        xi = x.clone().requires_grad_()
        layer.weight.grad = None
        y = fn(xi)
        y.sum().backward()
        outs.append([t.detach().clone() for t in (y, xi.grad, layer.weight.grad)])
    return outs


#: torch 2.8's Inductor, compiling mxfp8_fast's layer on the Triton backend for a CPU, fuses the
#: regrouping of its 1x32 scales into the cast to 128-blocks in C++ that crashed the process (a
#: segmentation fault in that kernel's call; 2.9.0 to 2.13.0 ran it, and 2.8.0 the blockwise
#: case). A GPU compiles Triton code there instead.
cpu_inductor_compiles_mxfp8_fast = pytest.mark.skipif(
    not torch.cuda.is_available() and torch.__version__ < "2.9",
    reason="torch 2.8's Inductor crashes in the C++ it makes for mxfp8_fast's layer on a CPU",
)


@compiles_layer_backward
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize(
    "recipe",
    [
        "fp8_rowwise",
        "fp8_tensorwise",
        "mxfp8",
        "mxfp8 dequant",
        pytest.param("mxfp8_fast", marks=cpu_inductor_compiles_mxfp8_fast),
        "mxfp8_fast blockwise",
    ],
)
def test_a_low_precision_layer_compiles_whole_and_matches_eager(recipe, monkeypatch):
    """torch.compile(fullgraph=True) of each layer on its Hopper path: fp8 quantize-once through
    _scaled_mm on a pretend sm_90 GPU, MX on the Triton backend (interpreted on CPU), mxfp8_fast
    also quantize-once for the blockwise _scaled_mm (128 -> 256). The Triton kernels are operators
    the compiler keeps whole (torch.ops.lowcomm.fp8_quantize_dual, mx_quantize,
    mx_fast_quantize, block_scaled_matmul, mx_dequant_matmul), so nothing breaks the graph, and output
    and gradients equal eager mode up to the output's rounding (rowwise and blockwise write bf16,
    which the compiled CPU stand-in for _scaled_mm may skip)."""
    needs_triton()
    import lowcomm.kernels.gemm as gemm

    backend = "triton" if recipe in ("mxfp8", "mxfp8_fast") else "scaled_mm"
    backend = "dequant" if recipe.endswith("dequant") else backend
    k, n = (128, 256) if recipe.endswith("blockwise") else (64, 96)
    recipe = recipe.split()[0]
    if backend == "scaled_mm":
        monkeypatch.setattr(gemm, "_capability", lambda device: (9, 0))
        _replace_scaled_mm(monkeypatch, _fake_scaled_mm)
        gemm._blockwise_scaled_mm_works.cache_clear()
    torch._dynamo.reset()
    torch.manual_seed(3)
    layer = LowPrecisionLinear(k, n, recipe=recipe, backend=backend)
    outs = _eager_and_compiled(layer, layer, torch.randn(2, 20, k))
    torch._dynamo.reset()
    gemm._blockwise_scaled_mm_works.cache_clear()
    tol = 2**-7 if recipe == "fp8_rowwise" or k == 128 else 1e-6
    for name, r, t in zip(("y", "dx", "dW"), *outs):
        assert float((t - r).abs().max() / r.abs().max()) < tol, name


def _keeping_graphs(graphs: list):
    """A torch.compile backend that appends AOTAutograd's forward and backward graphs to ``graphs``
    and runs them as they are (no Inductor; split as Inductor splits them)."""

    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    def keep(g, _):
        graphs.append(g)
        return make_boxed_func(g.forward)

    return aot_autograd(  # torch's aot_eager backend, keeping the graphs
        fw_compiler=keep,
        bw_compiler=keep,
        partition_fn=min_cut_rematerialization_partition,
        keep_inference_input_mutations=True,
    )


@compiles_layer_backward
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("recipe", ["fp8_rowwise", "fp8_tensorwise"])
def test_an_fp8_layer_compiled_with_the_inductor_quantize_holds_no_triton_operator(recipe, monkeypatch):
    """LOWCOMM_COMPILED_QUANTIZE=inductor: torch.compile(fullgraph=True) of a layer norm and an fp8
    layer on a pretend sm_90 traces the quantize of x, W and dy as torch ops (no lowcomm operator
    in any graph, forward or backward: the compiler generates them and may fuse them with the
    layer norm; on a GPU rowwise's transposed copy is lowcomm's fp8_transpose, a copy of the
    bytes), and gives eager mode's outputs and gradients (the Triton quantize: the same bytes;
    the GEMMs in the _scaled_mm stand-in) up to the output's rounding."""
    needs_triton()
    import lowcomm.kernels.linear as linear

    dev = _pretend_hopper(monkeypatch)
    monkeypatch.setattr(linear, "COMPILED_QUANTIZE", "inductor")
    torch._dynamo.reset()
    torch.manual_seed(3)
    norm = torch.nn.LayerNorm(64, device=dev)
    layer = LowPrecisionLinear(64, 96, recipe=recipe, backend="scaled_mm", device=dev)
    model = torch.nn.Sequential(norm, layer)
    graphs = []
    backend = _keeping_graphs(graphs)
    outs = _eager_and_compiled(model, layer, torch.randn(2, 24, 64, device=dev), backend=backend)
    torch._dynamo.reset()
    assert len(graphs) == 2  # forward, backward
    for g in graphs:  # the maxima in torch ops (forward: x's and W's; backward: dy's), no operator
        targets = [str(n.target) for n in g.graph.nodes if n.op == "call_function"]
        # (but the transposed copy's on a GPU, rowwise: fp8_transpose, which moves bytes only)
        assert not [t for t in targets if "lowcomm" in t and "fp8_transpose" not in t], targets
        assert "aten.amax.default" in targets, targets
    tol = 2**-7 if recipe == "fp8_rowwise" else 1e-6  # rowwise: _scaled_mm writes bf16
    for name, r, t in zip(("y", "dx", "dW"), *outs):
        assert float((t - r).abs().max() / r.abs().max()) < tol, name


@compiles_layer_backward
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_delayed_scaling_layer_compiled_with_the_inductor_quantize_matches_eager(monkeypatch):
    """fp8_delayed with LOWCOMM_COMPILED_QUANTIZE=inductor: under torch.compile the one-pass cast by
    the history's scale and the maximum it records into the layer's buffer (x and W in forward, dy
    in backward) are torch ops, not the Triton operator; over three steps (the first scaled
    dynamically, two compilations) outputs, gradients, maxima and history equal eager mode's,
    which ran the Triton kernels."""
    needs_triton()
    import lowcomm.kernels.linear as linear

    dev = _pretend_hopper(monkeypatch)
    monkeypatch.setattr(linear, "COMPILED_QUANTIZE", "inductor")
    torch._dynamo.reset()
    torch.manual_seed(3)
    eager = LowPrecisionLinear(64, 96, recipe="fp8_delayed", backend="scaled_mm", device=dev)
    layer = LowPrecisionLinear(64, 96, recipe="fp8_delayed", backend="scaled_mm", device=dev)
    layer.load_state_dict(eager.state_dict())
    graphs = []
    compiled = torch.compile(layer, backend=_keeping_graphs(graphs), fullgraph=True)
    want, got = _delayed_steps([eager, layer], [eager, compiled], device=dev)
    torch._dynamo.reset()
    assert len(graphs) == 4, len(graphs)  # forward and backward, dynamic then delayed
    # the code, not the nodes' targets: an operator that mutates (the maxima) is called through
    # auto_functionalized, which names it in its arguments
    assert not [g.code for g in graphs if "fp8_quantize" in g.code]
    assert all("amax" in g.code for g in graphs)
    for step, (w, g) in enumerate(zip(want, got)):
        for name, r, t in zip(("y", "dx", "dW", "amax", "history"), w, g):
            torch.testing.assert_close(t, r, rtol=1e-6, atol=0, msg=f"step {step}: {name}")


def test_an_unknown_compiled_quantize_is_refused_by_name_when_a_layer_is_made(monkeypatch):
    import lowcomm.kernels.linear as linear

    monkeypatch.setattr(linear, "COMPILED_QUANTIZE", "fast")
    with pytest.raises(
        ValueError, match=r"LOWCOMM_COMPILED_QUANTIZE='fast' is not allowed: one of \['triton', 'inductor'\]"
    ):
        LowPrecisionLinear(64, 96, recipe="fp8_rowwise")


def test_the_torch_dual_fp8_quantize_writes_the_triton_kernels_bytes():
    """fp8_quantize_dual_torch (the inductor route's quantize) against fp8_quantize_dual: the same
    bytes and scales for each scaling, format and choice of copies, on a ragged bf16 tensor with
    outliers and zeros; a bad scaling is refused by name."""
    needs_triton()
    from lowcomm.kernels.triton_fp8 import fp8_quantize_dual, fp8_quantize_dual_torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # Triton runs on CUDA tensors there
    x = _hard_input(40, 72, torch.bfloat16, seed=5).to(dev)
    for scaling in ("tensorwise", "rowwise"):
        for elem in ("e4m3", "e5m2"):
            for rows, cols in ((True, True), (True, False), (False, True)):
                want = fp8_quantize_dual(x, elem, scaling, rows=rows, cols=cols)
                got = fp8_quantize_dual_torch(x, elem, scaling, rows=rows, cols=cols)
                for w, g in zip(want, got):
                    if w is None:
                        assert g is None
                    elif w.element_size() == 1:
                        assert w.shape == g.shape and torch.equal(w.view(torch.uint8), g.view(torch.uint8))
                    else:
                        assert w.shape == g.shape and torch.equal(w, g), (scaling, elem, w, g)
    with pytest.raises(ValueError, match="scaling must be one of"):
        fp8_quantize_dual_torch(x, "e4m3", "blockwise")


def _delayed_steps(layers, fns=None, steps: int = 3, device: str = "cpu") -> list:
    """``steps`` training steps (40 tokens, 64 -> 96) of each fp8_delayed layer (through ``fns``,
    default the layers themselves) on the same data: y, dx, dW and the maxima kept, per step."""
    torch.manual_seed(8)
    data = [(torch.randn(2, 20, 64) * (1 + s), torch.randn(2, 20, 96) * 1e-2) for s in range(steps)]
    data = [(x.to(device), gy.to(device)) for x, gy in data]
    runs = []
    for layer, fn in zip(layers, fns or layers):
        run = []
        for x, gy in data:
            xi = x.clone().requires_grad_()
            layer.weight.grad = None
            y = fn(xi)
            y.backward(gy)
            run.append([t.detach().clone() for t in (y, xi.grad, layer.weight.grad)])
            run[-1] += [layer.fp8_amax.clone(), layer.fp8_amax_history.clone()]
        runs.append(run)
    return runs


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_delayed_scaling_layer_on_a_pretend_hopper_reads_each_tensor_once(monkeypatch):
    """fp8_delayed on a pretend sm_90 GPU (torch._scaled_mm replaced by the CPU stand-in that checks
    cuBLASLt's layout rules, the Triton quantize interpreted): per step one one-pass quantize each
    for x, W and dy (no two-pass fp8_quantize_dual), one _scaled_mm each for fprop, dgrad, wgrad,
    only fp8 copies and fp32 scales saved; over three steps (the first dynamic, then from the
    history) it equals the emulated delayed layer (which quantizes in torch ops) and keeps the
    same maxima."""
    needs_triton()
    import lowcomm.kernels.triton_fp8 as triton_fp8

    calls, quantized, steps = [], [], []
    scaled, step = triton_fp8.fp8_quantize_scaled, triton_fp8.fp8_delayed_step
    dev = _pretend_hopper(monkeypatch, lambda *a, **k: calls.append(1) or _fake_scaled_mm(*a, **k))
    monkeypatch.setattr(triton_fp8, "fp8_quantize_dual", None)  # the two-pass quantize must not run
    monkeypatch.setattr(
        triton_fp8, "fp8_quantize_scaled", lambda x, *a, **k: quantized.append(x.shape) or scaled(x, *a, **k)
    )
    monkeypatch.setattr(
        triton_fp8, "fp8_delayed_step", lambda *a, **k: steps.append(k["shift"]) or step(*a, **k)
    )
    torch.manual_seed(3)
    ref = LowPrecisionLinear(64, 96, recipe="fp8_delayed", backend="emulated", device=dev)
    fast = LowPrecisionLinear(64, 96, recipe="fp8_delayed", backend="scaled_mm", device=dev)
    fast.load_state_dict(ref.state_dict())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        want, got = _delayed_steps([ref, fast], device=dev)
    assert len(calls) == 9 and quantized == [(48, 64), (96, 64), (48, 96)] * 3  # 3 steps
    assert steps == [True, True]  # the scales of steps 2 and 3 in one launch each (step 1: dynamic)
    assert set(saved) == {torch.float8_e4m3fn, torch.float32}, saved
    for step, (w, g) in enumerate(zip(want, got)):
        for name, r, t in zip(("y", "dx", "dW", "amax", "history"), w, g):
            torch.testing.assert_close(t, r, rtol=1e-5, atol=1e-7, msg=f"step {step}: {name}")
    assert float(got[-1][4][0, 1]) > 0  # the later steps ran from a history


@compiles_layer_backward
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_delayed_scaling_layer_compiles_whole_and_matches_eager(monkeypatch):
    """torch.compile(fullgraph=True) of an fp8_delayed layer on a pretend sm_90 GPU: the one-pass
    quantize is an operator that updates the maxima in place (torch.ops.lowcomm.fp8_quantize_scaled,
    in forward and in backward), the history moves in the module's forward; over three steps the
    compiled layer's outputs, gradients and maxima equal eager mode's (the first step compiles the
    dynamic graph, the second the delayed one)."""
    needs_triton()
    dev = _pretend_hopper(monkeypatch)
    torch._dynamo.reset()
    torch.manual_seed(3)
    eager = LowPrecisionLinear(64, 96, recipe="fp8_delayed", backend="scaled_mm", device=dev)
    layer = LowPrecisionLinear(64, 96, recipe="fp8_delayed", backend="scaled_mm", device=dev)
    layer.load_state_dict(eager.state_dict())
    want, got = _delayed_steps([eager, layer], [eager, torch.compile(layer, fullgraph=True)], device=dev)
    torch._dynamo.reset()
    for step, (w, g) in enumerate(zip(want, got)):
        for name, r, t in zip(("y", "dx", "dW", "amax", "history"), w, g):
            torch.testing.assert_close(t, r, rtol=1e-6, atol=0, msg=f"step {step}: {name}")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("recipe", ["fp8_rowwise", "fp8_tensorwise"])
def test_an_fp8_qmatmul_quantizes_each_operand_in_triton_reading_transposed_views_in_place(
    recipe, monkeypatch
):
    """qmatmul's fp8 GEMM on a pretend sm_90: each operand quantized along K by one Triton quantize
    (the H200 measured the torch ops it used at 0.13 TB/s, a tenth of the kernel's), a transposed
    view (a weight's ``W.t()``, wgrad's ``dyᵀ``) read in place as its transpose's other copy; the
    product equals the torch-quantized one exactly (the same bytes and scales), and K = 40 is
    padded as before."""
    needs_triton()
    import lowcomm.kernels.gemm as gemm
    import lowcomm.kernels.triton_fp8 as triton_fp8

    dev = _pretend_hopper(monkeypatch)
    torch.manual_seed(4)
    calls = []
    dual = triton_fp8.fp8_quantize_dual
    monkeypatch.setattr(
        triton_fp8, "fp8_quantize_dual", lambda x, *a, **k: calls.append(k) or dual(x, *a, **k)
    )
    a = (torch.randn(48, 96) * torch.logspace(-2, 2, 96)).to(dev)
    b = torch.randn(96, 64).to(dev)
    for x, y in ((a, b), (a.t().contiguous().t(), b.t().contiguous().t()), (a[:, :40], b[:40])):
        calls.clear()
        got = qmatmul(x, y, recipe, backend="scaled_mm")
        assert len(calls) == 2, calls
        with monkeypatch.context() as m:
            m.setattr(gemm, "_triton_runs_on", lambda device: False)
            want = qmatmul(x, y, recipe, backend="scaled_mm")
        if dev == "cpu":
            assert torch.equal(got, want)
        else:  # the stand-in's fp32 matmul on CUDA picks its kernel by the operands' strides: the
            # same bytes and scales, summed in another order (the H200: 3e-7 apart)
            assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("b_tile", ["1x128", "128x128"])
def test_an_mxfp8_fast_qmatmul_makes_one_blockwise_copy_per_operand(b_tile, monkeypatch):
    """qmatmul's mxfp8_fast GEMM through the blockwise _scaled_mm on a pretend sm_90: one
    mx_fast_quantize_dual copy per operand, nothing MX-quantized or regrouped in torch ops (the H200
    measured that path at 0.16-0.50x bf16), M and N padded to whole blocks, a transposed view of
    ``a`` read in place; the product equals the per-GEMM regrouping's exactly."""
    needs_triton()
    import lowcomm.kernels.gemm as gemm
    import lowcomm.kernels.triton_quantize as tq

    dev = _pretend_hopper(monkeypatch)
    monkeypatch.setattr(gemm, "_blockwise_scaled_mm_works", lambda device: True)
    torch.manual_seed(5)
    calls = []
    fast = tq.mx_fast_quantize_dual
    monkeypatch.setattr(
        tq, "mx_fast_quantize_dual", lambda x, *a, **k: calls.append(x.shape) or fast(x, *a, **k)
    )
    a = (torch.randn(128, 256) * torch.logspace(-2, 2, 256)).to(dev)
    b = torch.randn(256, 208).to(dev)
    for x, y in ((a, b), (a.t().contiguous().t(), b), (a[:100], b)):
        calls.clear()
        got = qmatmul(x, y, "mxfp8_fast", backend="scaled_mm", b_tile=b_tile)
        assert len(calls) == 2 and got.shape == (x.shape[0], 208), calls
        with monkeypatch.context() as m:
            m.setattr(gemm, "_triton_runs_on", lambda device: False)
            want = qmatmul(x, y, "mxfp8_fast", backend="scaled_mm", b_tile=b_tile)
        assert torch.equal(got, want)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_qmatmul_writes_a_bf16_result_on_every_backend_and_refuses_other_dtypes(monkeypatch):
    """``out_dtype=torch.bfloat16`` (what a bf16 GEMM writes, and kernels.py's rows compare against
    it): a bf16 result on every backend, equal to the fp32 one rounded once (cuBLAS's rowwise and
    blockwise fp8 GEMMs write bf16 either way: the fp32 result is that bf16 converted; the dequant
    backend's bf16 GEMM rounds its own fp32 sums, within a bf16 step); K = 40 padded, N = 208 cut
    back from whole blocks; float16 is refused by name."""
    needs_triton()
    import lowcomm.kernels.gemm as gemm
    from lowcomm.kernels.triton_mx_gemm import MM_OUT_DTYPE

    dev = _pretend_hopper(monkeypatch)
    monkeypatch.setattr(gemm, "_blockwise_scaled_mm_works", lambda device: True)
    torch.manual_seed(7)
    a = (torch.randn(32, 128) * torch.logspace(-2, 2, 128)).to(dev)
    b = torch.randn(128, 208).to(dev)
    cases = [("fp8_rowwise", "scaled_mm"), ("fp8_tensorwise", "scaled_mm"), ("mxfp8_fast", "scaled_mm")]
    cases += [("mxfp8", "triton"), ("mxfp8_fast", "triton"), ("mxfp8", "dequant")]
    cases += [("fp8_rowwise", "emulated")]
    for recipe, backend in cases:
        if backend == "dequant" and not MM_OUT_DTYPE:
            continue  # a GPU's dequant backend needs torch >= 2.8 (refused by name before)
        x, y = (a[:, :40], b[:40]) if recipe.startswith("fp8") else (a, b)
        want = qmatmul(x, y, recipe, backend=backend)
        got = qmatmul(x, y, recipe, backend=backend, out_dtype=torch.bfloat16)
        assert got.dtype == torch.bfloat16 and want.dtype == torch.float32, (recipe, backend)
        assert got.shape == want.shape == (32, 208), (recipe, backend)
        rounded = want.to(torch.bfloat16)
        if backend == "dequant":
            assert float((got.float() - want).abs().max()) <= 2**-7 * float(want.abs().max()), recipe
        else:
            assert torch.equal(got, rounded), (recipe, backend)
    with pytest.raises(ValueError, match="must be torch.float32 or torch.bfloat16, got torch.float16"):
        qmatmul(a, b, "fp8_rowwise", out_dtype=torch.float16)


@pytest.mark.parametrize("tokens", [24, 20])
@pytest.mark.parametrize("recipe", ["fp8_rowwise", "fp8_tensorwise", "mxfp8"])
def test_every_scaled_mm_of_a_training_step_passes_cublas_layout_rules(recipe, tokens, monkeypatch):
    """fprop, dgrad and wgrad of a low-precision Linear through torch._scaled_mm on a pretend
    sm_90/sm_100 GPU (the GPU run failed in wgrad: dyᵀ kept its transposed strides through the
    cast): every call passes the layout checker, and the layer equals the emulated one up to the
    output's rounding. 2 x 24 tokens: wgrad's K needs no padding (the transposed view reaches the
    GEMM); 2 x 20: its K is padded to a multiple of 16."""
    import lowcomm.kernels.gemm as gemm

    calls = []
    monkeypatch.setattr(gemm, "_capability", lambda device: (10, 0) if recipe == "mxfp8" else (9, 0))
    monkeypatch.setattr(gemm, "_triton_runs_on", lambda device: False)  # the torch reference quantizes
    import lowcomm.kernels.triton_fp8 as triton_fp8

    def no_triton(*a, **k):
        raise AssertionError("the per-GEMM torch path was asked for, not the Triton quantize")

    monkeypatch.setattr(triton_fp8, "fp8_quantize_dual", no_triton)
    _replace_scaled_mm(monkeypatch, lambda *a, **k: calls.append(1) or _fake_scaled_mm(*a, **k))
    if recipe == "mxfp8" and not hasattr(torch, "float8_e8m0fnu"):  # MX _scaled_mm: torch >= 2.7
        with pytest.raises(ValueError, match=r"torch >= 2\.7 \(float8_e8m0fnu scales\)"):
            _emulated_and_scaled_mm_layers(recipe, tokens)
        assert choose_backend(recipe, torch.device("cpu"), "auto") == "emulated"
        return
    outs = _emulated_and_scaled_mm_layers(recipe, tokens)
    assert len(calls) == 3  # fprop, dgrad, wgrad
    tol = 2**-7 if recipe == "fp8_rowwise" else 1e-5  # rowwise writes bf16
    for name, r, t in zip(("y", "dx", "dW"), *outs):
        assert float((t - r).abs().max() / r.abs().max()) < tol, name


def test_the_layout_checker_names_each_broken_rule():
    from lowcomm.kernels.gemm import scaled_mm, scaled_mm_layout_error

    f8 = torch.float8_e4m3fn
    a, b = torch.zeros(32, 64, dtype=f8), torch.zeros(64, 48, dtype=f8).t().contiguous().t()
    one = torch.ones(())
    assert scaled_mm_layout_error(a, b, one, one, torch.float32) == ""
    assert "a must be row-major" in scaled_mm_layout_error(a.t().contiguous().t(), b, one, one, torch.float32)
    assert "b must be column-major" in scaled_mm_layout_error(a, b.contiguous(), one, one, torch.float32)
    assert "multiples of 16" in scaled_mm_layout_error(a[:, :40], b[:40], one, one, torch.float32)
    assert "must be fp8" in scaled_mm_layout_error(a.float(), b, one, one, torch.float32)
    rows, cols = torch.ones(32, 1), torch.ones(1, 48)
    assert scaled_mm_layout_error(a, b, rows, cols, torch.bfloat16) == ""
    assert "writes bf16" in scaled_mm_layout_error(a, b, rows, cols, torch.float32)
    assert "no scaling mode" in scaled_mm_layout_error(a, b, torch.ones(32, 2), cols, torch.bfloat16)
    with pytest.raises(ValueError, match="break cuBLASLt's rules: b must be column-major"):
        scaled_mm(a, b.contiguous(), one, one, torch.float32)
    # the two rules the H200 taught on 2026-12-04 (fp8_delayed refused with CUBLAS_STATUS_NOT_SUPPORTED
    # at its first GEMM; mxfp8_fast's products at K = 128 with 128x128 tiles were wrong):
    scales = torch.ones(3)  # fp8_delayed's scales of x, W and dy, one tensor
    assert scaled_mm_layout_error(a, b, scales[0], scales[0], torch.float32) == ""
    assert "scale_b must start 16-byte aligned" in scaled_mm_layout_error(
        a, b, scales[0], scales[1], torch.float32
    )
    # (zero bytes viewed as fp8: torch 2.4 cannot fill an fp8 tensor on a CPU)
    k128, b256 = (
        torch.zeros(32, 128, dtype=torch.uint8).view(f8),
        torch.zeros(256, 128, dtype=torch.uint8).view(f8).t(),
    )
    one_block, tiles = torch.ones(32, 1).t().contiguous().t(), torch.ones(1, 2)
    assert "need K > 128" in scaled_mm_layout_error(k128, b256, one_block, tiles, torch.bfloat16)


def test_one_block_along_k_takes_a_scale_per_column_not_128x128_tiles():
    """blockwise_scaled_mm_operands at K = 128 (a layer of 64 or 128 in-features, padded): the
    weight's 128x128 tile scales become one scale per column, rowwise scaling's shapes, the same
    product; at K = 256 the tiles stay."""
    from lowcomm.kernels.gemm import blockwise_scaled_mm_operands, scaled_mm_layout_error

    f8 = torch.float8_e4m3fn
    for K in (128, 256):
        qa, qb = torch.ones(32, K).to(f8), torch.ones(K, 256).to(f8)
        ga, gb = torch.rand(32, K // 128), torch.rand(K // 128, 2)
        a, b, sa, sb = blockwise_scaled_mm_operands(qa, ga, qb, gb)
        assert scaled_mm_layout_error(a, b, sa, sb, torch.bfloat16) == ""
        if K == 128:
            assert sb.shape == (1, 256) and torch.equal(sb, gb.repeat_interleave(128, dim=1))
        else:
            assert sb.shape == (2, 2) and torch.equal(sb, gb)


def test_every_triton_launch_runs_on_its_tensors_gpu():
    """Triton launches on the current GPU whatever its arguments' device: a layer on cuda:1 called
    from a thread whose current GPU is 0 would run there on another GPU's pointers. Every launch in
    lowcomm's kernel modules (``kernel[grid](...)``, or a name bound to one) sits inside ``with
    on_device(tensor)``; a launch added without it fails here, on CPU."""
    import ast
    from pathlib import Path

    import lowcomm.kernels as kernels

    launches, unguarded = [], []
    for path in sorted(Path(kernels.__file__).parent.glob("triton_*.py")):
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            bound = {
                t.id
                for n in ast.walk(fn)
                if isinstance(n, ast.Assign) and isinstance(n.value, ast.Subscript)
                for t in n.targets
                if isinstance(t, ast.Name)
            }
            for call in (n for n in ast.walk(fn) if isinstance(n, ast.Call)):
                f = call.func
                is_launch = (isinstance(f, ast.Subscript) and "kernel" in ast.unparse(f.value)) or (
                    isinstance(f, ast.Name) and f.id in bound
                )
                if not is_launch:
                    continue
                where = f"{path.name}:{call.lineno}"
                launches.append(where)
                node, guarded = call, False
                while node in parents and not guarded:
                    node = parents[node]
                    guarded = isinstance(node, ast.With) and any(
                        "on_device(" in ast.unparse(item.context_expr) for item in node.items
                    )
                if not guarded:
                    unguarded.append(where)
    # the fp8 maxima, cast, one-copy and delayed-step kernels, the MX dual and fast quantizes, the
    # MX dequantize, the block GEMM, the replicas' AdamW step (per tensor and multi-tensor) and
    # the clip's sums of squares, the e3m0 codec's encode and decode, the fp8 transpose
    assert len(launches) == 14, launches
    assert not unguarded, unguarded


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("recipe", ["fp8_rowwise", "fp8_delayed", "mxfp8_fast"])
def test_the_gpu_tests_small_model_trains_on_a_pretend_hopper_as_emulated(recipe, monkeypatch, tmp_path):
    """The GPU trainer test's model (d=64: its Linear layers below mxfp8_fast's quantize-once
    multiples, so each GEMM quantizes its own operands) trained 6 steps in bf16 through the sm_90
    route, torch._scaled_mm a CPU stand-in that checks ATen's rules (fp8 rowwise scales, delayed
    tensorwise ones; mxfp8_fast's 1x128 and 128x128 blocks, padded to whole blocks): every loss
    finite (the H200 once reached a NaN at the first step of this model in mxfp8_fast), and the
    losses those of the emulated recipe on the CPU to the bf16 the GEMMs write."""
    from helpers import write_corpus

    import lowcomm.kernels.gemm as gemm
    from lowcomm.runtime import TrainConfig, read_jsonl, train

    corpus = write_corpus(tmp_path / "corpus", lines=2000)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the quantize in torch ops (the interpreter: minutes)

    def run(name: str) -> list[float]:
        cfg = TrainConfig.from_flat(
            corpus=str(corpus), run_dir=str(tmp_path / name), device="cpu", dtype="bf16", precision=recipe,
            replicas=1, steps=6, model_dim=64, layers=2, heads=2, seq_len=64, batch_size=8, lr=3e-3,
            warmup=2, eval_every=0, eval_batches=2, log_every=1,
        )  # fmt: skip
        train(cfg, progress=False)
        events = read_jsonl(tmp_path / name / "events.jsonl")
        return [e["loss"] for e in events if e["kind"] == "step"]

    emulated = run("emulated")
    calls = []
    _pretend_hopper(monkeypatch, lambda *a, **k: calls.append(a[0].shape) or _fake_scaled_mm(*a, **k))
    gemm._blockwise_scaled_mm_works.cache_clear()
    try:
        hopper = run("hopper")
    finally:
        gemm._blockwise_scaled_mm_works.cache_clear()
    assert len(calls) >= 6 * 8 * 3, len(calls)  # 8 Linear layers, 3 GEMMs each, every step
    assert len(hopper) == len(emulated) == 6 and all(math.isfinite(v) for v in hopper), hopper
    for a, b in zip(hopper, emulated):
        assert abs(a / b - 1) < 1e-3, (hopper, emulated)


def test_mxfp8_fast_through_the_blockwise_scaled_mm_feeds_cublas_the_right_layout(monkeypatch):
    """The sm_90 route of mxfp8_fast (cannot run here: CPU torch has no blockwise _scaled_mm): on a
    pretend sm_90 device with _scaled_mm replaced by its documented contract, the operands pass
    ATen's layout checks and the result is the emulated fast recipe (to bf16 output rounding)."""
    import lowcomm.kernels.gemm as gemm

    torch.manual_seed(5)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    a = (torch.randn(48, 200) * torch.logspace(-3, 3, 200)).to(dev)  # K padded 200 -> 256
    b = torch.randn(200, 32).to(dev)
    monkeypatch.setattr(gemm, "_capability", lambda device: (9, 0))
    _replace_scaled_mm(monkeypatch, _fake_blockwise_scaled_mm)
    gemm._blockwise_scaled_mm_works.cache_clear()
    try:
        assert choose_backend("mxfp8_fast", dev, "auto") == "scaled_mm"  # the probe ran
        got = qmatmul(a, b, "mxfp8_fast", backend="scaled_mm")
    finally:
        gemm._blockwise_scaled_mm_works.cache_clear()
    ref = qmatmul(a, b, "mxfp8_fast", backend="emulated")
    assert float((got - ref).abs().max() / ref.abs().max()) < 2**-8  # bf16 output
    w = torch.randn(200, 256, device=dev) * torch.logspace(-2, 2, 256, device=dev)  # 2 x 2 tiles
    got = qmatmul(a, w, "mxfp8_fast", backend="scaled_mm", b_tile="128x128")
    ref = qmatmul(a, w, "mxfp8_fast", backend="emulated", b_tile="128x128")
    assert float((got - ref).abs().max() / ref.abs().max()) < 2**-8
    with pytest.raises(ValueError, match="e4m3 operands"):
        qmatmul(a, b, "mxfp8_fast", elem_a="e5m2", backend="scaled_mm")
    with pytest.raises(ValueError, match="N must be a multiple of 16"):
        qmatmul(a, b[:, :24], "mxfp8_fast", backend="scaled_mm")
    monkeypatch.setattr(gemm, "_capability", lambda device: (10, 0))
    with pytest.raises(ValueError, match="sm_90 exactly"):
        qmatmul(a, b, "mxfp8_fast", backend="scaled_mm")


def test_the_blockwise_probe_is_not_passed_by_a_torch_with_rowwise_scaling_only(monkeypatch, caplog):
    """The one-time probe of cuBLAS's blockwise GEMM uses two 128-blocks along K: with one, its
    1x128 scales (M, 1) and (1, N) are rowwise scaling's shapes, which ATen tries first, so a
    torch/cuBLAS that has rowwise scaling but no blockwise GEMM (an older one, on sm_90) would
    pass it, and auto would send mxfp8_fast's GEMMs to a GEMM that refuses them."""
    import lowcomm.kernels.gemm as gemm
    from lowcomm.kernels.triton_quantize import HAVE_TRITON

    seen = []

    def rowwise_only(a, b, scale_a=None, scale_b=None, out_dtype=None, **kw):
        M, N = a.shape[0], b.shape[1]
        seen.append((tuple(scale_a.shape), tuple(scale_b.shape)))
        if scale_a.numel() == scale_b.numel() == 1 or (scale_a.shape == (M, 1) and scale_b.shape == (1, N)):
            return _fake_scaled_mm(a, b, scale_a, scale_b, out_dtype)
        raise RuntimeError("Invalid scaling configuration.")

    try:
        with caplog.at_level("WARNING", logger="lowcomm.kernels.gemm"):
            choice = _fast_choice_on_a_pretend_hopper(monkeypatch, rowwise_only)
    finally:
        gemm._blockwise_scaled_mm_works.cache_clear()
    assert choice == ("triton" if HAVE_TRITON else "emulated")
    assert seen == [((128, 2), (2, 128))], seen
    assert "blockwise torch._scaled_mm unavailable" in caplog.text


def _fast_choice_on_a_pretend_hopper(monkeypatch, scaled_mm) -> str:
    """``auto``'s backend for mxfp8_fast on a pretend sm_90 whose torch._scaled_mm is
    ``scaled_mm``: the one-time probe of the blockwise GEMM runs afresh (the caller clears its
    cache after)."""
    import lowcomm.kernels.gemm as gemm

    dev = _pretend_hopper(monkeypatch, scaled_mm)
    gemm._blockwise_scaled_mm_works.cache_clear()
    return choose_backend("mxfp8_fast", torch.device(dev), "auto")


def test_mxfp8_fast_auto_uses_triton_where_the_blockwise_scaled_mm_is_missing(monkeypatch, caplog):
    """An older torch/cuBLAS on sm_90 (the one-time probe fails) or an e5m2 gradient: auto takes the
    Triton 1x128 kernel (interpreted here), with a warning for the probe; the result is the fast
    recipe either way."""
    needs_triton()
    import lowcomm.kernels.gemm as gemm

    def old_torch(*a, **k):
        raise RuntimeError("Invalid scaling configuration")

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        with caplog.at_level("WARNING", logger="lowcomm.kernels.gemm"):
            assert _fast_choice_on_a_pretend_hopper(monkeypatch, old_torch) == "triton"
        assert "blockwise torch._scaled_mm unavailable" in caplog.text
        _replace_scaled_mm(monkeypatch, _fake_blockwise_scaled_mm)
        gemm._blockwise_scaled_mm_works.cache_clear()
        torch.manual_seed(6)
        a, b = torch.randn(32, 128), torch.randn(128, 32)
        got = qmatmul(a.to(dev), b.to(dev), "mxfp8_fast", elem_a="e5m2", backend="auto").cpu()  # Triton
        ref = qmatmul(a, b, "mxfp8_fast", elem_a="e5m2", backend="emulated")
        assert float((got - ref).abs().max() / ref.abs().max()) < fp8_gemm_tolerance(
            dev
        )  # fp32 output: it was Triton
    finally:
        gemm._blockwise_scaled_mm_works.cache_clear()


def test_the_gradient_numerics_benchmark_measures_every_recipe_on_a_models_own_tensors():
    """benchmarks/fp8_gradients.py at a tiny size: every recipe and gradient format has each GEMM's
    error, a few percent as fp8 gives; what quantization must order holds: dy loses fewer values
    to underflow under per-row scales than under one scale, and in e5m2 than in e4m3."""
    bench = load_benchmark("fp8_gradients")
    from lowcomm.lm import GPTConfig

    cfg = GPTConfig(vocab_size=256, seq_len=32, n_layer=1, n_head=2, n_embd=32)
    caught, loss = bench.capture(cfg, batch_size=2, steps=2, lr=1e-3, device="cpu")
    assert sorted(caught) == [
        "blocks.0.attn.proj",
        "blocks.0.attn.qkv",
        "blocks.0.mlp.fc",
        "blocks.0.mlp.proj",
    ]
    assert math.isfinite(loss)
    out = bench.errors(caught)
    assert len(out["rel_err_vs_fp64"]) == len(bench.RECIPES) * len(bench.GRAD_ELEMS)
    for name, row in out["rel_err_vs_fp64"].items():
        for gemm in ("fprop", "dgrad", "wgrad"):
            assert 1e-3 < row[gemm]["mean"] <= row[gemm]["max"] < 0.2, (name, gemm, row)
            assert 1e-3 < row[f"{gemm}_row_mean"]["mean"] <= row[f"{gemm}_row_mean"]["max"], (name, gemm)
            assert 0 <= row[f"{gemm}_rows_lost"]["mean"] <= row[f"{gemm}_rows_lost"]["max"] <= 1, (name, gemm)
    under = {k: v["mean"] for k, v in out["dy_underflow"].items()}
    for fmt in bench.GRAD_ELEMS:
        assert under[f"rowwise/{fmt}"] <= under[f"tensorwise/{fmt}"], under
    for scaling in ("tensorwise", "rowwise"):
        assert under[f"{scaling}/e5m2"] <= under[f"{scaling}/e4m3"], under


class _PretendGPU:
    """A stream on a virtual clock for lowcomm.kernels.timing.gpu_ms: work queued by the host
    runs after what was queued before it, no earlier than the host queued it; an event's time is
    when the stream reaches it. ``host`` is the host's clock (seconds), moved by the calls."""

    def __init__(self, sleep_hz: float):
        self.host = self.free = 0.0  # the host's time; when the stream has run all it was given
        self.sleep_hz = sleep_hz
        gpu = self

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self):
                self.t = max(gpu.host, gpu.free)

            def query(self):
                return gpu.host >= self.t

            def elapsed_time(self, end):
                return (end.t - self.t) * 1e3

        self.Event = Event

    def run(self, host_s: float, device_s: float) -> None:  # a call: its launches, then its kernels
        self.host += host_s
        self.free = max(self.host, self.free) + device_s

    def _sleep(self, cycles: int) -> None:
        self.run(0.0, cycles / self.sleep_hz)

    def synchronize(self) -> None:
        self.host = max(self.host, self.free)

    def perf_counter(self) -> float:
        return self.host


def test_device_time_is_the_gpus_alone_where_the_host_is_slower(monkeypatch):
    """gpu_ms (the autotuner's and benchmarks/kernels.py's timer), on a pretend stream: a call
    that takes the host 300 us and the GPU 50 us measures 50 us (do_bench's events would hold
    300: the GPU waiting for the host), the spin kernel holding the GPU while the host queues
    every call; with quantiles, do_bench's answer for the autotuner. A first call that misjudged
    the host's time makes the hold 4x longer until the host keeps ahead; a host that never does
    is an error, not a figure."""
    from lowcomm.kernels import timing, triton_quantize

    gpu = _PretendGPU(timing.SLEEP_HZ)
    monkeypatch.setattr(timing, "time", gpu)
    costs = {"host": 300e-6, "device": 50e-6}
    ms = timing.gpu_ms(
        lambda: gpu.run(costs["host"], costs["device"]), cuda=gpu, flush_bytes=16, device="cpu"
    )
    assert ms == pytest.approx(0.05)
    quantiles = timing.gpu_ms(
        lambda: gpu.run(costs["host"], costs["device"]),
        quantiles=(0.5, 0.2, 0.8),
        cuda=gpu,
        flush_bytes=16,
        device="cpu",
    )
    assert quantiles == pytest.approx([0.05] * 3)
    calls = []

    def slower_after_the_first():  # the host's time of one call misjudged from the first calls
        calls.append(1)
        gpu.run(10e-6 if len(calls) <= 2 else costs["host"], costs["device"])

    ms = timing.gpu_ms(slower_after_the_first, cuda=gpu, flush_bytes=16, device="cpu")
    assert ms == pytest.approx(0.05) and len(calls) == 2 + 3 * 20  # held 1 ms, 4 ms, then 16 ms
    calls.clear()
    costs["host"] = 5e-3  # 20 calls: 100 ms of the host's against a hold of 16 ms at most
    with pytest.raises(RuntimeError, match="could not queue 20 calls"):
        timing.gpu_ms(slower_after_the_first, cuda=gpu, flush_bytes=16, device="cpu")
    seen = []  # the autotuner's timer is this one
    monkeypatch.setattr(
        timing, "gpu_ms", lambda fn, calls, quantiles: seen.append((calls, quantiles)) or [1.0]
    )
    assert triton_quantize._AUTOTUNE_BENCH(print, quantiles=(0.5, 0.2, 0.8)) == [1.0]
    assert seen == [(20, (0.5, 0.2, 0.8))]


def test_kernel_benchmark_runs_every_path_at_small_shapes_on_cpu():
    """benchmarks/kernels.py measures on a GPU only, so a mistake in it would surface in the one
    GPU session that has to run it: here every GEMM, quantize and Linear path of it runs at small
    shapes on CPU (Triton interpreted, fp8 paths emulated) with a wall-clock timer."""
    needs_triton()
    import time as _time

    bench = load_benchmark("kernels")

    def wall_ms(fn):
        t0 = _time.perf_counter()
        fn()
        return (_time.perf_counter() - t0) * 1e3

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows = bench.speed(shapes=[(128, 128, 32)], device=dev, bench=wall_ms)["rows"]
    linear = bench.linear_speed(shape=(64, 128, 96), device=dev, bench=wall_ms)
    host = bench.host_time(shape=(128, 128, 128), device=dev, calls=2)  # each row's host time a call
    timed = {k: v for k, v in host.items() if isinstance(v, dict)}
    import triton

    rows_timed = 13
    if dev == "cpu" and _compat.major_minor(triton.__version__) < (3, 3):  # see _stand_in_autotuning
        assert "num_buffers_warp_spec" in timed.pop("triton_empty_kernel_autotuned")["error"]
        rows_timed -= 1
    assert len(timed) == rows_timed and all(v.get("host_us", 0) > 0 for v in timed.values()), host
    codec = bench.codec_speed(numel=1000, device=dev, bench=wall_ms)  # the e3m0 kernels, interpreted
    assert all(codec[f"{n}_{p}_TBps"] > 0 for n in ("encode", "decode") for p in ("kernel", "torch")), codec
    for row in rows + [linear]:
        assert not [k for k in row if k.endswith("_error")], row
    gemms = ["bf16", "fp8_tensorwise", "fp8_rowwise", "mxfp8_fast", "mxfp8_fast_w128x128", "mx_exact_triton"]
    gemms += ["mx_exact_triton_bT", "mx_exact_dequant", "mx_exact_dequant_bT", "fp8_rowwise_fp32_out"]
    gemms += ["bf16_bT", "fp8_rowwise_bT_fast_accum"]  # b as a Linear's weight (Wᵀ)
    gemms += [
        f"fp8_{s}{t}" for s in ("tensorwise", "rowwise") for t in ("_fast_accum", "_gemm", "_gemm_fast_accum")
    ]
    assert all(rows[0][f"{k}_tflops"] > 0 for k in gemms + ["mx_fast_triton"])
    fp8 = [f"fp8_dual_quantize_{s}{t}" for s in ("tensorwise", "rowwise") for t in ("", "_torch", "_64x64w8")]
    from lowcomm.kernels.triton_quantize import QUANTIZE_CUDA_CONFIGS, tile_name

    tiles = [f"dual_quantize_{tile_name(c)}" for c in QUANTIZE_CUDA_CONFIGS]
    from lowcomm.kernels.triton_quantize import DEQUANT_CUDA_CONFIGS

    tiles += [f"mx_dequantize_{tile_name(c)}" for c in DEQUANT_CUDA_CONFIGS]
    fp8 += ["fp8_delayed_quantize", "fp8_transpose", "fp8_copy"]
    fp8 += [f"fp8_one_copy_rowwise{s}{p}" for s in ("", "_cols") for p in ("", "_one_pass", "_two_pass")]
    fp8 += ["fp8_one_copy_rowwise_slices"]  # the rows' slices, where one_pass is whole rows
    passes = 2 if dev == "cuda" else 1  # a GPU: 128 x 128 has too few slices for one pass; CPU: one
    assert rows[0]["fp8_one_copy_rowwise_passes"] == rows[0]["fp8_one_copy_rowwise_cols_passes"] == passes
    fp8 += [f"mx_fast_dual_quantize_{t}" for t in ("1x128", "128x128", "1x128_torch")]
    fp8 += ["dual_quantize_arith", "mx_fast_dual_quantize_1x128_arith"]  # the arithmetic rounding
    fp8 += [f"fp8_dual_quantize_{s}_arith" for s in ("tensorwise", "rowwise")]
    assert all(rows[0][f"{k}_TBps"] > 0 for k in ["dual_quantize", "copy", "mx_dequantize", *fp8, *tiles])
    from lowcomm.kernels.triton_quantize import autotuning

    # the autotuner's pick on CUDA; none on CPU or under LOWCOMM_AUTOTUNE=0 (the GPU check's tests)
    tuned = autotuning(torch.device(dev))
    took = rows[0]["dual_quantize_tiles"]
    assert took in QUANTIZE_CUDA_CONFIGS if tuned else took is None, took
    took = rows[0]["mx_dequantize_tiles"]
    assert took in DEQUANT_CUDA_CONFIGS if tuned else took is None, took
    from lowcomm.kernels.triton_fp8 import FP8_CUDA_CONFIGS

    for scaling in ("tensorwise", "rowwise"):  # the fp8 quantize's two kernels: the same
        for took in rows[0][f"fp8_dual_quantize_{scaling}_tiles"].values():
            assert took in FP8_CUDA_CONFIGS if tuned else took is None, took
    from lowcomm.kernels.triton_quantize import FAST_CUDA_CONFIGS

    for tile in ("1x128", "128x128"):  # mxfp8_fast's: warps and tiles a program
        took = rows[0][f"mx_fast_dual_quantize_{tile}_config"]
        assert took in FAST_CUDA_CONFIGS if tuned else took is None, took
    fast = [f"mx_fast_dual_quantize_1x128_{tile_name(c)}" for c in FAST_CUDA_CONFIGS]
    assert len(set(fast)) == len(FAST_CUDA_CONFIGS)  # one row per candidate
    assert all(rows[0][f"{k}_TBps"] > 0 for k in fast)  # each candidate pinned
    recipes = ("fp8_tensorwise", "fp8_rowwise", "fp8_delayed", "mxfp8", "mxfp8_fast", "mxfp8_triton")
    recipes += tuple(f"fp8_{s}_accum_{m}" for s in ("tensorwise", "rowwise") for m in ("none", "all"))
    assert all(linear[f"{k}_x_bf16"] > 0 for k in recipes)
    if dev == "cpu":  # auto on a CPU: every GEMM emulated, which the row says
        paths = linear["paths"]
        assert paths.pop("fp8_delayed") == "one pass per tensor, emulated GEMMs", paths
        assert paths.pop("mxfp8_triton") == "each tensor quantized once, Triton MX GEMMs", paths
        assert set(paths.values()) == {"quantized per GEMM (emulated)"}, paths
    train = bench.training(dev, steps=4, size="smoke")  # every recipe of the GPU comparison, emulated
    for name in bench.TRAIN_PRECISIONS:
        row = train[name]
        assert row["tokens_per_second_x_bf16"] > 0 and math.isfinite(row["loss_ratio_vs_bf16"]), row
    if dev == "cpu":  # no autotuner runs off CUDA: no choice recorded
        assert all(train[n]["autotuned"] == {} for n in ("bf16", *bench.TRAIN_PRECISIONS))
    # a run records the choices it added, by kernel, and no kernel without one
    before = {"fp8_cast": [[[64, 96, "torch.bfloat16"], {"BLOCK_R": 64}]]}
    after = {**before, "fp8_amax": [[[64, 96, "torch.bfloat16"], {"BLOCK_R": 32}]]}
    after["fp8_cast"] = before["fp8_cast"] + [[[128, 96, "torch.bfloat16"], {"BLOCK_R": 32}]]
    want = {"fp8_amax": after["fp8_amax"], "fp8_cast": after["fp8_cast"][1:]}
    assert bench._new_choices(before, after) == want
    assert bench._new_choices(after, after) == {}
    for name in ("bf16", *bench.TRAIN_PRECISIONS):  # step 2 of 4 profiled: wall against busy time
        prof = train[name]["profile"]
        assert prof["wall_ms_per_step"] > 0 and prof["busy_ms_per_step"] > 0, name
        assert prof["top"][0].startswith("steps 2-2 on "), prof["top"][:2]


def test_the_kernel_benchmark_takes_the_inductor_quantize_only_compiled(monkeypatch):
    """--train-precisions takes fp8_tensorwise+inductor, fp8_rowwise+inductor and
    fp8_delayed+inductor (that run's quantize in torch ops) under --train-compile only, an fp8
    recipe with :MODE (its fast accumulation, which reaches the trainer's layers), and refuses an
    unknown recipe by name, naming the flag (--train-compiled-too, the compiled comparison run
    after the eager one, takes the same names)."""
    bench = load_benchmark("kernels")
    recipes = bench._recipes
    both = "fp8_rowwise,fp8_rowwise+inductor,fp8_tensorwise+inductor,fp8_delayed+inductor"
    assert recipes(both, compile=True) == tuple(both.split(","))
    with pytest.raises(SystemExit, match=r"'fp8_rowwise\+inductor' is a compiled route: add --train-compile"):
        recipes(both)
    with pytest.raises(SystemExit, match=r"unknown recipe 'mxfp8\+inductor'; allowed: \["):
        recipes("mxfp8+inductor", compile=True)
    modes = "fp8_rowwise:all,fp8_tensorwise:none,fp8_delayed:fprop"
    assert recipes(modes) == tuple(modes.split(","))
    assert recipes("fp8_rowwise:all+inductor", compile=True) == ("fp8_rowwise:all+inductor",)
    assert bench._split_recipe("fp8_rowwise:all+inductor") == ("fp8_rowwise", "all", "inductor")
    for bad in ("mxfp8:all", "fp8_rowwise:fast", "fp8_rowwise+triton"):
        with pytest.raises(SystemExit, match=f"unknown recipe '{re.escape(bad)}'; allowed: "):
            recipes(bad, compile=True)
    from lowcomm.runtime.trainer import build

    built, convert = [], build.convert_to_low_precision
    monkeypatch.setattr(
        build, "convert_to_low_precision", lambda m, p, **kw: built.append((p, kw)) or convert(m, p, **kw)
    )
    out = bench.training("cpu", steps=2, size="smoke", precisions=("fp8_rowwise:all",), profile_steps=0)
    assert built == [("fp32", {"fast_accum": "fprop"}), ("fp8_rowwise", {"fast_accum": "all"})]
    assert math.isfinite(out["fp8_rowwise:all"]["loss_ratio_vs_bf16"])
    with pytest.raises(
        SystemExit, match=r"--train-compiled-too: unknown recipe 'fp4'"
    ):  # the second comparison's
        recipes("fp4", compile=True, flag="--train-compiled-too")


def test_the_slowest_generated_kernels_are_found_with_their_source(tmp_path):
    """benchmarks/common.py's inductor_kernels: from a profile's Chrome trace, the Triton kernels
    torch.compile generated by their device time (other kernels and CPU events left out), each
    with its block of Inductor's output code (the nodes it fused, its code) from the cache
    directory, the newest file first; a kernel file where no output code holds it; "" where
    nothing does."""
    common = load_benchmark("common")
    trace = tmp_path / "trace.json"
    events = [
        {"ph": "X", "cat": "kernel", "name": "triton_red_fused_abs_amax_1", "dur": 500.0},
        {"ph": "X", "cat": "kernel", "name": "triton_red_fused_abs_amax_1", "dur": 48.0},
        {"ph": "X", "cat": "kernel", "name": "triton_poi_fused_add_0", "dur": 90.0},
        {"ph": "X", "cat": "kernel", "name": "nvjet_sm90_tst_256x128", "dur": 900.0},
        {"ph": "X", "cat": "cpu_op", "name": "triton_per_fused_cpu_side_2", "dur": 999.0},
        {"ph": "X", "cat": "kernel", "name": "triton_per_fused_sum_3", "dur": 10.0},
    ]
    trace.write_text(json.dumps({"traceEvents": events}))
    cache = tmp_path / "inductor"
    (cache / "ab").mkdir(parents=True)
    block = (
        "# kernel path: /tmp/x/ab/cab.py\n"
        "# Topologically Sorted Source Nodes: [abs_1, amax], Original ATen: [aten.abs, aten.amax]\n"
        "triton_red_fused_abs_amax_1 = async_compile.triton('triton_red_fused_abs_amax_1', '''\n"
        "@triton.jit\ndef triton_red_fused_abs_amax_1(in_ptr0, out_ptr0, xnumel, r0_numel):\n    pass\n"
        "''', device_str='cuda')"
    )
    old = cache / "ab" / "old_output.py"
    old.write_text("# an older graph\n\n\n" + block.replace("pass", "return"))
    os.utime(old, (1, 1))
    (cache / "ab" / "output.py").write_text(
        "import torch\n\n\n" + block + "\n\n\n# kernel path: /tmp/x/cd/ccd.py\nother = 1\n"
    )
    (cache / "cd").mkdir()
    (cache / "cd" / "kernel.py").write_text("@triton.jit\ndef triton_poi_fused_add_0(in_ptr0):\n    pass\n")
    found = common.inductor_kernels(trace, top=3, cache=cache)
    assert [(k["name"], k["calls"], k["device_us"]) for k in found] == [
        ("triton_red_fused_abs_amax_1", 2, 548.0),
        ("triton_poi_fused_add_0", 1, 90.0),
        ("triton_per_fused_sum_3", 1, 10.0),
    ]
    assert found[0]["source"] == block  # the newest output code's block, whole
    assert found[1]["source"].startswith("@triton.jit\ndef triton_poi_fused_add_0(")
    assert found[2]["source"] == ""
    assert common.inductor_kernels(trace, top=1, chars=40, cache=cache)[0]["source"] == block[:40]


#: benchmarks/inductor_codegen.py stands in for the CUDA driver where torch 2.11 (the GPU image's)
#: and newer ask it; older torch asks more (torch 2.6: Dynamo's strict mode refuses the layers'
#: strides, its cuDNN attention and fp8_transpose's operator look for libcuda)
inductor_codegen_torch = pytest.mark.skipif(
    _compat.major_minor(torch.__version__) < (2, 11),
    reason="benchmarks/inductor_codegen.py is made for torch >= 2.11 (the GPU image's)",
)


@inductor_codegen_torch
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", ["rowwise", "tensorwise", "delayed"])  # (apart: about 20 s each)
def test_inductor_code_for_a_pretend_gpu_shows_where_the_quantize_went(case):
    """benchmarks/inductor_codegen.py on a machine without a GPU: one fp8 block's forward and
    backward compiled as the trainer compiles it (Dynamo, AOT autograd) and lowered by Inductor
    for a pretend sm_90. fp8_rowwise with the quantize in torch ops (``inductor``): the row maxima
    are fused into the layer norm's kernel, and row reductions write the transposed copy across
    their rows (a store indexed by the reduction's loop: what made the H200's compiled fp8 steps
    slow), in the forward and in the backward; with the Triton operator (``triton``) no generated
    kernel takes a maximum in the forward or writes across its threads. fp8_tensorwise (one
    scale: the forward's casts wait for a whole tensor's maximum, so none joins a reduction)
    writes both copies from pointwise kernels tiled for the transpose. fp8_delayed, traced at a
    step after the first (its buffers inputs of the graphs): the layer norm's kernel casts by the
    history's scale and records the maximum in the same read, and a kernel updates the maxima
    buffer; its backward's kernels move more bytes than bf16's (by Inductor's own count). Everything
    the pretend GPU replaced is put back."""
    needs_triton()
    codegen = load_benchmark("inductor_codegen")
    real = torch.cuda.is_available(), torch.autocast, torch.compiler.is_compiling
    if case == "rowwise":
        _rowwise_inductor_code(codegen)
    elif case == "tensorwise":
        _tensorwise_inductor_code(codegen)
    else:
        _delayed_inductor_code(codegen)
    assert (torch.cuda.is_available(), torch.autocast, torch.compiler.is_compiling) == real
    # and Dynamo still folds the real is_compiling: it builds its tables of torch functions once a
    # process, so a stand-in for one in place then would stay in them (a later test's compile of
    # the quantize failed on is_compiling so, in CI)
    assert (
        torch.compile(lambda t: t + torch.compiler.is_compiling(), backend="eager", fullgraph=True)(
            torch.zeros(1)
        ).item()
        == 1
    )
    with pytest.raises(SystemExit):
        codegen.main(["--recipe", "fp4"])


def _rowwise_inductor_code(codegen) -> None:
    fused = codegen.main(["--size", "smoke", "--quantize", "inductor"])
    assert fused["forward"]["kernels"] and fused["backward"]["kernels"]
    assert any({"native_layer_norm", "amax"} <= set(k["aten"]) for k in fused["forward"]["kernels"])
    across = [
        k["name"]
        for k in fused["forward"]["kernels"]
        if k["kind"] == "red" and any(re.fullmatch(r"x0 \+ \d+\*r0_1", i) for _, i in k["stores"])
    ]
    assert across, [k["stores"] for k in fused["forward"]["kernels"]]
    assert all(fused[g]["transposed_stores"]["reduction"] for g in ("forward", "backward"))
    opaque = codegen.main(["--size", "smoke", "--quantize", "triton"])
    assert opaque["forward"]["kernels"]
    assert not any("amax" in k["aten"] for k in opaque["forward"]["kernels"])
    assert not any(opaque[g]["transposed_stores"]["reduction"] for g in ("forward", "backward"))


def _tensorwise_inductor_code(codegen) -> None:
    tensorwise = codegen.main(["--size", "smoke", "--quantize", "inductor", "--recipe", "fp8_tensorwise"])
    for g in ("forward", "backward"):
        tiled = [k for k in tensorwise[g]["kernels"] if k["transposed_store"] == "tiled"]
        assert tiled and all("_to_copy" in k["aten"] for k in tiled), tiled  # the casts to fp8
    assert tensorwise["forward"]["transposed_stores"]["reduction"] == 0, tensorwise["forward"]


def _delayed_inductor_code(codegen) -> None:
    delayed = codegen.main(["--size", "smoke", "--recipe", "fp8_delayed", "--bytes"])
    forward = [set(k["aten"]) for k in delayed["forward"]["kernels"]]
    assert any({"native_layer_norm", "_to_copy", "amax"} <= aten for aten in forward), forward
    assert any({"maximum", "select_scatter"} <= aten for aten in forward), forward
    # the bytes Inductor counts its kernels moving (the GEMMs apart): the casts and the maxima
    # add to bf16's (autocast's Linear: the baseline), in the backward most
    bf16 = codegen.main(["--size", "smoke", "--recipe", "bf16", "--bytes"])
    assert all(k["gb"] is not None for g in ("forward", "backward") for k in bf16[g]["kernels"])
    assert not any("_scaled_mm" in k["aten"] for k in bf16["forward"]["kernels"])
    assert 0 < bf16["backward"]["gb"] < delayed["backward"]["gb"], (
        bf16["backward"]["gb"],
        delayed["backward"]["gb"],
    )


@pytest.mark.filterwarnings("ignore::UserWarning")
@inductor_codegen_torch
def test_inductor_code_for_the_trainers_batched_replicas_on_a_pretend_gpu():
    """benchmarks/inductor_codegen.py --replicas M: one block of the trainer's batched model (M
    stacked replicas, their matrices through bf16 copies) lowered for the pretend sm_90, bytes
    counted, its attention cuDNN's fused kernel. Each bias's gradient is a sum down its
    replica's tokens: a column reduction, read and written (where it also makes the gradient)
    along the same index, which the transposed-store check does not take for a transpose (a row
    reduction writing across its loop still is one). A recipe other than bf16, or a count that
    does not split the sequences, is refused."""
    needs_triton()
    codegen = load_benchmark("inductor_codegen")
    found = codegen.main(["--size", "smoke", "--recipe", "bf16", "--bytes", "--replicas", "2"])
    assert found["model"] == "batched, 2 replicas" and found["attention"] == "cudnn"
    # the fused attention (extern, as on an H200) reads q, k and v as views of the qkv GEMM's
    # output, its bias in it: no generated kernel adds that bias or copies them out
    assert not any("split" in k["aten"] for k in found["forward"]["kernels"]), found["forward"]["kernels"]
    # SDPA's decomposition instead (--attention math): its softmax and its copies of q, k and v
    # in generated kernels
    math = codegen.main(["--size", "smoke", "--recipe", "bf16", "--replicas", "2", "--attention", "math"])
    names = [k["name"] for k in math["forward"]["kernels"]]
    assert math["attention"] == "math" and any("softmax" in n for n in names), names
    assert sum("split" in k["aten"] for k in math["forward"]["kernels"]) == 3, names
    for g in ("forward", "backward"):
        assert found[g]["kernels"] and found[g]["gb"] > 0
        assert found[g]["transposed_stores"] == {"reduction": 0, "tiled": 0, "pointwise": 0}, g
    assert any("sum" in k["aten"] for k in found["backward"]["kernels"])
    in_place = {"kind": "red", "reduction_hint": "DEFAULT", "sizes": {"x": 8192, "r0_": 1024}}
    in_place["loads"] = in_place["stores"] = [("in_out_ptr0", "x0 + 4096*r0_2 + 4194304*x1")]
    assert codegen._transposed_store(in_place) is None
    across = {
        **in_place,
        "loads": [("in_ptr0", "r0_1 + 1024*x0")],
        "stores": [("out_ptr0", "x0 + 16384*r0_1")],
    }
    assert codegen._transposed_store(across) == "reduction"
    refused = (
        ["--recipe", "fp8_rowwise", "--replicas", "2"],
        ["--size", "smoke", "--replicas", "3", "--recipe", "bf16"],
    )
    for argv in refused:
        with pytest.raises(SystemExit):
            codegen.main(argv)


@inductor_codegen_torch
def test_compiled_fp8_on_a_gpu_writes_no_transposed_copy_in_inductors_kernels(tmp_path):
    """fp8_delayed and fp8_rowwise with the Inductor quantize, compiled for a GPU
    (benchmarks/inductor_codegen.py's pretend sm_90, in children without TRITON_INTERPRET: the
    interpreter's kernels are not ones a compiled graph can launch): no kernel Inductor generates
    writes a transposed copy (neither across a row reduction's loop, the pattern of the H200's slow
    compiled fp8_rowwise kernels, nor tiled); each of the four Linear layers' x, W and dy gets its
    transposed copy from lowcomm's fp8_transpose, twelve launches in the forward and backward,
    their bytes counted with Inductor's. fp8_delayed casts each tensor and records its maximum in
    the kernel that reads it (under torch 2.13 no kernel takes |x| without casting it; torch 2.11,
    the GPU image's, takes the maximum of the attention's joined q, k and v gradients in kernels
    of their own, and casts them in another), the first layer norm's kernel among them."""
    needs_triton()  # (torch >= 2.11, its mark: torch.library.triton_op, the operators, are there)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    script = Path(__file__).parent.parent / "benchmarks" / "inductor_codegen.py"
    children = {}
    for recipe in ("fp8_delayed", "fp8_rowwise"):  # one core's work each: at once
        argv = ["--size", "smoke", "--recipe", recipe, "--bytes", "--json", str(tmp_path / f"{recipe}.json")]
        children[recipe] = subprocess.Popen(
            [sys.executable, str(script), *argv],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        for child in children.values():
            _, err = child.communicate(timeout=240)
            assert child.returncode == 0, err[-2000:]
    finally:
        for child in children.values():
            child.kill()
            child.communicate()
    for recipe in children:
        found = json.loads((tmp_path / f"{recipe}.json").read_text())
        launches = 0
        for graph in ("forward", "backward"):
            kernels = found[graph]["kernels"]
            user = [k for k in kernels if k["kind"] == "user"]
            assert {k["kernel"] for k in user} == {"_transpose_bytes_kernel"}, (recipe, user)
            assert all(k["gb"] > 0 for k in user) and found[graph]["gb"] >= sum(k["gb"] for k in user)
            assert found[graph]["transposed_stores"] == {"reduction": 0, "tiled": 0, "pointwise": 0}, recipe
            launches += len(user)
            if recipe == "fp8_delayed":
                generated = [k for k in kernels if k["kind"] != "user"]
                apart = [k for k in generated if "abs" in k["aten"] and "_to_copy" not in k["aten"]]
                if _compat.major_minor(torch.__version__) >= (2, 13):
                    assert not apart, [k["name"] for k in apart]
                else:  # (the qkv layer's dy: the joined gradients, in the backward)
                    assert all("cat" in k["aten"] and graph == "backward" for k in apart), apart
        assert launches == 12, (recipe, launches)
        if recipe == "fp8_delayed":
            forward = [set(k["aten"]) for k in found["forward"]["kernels"]]
            assert any({"native_layer_norm", "_to_copy", "amax"} <= aten for aten in forward), forward


def test_each_fast_layer_quantizes_each_tensor_once_in_few_operations():
    """benchmarks/host_overhead.py's layer count (on a pretend sm_90, each Triton launch through
    Triton's own launch path, compiled for sm_90, counted and not run): one Linear's forward and
    backward in every recipe launches its quantize kernels once
    each for x, W and dy and few operations besides (each a launch on a GPU, where an eager step at
    small sizes is the host's): at most 10 more than nn.Linear's under the same autocast.
    mxfp8_fast took 139 (MX quantize and regrouping in torch ops per GEMM), fp8_delayed 33 (its
    scales). The host's time for it is measured (with the kernels not run)."""
    needs_triton()
    from lowcomm.kernels.triton_mx_gemm import MM_OUT_DTYPE

    out = load_benchmark("host_overhead").layers(repeat=3)
    rows = out["rows"]
    per_tensor = {  # each launched once for x, W and dy
        "fp8_tensorwise": ("_fp8_amax_kernel", "_fp8_cast_kernel"),
        "fp8_rowwise": ("_fp8_amax_kernel", "_fp8_cast_kernel"),
        "fp8_delayed": ("_fp8_cast_kernel",),  # the maxima recorded by the cast: one pass
        "mxfp8": ("_mx_dual_kernel", "_block_scaled_gemm_kernel"),
        "mxfp8_fast": ("_mx_fast_kernel",),
    }
    for recipe, names in per_tensor.items():
        want = {f"triton.{k}": 3 for k in names}
        if recipe == "mxfp8" and MM_OUT_DTYPE:  # the dequant backend: each GEMM dequantizes two copies
            want = {"triton._mx_dual_kernel": 3, "triton._mx_dequant_kernel": 6}
        if recipe == "fp8_delayed":  # and the three scales from the history: one launch a step
            want["triton._fp8_delayed_step_kernel"] = 1
        launched = {k: v for k, v in rows[recipe]["by_op"].items() if k.startswith("triton.")}
        assert launched == want, (recipe, launched)
        assert rows[recipe]["ops"] <= rows["bf16"]["ops"] + 10, (recipe, rows[recipe]["by_op"])
        operators = [k for k in rows[recipe]["by_op"] if k.startswith("lowcomm.")]
        assert not operators, (recipe, operators)  # eager: the kernels launch without them
        assert rows[recipe]["host_us"] > 0
    assert out["launch_us"]["direct"] > 0 and out["launch_us"]["autotuned"] > 0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_the_quantize_is_an_operator_under_compile_and_a_direct_launch_eager():
    """torch.compile sees each Triton quantize as one lowcomm operator (kept whole in the graph);
    eager, the wrapper launches the kernel without the operator's dispatch, and both give the same
    bytes."""
    needs_triton()
    from lowcomm.kernels.triton_fp8 import fp8_quantize_dual

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # Triton runs on CUDA tensors there
    x = _hard_input(64, 96, torch.bfloat16, seed=2).to(dev)
    dispatched = load_benchmark("host_overhead")._Count()  # operations other than views
    with dispatched:
        eager = fp8_quantize_dual(x, "e4m3", "rowwise")
    assert not [op for op in dispatched.ops if op.startswith("lowcomm.")], dispatched.ops
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(
        lambda t: fp8_quantize_dual(t, "e4m3", "rowwise"), backend=backend, fullgraph=True
    )
    out = compiled(x)
    torch._dynamo.reset()
    (gm,) = graphs
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert "lowcomm.fp8_quantize_dual" in targets, targets
    for a, b in zip(eager, out):  # the fp8 copies compared as bytes, the scales as they are
        assert (
            torch.equal(a.view(torch.uint8), b.view(torch.uint8))
            if a.element_size() == 1
            else torch.equal(a, b)
        )


def test_every_exact_mx_gemm_design_tried_is_exact():
    """The designs benchmarks/mx_gemm_designs.py compares (the library kernel, the MMA issued ahead
    of the previous block's promotion, the warp-specialized loop) compute the same exact-MX product
    on a ragged shape (200 x 256 @ 256 x 136; interpreted on CPU in CI)."""
    needs_triton()
    designs = load_benchmark("mx_gemm_designs")
    errs = designs.check("cuda" if torch.cuda.is_available() else "cpu")
    assert set(errs) == {"plain", "promote_behind", "warp_specialized"}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    assert all(e < fp8_gemm_tolerance(dev) for e in errs.values()), errs
