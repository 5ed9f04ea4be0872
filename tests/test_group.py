"""LocalGroup and the quantized mean all-reduce: identical results everywhere, exact byte counts."""

import pytest
import torch

from lowcomm.comm import CODECS, CollectiveError, LocalGroup, get_codec, shard_bounds, wire_bytes


def _reduce(bufs, codec, method="two_phase"):
    groups = LocalGroup.create(len(bufs))
    works = [g.all_reduce_mean(b, codec, method) for g, b in zip(groups, bufs)]
    return [w.wait() for w in works], works


@pytest.mark.parametrize("n", [1, 5, 127, 128, 129, 1000])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_shards_cover_every_element_once_on_block_edges(n, world):
    bounds = shard_bounds(n, world, 128)
    assert len(bounds) == world
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    for (a, b), (c, _) in zip(bounds, bounds[1:]):
        assert b == c and a <= b
    for a, _ in bounds:
        assert a % 128 == 0 or a == n


@pytest.mark.parametrize("method", ["two_phase", "all_gather"])
@pytest.mark.parametrize("name", CODECS)
def test_every_replica_gets_bitwise_identical_mean(name, method):
    torch.manual_seed(0)
    bufs = [torch.randn(1000) for _ in range(4)]
    results, _ = _reduce(bufs, get_codec(name, block=64), method)
    for r in results[1:]:
        assert torch.equal(r, results[0])


def test_fp32_mean_is_the_rank_ordered_fp32_mean():
    torch.manual_seed(1)
    bufs = [torch.randn(777) for _ in range(3)]
    results, _ = _reduce(bufs, get_codec("fp32"))
    expected = (bufs[0] + bufs[1] + bufs[2]) / 3
    assert torch.equal(results[0], expected)


@pytest.mark.parametrize("name", ["int8", "e3m0", "fp8_e4m3"])
def test_quantized_mean_is_close_to_the_true_mean(name):
    torch.manual_seed(2)
    bufs = [torch.randn(4096) for _ in range(4)]
    results, _ = _reduce(bufs, get_codec(name))
    true = sum(bufs) / 4
    rel = float((results[0] - true).norm() / true.norm())
    assert rel < {"int8": 0.02, "fp8_e4m3": 0.06, "e3m0": 0.5}[name]


@pytest.mark.parametrize("method", ["two_phase", "all_gather"])
@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_reported_bytes_equal_the_formula(name, world, method):
    codec = get_codec(name, block=32)
    n = 1000
    _, works = _reduce([torch.randn(n) for _ in range(world)], codec, method)
    assert [w.stats.bytes_sent for w in works] == wire_bytes(codec, n, world, method)
    if method == "two_phase" and codec.block:
        # 2·(M−1)/M · n · bits/8 plus scales, up to the uneven split of blocks
        approx = 2 * (world - 1) / world * codec.encoded_nbytes(n)
        for w in works:
            assert abs(w.stats.bytes_sent - approx) <= 2 * codec.encoded_nbytes(codec.block) * world


def test_single_replica_sends_nothing_and_returns_its_buffer():
    x = torch.randn(10)
    results, works = _reduce([x], get_codec("e3m0"))
    assert torch.equal(results[0], x) and works[0].stats.bytes_sent == 0


def test_sent_is_the_decoded_own_contribution():
    """Each replica's decoded contribution, joined only where asked for (error feedback): a round
    of M replicas in one process joins one full-length tensor, the mean, not M more."""
    from helpers import Dispatched

    torch.manual_seed(3)
    codec = get_codec("int4", block=32)
    bufs = [torch.randn(300) for _ in range(3)]
    with Dispatched() as ops:
        _, works = _reduce(bufs, codec)
    assert ops.calls.count(("cat", (300,))) == 1  # a whole buffer's length: the mean's shards
    for b, w in zip(bufs, works):
        assert torch.equal(w.sent, torch.cat([codec.roundtrip(b[a:c]) for a, c in shard_bounds(300, 3, 32)]))


