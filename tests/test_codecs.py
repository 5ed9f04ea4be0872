"""One suite over every codec: shapes, zeros, error bounds, exact byte counts, determinism."""

import math

import pytest
import torch
from helpers import needs_triton

from lowcomm.comm import CODECS, NonFiniteError, get_codec

SIZES = [1, 7, 128, 129, 1000, 4096 + 3]


def _bound(name: str, x: torch.Tensor, block: int) -> torch.Tensor:
    """Per-element worst-case absolute error of one round trip."""
    n = x.numel()
    pad = (-n) % block
    xb = torch.cat([x, x.new_zeros(pad)]).reshape(-1, block)
    amax = xb.abs().amax(dim=1, keepdim=True).expand_as(xb).reshape(-1)[:n]
    a = x.abs()
    if name == "fp32":
        return torch.zeros_like(x)
    if name == "bf16":
        return a * 2.0**-8
    if name == "fp8_e4m3":  # 3 mantissa bits: half-ulp 2^-4 relative; subnormals: 2^-10 of the scale
        return a * 2.0**-4 + amax * 2.0**-16
    if name == "fp8_e5m2":
        return a * 2.0**-3 + amax * 2.0**-24
    if name == "int8":
        return amax / 127 / 2 * 1.0001
    if name == "int4":
        return amax / 7 / 2 * 1.0001
    if name == "e3m0":  # nearest power of two: |err| <= |x|/3; below 2^-6 of the scale (< 2·amax)
        return torch.maximum(a / 3, amax * 2.0 * 2.0**-7) * 1.0001
    raise AssertionError(name)


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("n", SIZES)
def test_roundtrip_error_is_within_the_codec_bound(name, n):
    torch.manual_seed(n)
    codec = get_codec(name, block=128)
    x = torch.randn(n) * torch.logspace(-3, 3, n)[torch.randperm(n)]
    y = codec.roundtrip(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    err = (y - x).abs()
    assert bool((err <= _bound(name, x, 128)).all()), float((err - _bound(name, x, 128)).max())


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("n", SIZES)
def test_payload_size_is_exactly_the_stated_byte_count(name, n):
    codec = get_codec(name, block=32)
    payload = codec.encode(torch.randn(n))
    assert payload.dtype == torch.uint8 and payload.dim() == 1
    nblocks = math.ceil(n / 32)
    expected = {
        "fp32": 4 * n,
        "bf16": 2 * n,
        "fp8_e4m3": n + nblocks,
        "fp8_e5m2": n + nblocks,
        "int8": n + 4 * nblocks,
        "int4": math.ceil(n / 2) + 4 * nblocks,
        "e3m0": math.ceil(n / 2) + nblocks,
    }[name]
    assert payload.numel() == expected == codec.encoded_nbytes(n)


@pytest.mark.parametrize("name", CODECS)
def test_bits_per_element_includes_scales(name):
    codec = get_codec(name, block=128)
    n = 128 * 64
    assert codec.encoded_nbytes(n) * 8 / n == pytest.approx(codec.bits_per_element)


@pytest.mark.parametrize("name", CODECS)
def test_zeros_roundtrip_exactly(name):
    codec = get_codec(name)
    x = torch.zeros(300)
    assert torch.equal(codec.roundtrip(x), x)


@pytest.mark.parametrize("name", CODECS)
def test_encoding_is_deterministic_and_blockwise(name):
    """Encoding a block-aligned slice gives the same values as the slice of the whole encoding."""
    codec = get_codec(name, block=64)
    x = torch.randn(64 * 5 + 17)
    assert torch.equal(codec.encode(x), codec.encode(x.clone()))
    whole = codec.roundtrip(x)
    assert torch.equal(codec.roundtrip(x[128:]), whole[128:])
    assert torch.equal(codec.roundtrip(x[:192]), whole[:192])


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_rejected(name, bad):
    x = torch.randn(100)
    x[37] = bad
    with pytest.raises(NonFiniteError, match="non-finite"):
        get_codec(name).encode(x)


@pytest.mark.parametrize("name", CODECS)
def test_extreme_magnitudes_stay_finite_and_keep_sign(name):
    codec = get_codec(name, block=4)
    big = 1.0e38
    x = torch.tensor([big, -big, 1e-30, -1e-30, 1e-38, 5.0, -5.0, 0.0])
    y = codec.roundtrip(x)
    assert bool(torch.isfinite(y).all())
    assert bool((torch.sign(y[:2]) == torch.sign(x[:2])).all())
    # the largest value of each block keeps its magnitude to the codec's precision
    assert float(y[0]) == pytest.approx(big, rel=0.34)


@pytest.mark.parametrize("name", CODECS)
def test_malformed_payload_is_rejected_with_sizes(name):
    codec = get_codec(name)
    p = codec.encode(torch.randn(100))
    with pytest.raises(ValueError, match="payload"):
        codec.decode(p[:-1], 100)
    with pytest.raises(ValueError, match="payload"):
        codec.decode(p.float(), 100)


def test_e3m0_saturates_above_two_to_the_127():
    """E8M0 scales stop at 2^127, so e3m0 clamps larger magnitudes to 2^127 (documented)."""
    y = get_codec("e3m0", block=2).roundtrip(torch.tensor([3.0e38, -3.0e38]))
    assert y.tolist() == [2.0**127, -(2.0**127)]


def test_e3m0_keeps_its_largest_blocks_where_denormals_are_flushed():
    """A process that flushes denormals (torch.set_flush_denormal; torch 2.4's Inductor-compiled
    CPU code turns it on for the whole process) reads 2**-127 as zero: a block past 2**126 must
    still encode (it once decoded to zeros there), with the same codes as without the flush."""
    x = torch.tensor([3.0e38, -3.0e38, 1.0e38, 5.0, 2.0**-120, -(2.0**-126), 1e-3, 0.0])
    codec = get_codec("e3m0", block=2)
    plain = codec.encode(x)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        flushed = codec.encode(x)
        y = codec.decode(flushed, x.numel())
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(flushed, plain)
    assert y[:2].tolist() == [2.0**127, -(2.0**127)]


def test_unknown_codec_names_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed.*e3m0"):
        get_codec("fp4")
    for block in (0, True, 32.0):  # (True was taken for a block of 1)
        with pytest.raises(ValueError, match=f"block size must be an int >= 1, got {block!r}"):
            get_codec("int8", block=block)


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "int8", "int4", "e3m0"])
def test_a_block_longer_than_the_buffer_is_the_buffer(name):
    """One scale per buffer by a huge block (2**40): the bytes of a block of the buffer's length,
    and of a block padded with zeros (they change no maximum); the buffer was padded to the block,
    allocating 4 TiB."""
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    huge = get_codec(name, block=2**40).encode(x)
    assert torch.equal(huge, get_codec(name, block=1000).encode(x))
    assert torch.equal(huge, get_codec(name, block=1024).encode(x))
    assert torch.equal(
        get_codec(name, block=2**40).decode(huge, 1000), get_codec(name, block=1024).roundtrip(x)
    )


def test_e3m0_hits_powers_of_two_exactly():
    codec = get_codec("e3m0", block=8)
    x = torch.tensor([1.0, 0.5, 0.25, -0.125, 2.0**-6, 0.0, -1.0, 0.75])
    y = codec.roundtrip(x)
    # block amax 1 -> scale 1; 0.75 is the midpoint of 0.5 and 1 and rounds up
    assert y.tolist() == [1.0, 0.5, 0.25, -0.125, 2.0**-6, 0.0, -1.0, 1.0]
    # below half of the smallest step everything goes to zero
    z = codec.roundtrip(torch.tensor([1.0, 2.0**-7 * 0.99, 2.0**-7, 0, 0, 0, 0, 0]))
    assert z.tolist()[:3] == [1.0, 0.0, 2.0**-6]


def test_int4_uses_two_values_per_byte_and_the_full_range():
    codec = get_codec("int4", block=16)
    x = torch.arange(-7, 9, dtype=torch.float32).clamp(max=7)
    assert torch.equal(codec.roundtrip(x), x)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (-0.0 is not 0.0), NaN where the other is NaN."""
    an, bn = a.isnan(), b.isnan()
    return torch.equal(an, bn) and torch.equal(a[~an].view(torch.int32), b[~bn].view(torch.int32))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, in the interpreter, on inf and NaN
@pytest.mark.parametrize("block", [2, 32, 128, 1024])
def test_the_e3m0_kernels_write_the_references_bytes_and_read_any_payload_as_it_does(block):
    """The one-pass Triton encode (interpreted here) writes the torch reference's payload bit for
    bit: lengths that end mid-block and mid-byte, blocks whose maximum is zero, subnormal (either
    side of 2**-127), a power of two, the largest float, and blocks holding -0.0, an infinity or
    a NaN. The decode gives the reference's values bit for bit for those payloads and for random
    bytes (a scale byte of 255 included)."""
    needs_triton()
    from lowcomm.kernels.triton_codec import e3m0_decode, e3m0_encode

    codec = get_codec("e3m0", block=block)  # a CPU buffer: the torch reference
    torch.manual_seed(block)
    for n in (1, 2, 3, block - 1, block, block + 1, 3 * block + 5, 4099):
        x = torch.randn(n) * torch.exp2(torch.randint(-140, 120, (n,)).float())
        # the first block: largest 1, the rest at the codes' rounding midpoints (1.5 · 2**e rounds up)
        mid = torch.tensor([1.0, 0.75, 1.0, -0.375, 1.0, 1.5 * 2**-7, 1.0, 2.0**-7]).repeat(block)
        x[: min(n, block)] = mid[: min(n, block)]
        edge = [0.0, -0.0, 2.0**-127, 2.0**-127 * 1.5, 2.0**-126, 1e-45, 3.4e38, -(2.0**20)]
        edge += [float("inf"), float("-inf"), float("nan")]
        for i, v in enumerate(edge[: max(n - block, 0) // 2]):  # one unusual value a pair after it
            x[block + 2 * i] = v
        if n > 4 * block:  # a block of zeros, a block whose largest is subnormal
            x[2 * block : 3 * block] = 0.0
            x[3 * block : 4 * block] = torch.randn(block) * 2.0**-140
        want = codec._encode(x)
        assert torch.equal(e3m0_encode(x, block), want), n
        for payload in (want, torch.randint(0, 256, want.shape, dtype=torch.uint8)):
            assert _same_bits(e3m0_decode(payload, n, block), codec._decode(payload, n)), n
    strided = torch.randn(2 * block + 6)[::2]  # a view of every other value
    assert torch.equal(e3m0_encode(strided, block), codec._encode(strided))
    payload = codec._encode(strided).repeat_interleave(2)[::2]  # the same bytes, strided
    assert _same_bits(e3m0_decode(payload, strided.numel(), block), codec._decode(payload, strided.numel()))
    with pytest.raises(ValueError, match="power of two from 2 to 4096, got 96"):
        e3m0_encode(torch.zeros(8), 96)


def test_a_gpu_buffer_goes_through_the_e3m0_kernels_and_a_round_gives_the_same_bytes(monkeypatch):
    """Where the e3m0 kernels run (GPU buffers; here CPU ones, the kernels interpreted), the codec
    encodes and decodes through them, and an in-process group's round of three replicas (every
    encode and decode of a two-phase mean) gives the reference's mean and sent values."""
    needs_triton()
    from lowcomm.comm import LocalGroup, codecs
    from lowcomm.kernels import triton_codec

    calls = []
    for name in ("e3m0_encode", "e3m0_decode"):
        real = getattr(triton_codec, name)
        monkeypatch.setattr(triton_codec, name, lambda *a, _real=real, _n=name: calls.append(_n) or _real(*a))
    torch.manual_seed(0)
    deltas = [torch.randn(1000) * 10.0**-m for m in range(3)]

    def round_of(devices):
        monkeypatch.setattr(codecs, "KERNEL_DEVICES", devices)
        groups = LocalGroup.create(3)
        works = [g.all_reduce_mean(d.clone(), get_codec("e3m0"), "two_phase") for g, d in zip(groups, deltas)]
        return [w.wait() for w in works], [w.sent for w in works]

    (mean_ref, sent_ref), (mean, sent) = round_of(("cuda",)), round_of(("cuda", "cpu"))
    assert calls.count("e3m0_encode") >= 3 and calls.count("e3m0_decode") >= 3, calls
    assert all(_same_bits(a, b) for a, b in zip(mean + sent, mean_ref + sent_ref))
    codec = get_codec("e3m0", block=96)  # a block the kernels do not take: the reference
    assert torch.equal(codec.decode(codec.encode(deltas[0]), 1000), codec.roundtrip(deltas[0]))