def test_waiting_before_every_replica_joined_raises_and_names_the_missing():
    groups = LocalGroup.create(3)
    w = groups[0].all_reduce_mean(torch.zeros(4), get_codec("fp32"))
    groups[1].all_reduce_mean(torch.zeros(4), get_codec("fp32"))
    with pytest.raises(CollectiveError, match=r"replica\(s\) \[2\]"):
        w.wait()


def test_mismatched_contributions_fail_on_every_replica():
    groups = LocalGroup.create(2)
    w0 = groups[0].all_reduce_mean(torch.zeros(4), get_codec("fp32"))
    w1 = groups[1].all_reduce_mean(torch.zeros(5), get_codec("fp32"))
    for w in (w0, w1):
        with pytest.raises(CollectiveError, match="replica 1 sent 5 elements"):
            w.wait()


def test_bad_arguments_are_rejected():
    g = LocalGroup.create(1)[0]
    with pytest.raises(ValueError, match="reduce method"):
        g.all_reduce_mean(torch.zeros(3), get_codec("fp32"), "ring")
    with pytest.raises(ValueError, match="1-D float32"):
        g.all_reduce_mean(torch.zeros(3, dtype=torch.float64), get_codec("fp32"))
    for n in (0, True, 2.0):  # a bool is not a count (True made one replica)
        with pytest.raises(ValueError, match=f"num_replicas must be an int >= 1, got {n!r}"):
            LocalGroup.create(n)
    from lowcomm.comm import DistributedGroup

    pg = object()  # (refused before it is used)
    for kw, match in [
        (dict(timeout=float("nan")), r"^timeout=nan is not allowed: a finite number of seconds > 0, or None"),
        (dict(timeout=-1), r"^timeout=-1 is not allowed"),
        # the key is not shown
        (dict(guard="0123456789abcdef0123"), r"^guard must be the job key as bytes, at least 16; got a str$"),
        (dict(guard=b"short"), r"^guard must be the job key as bytes, at least 16; got 5 bytes$"),
        (dict(rank=2, size=2), r"^rank=2 and size=2 are not allowed: ints, 0 <= rank < size$"),
        (dict(rank=-1, size=2), r"^rank=-1 and size=2 are not allowed"),
    ]:
        with pytest.raises(ValueError, match=match):
            DistributedGroup(pg, **kw)


@pytest.mark.parametrize("name", CODECS)
def test_buckets_reduce_every_element_once_and_change_no_bit(name):
    """Bucket edges fall on block edges: bucketing changes the bytes' routing, never the result."""
    torch.manual_seed(5)
    codec = get_codec(name, block=64)
    bufs = [torch.randn(1000) for _ in range(3)]
    whole, _ = _reduce(bufs, codec)
    groups = LocalGroup.create(3)
    for g in groups:
        g.bucket_elems = 300  # rounded down to 256: buckets [0,256) [256,512) [512,768) [768,1000)
    works = [g.all_reduce_mean(b, codec) for g, b in zip(groups, bufs)]
    results = [w.wait() for w in works]
    for r in results:
        assert torch.equal(r, whole[0])
    assert [w.stats.bytes_sent for w in works] == wire_bytes(codec, 1000, 3, bucket_elems=300)
    assert torch.equal(
        works[1].sent, torch.cat([codec.roundtrip(bufs[1][a : a + 64]) for a in range(0, 1000, 64)])
    )


def test_bucket_bounds_are_block_aligned_and_cover_the_buffer():
    from lowcomm.comm.reduce import bucket_bounds

    assert bucket_bounds(1000, 300, 64) == [(0, 256), (256, 512), (512, 768), (768, 1000)]
    assert bucket_bounds(100, None, 64) == [(0, 100)] and bucket_bounds(100, 1000, 64) == [(0, 100)]
    assert bucket_bounds(10, 3, 4) == [(0, 4), (4, 8), (8, 10)]  # a bucket holds at least one block
