"""The quantized mean all-reduce, as pure functions shared by every ReplicaGroup.

Two methods:

``two_phase`` (default): each replica encodes its buffer in ``M`` block-aligned shards; shard ``j``
    goes to replica ``j`` (all_to_all), which decodes the ``M`` contributions, sums them in fp32 in
    rank order, divides by ``M``, and re-encodes the mean; the encoded means are exchanged
    (all_gather) and every replica, the owner included, decodes the same bytes. The result is
    therefore bitwise identical everywhere. A replica sends ``(M-1)`` of its shards and ``M-1``
    copies of its mean shard: about ``2 (M-1)/M · n · bits/8`` bytes plus scales.
``all_gather``: one quantization; each replica sends its whole encoded buffer to the ``M-1``
    others, everyone decodes all ``M`` and sums in rank order: ``(M-1) · n · bits/8`` bytes.

The group implementations only move payloads; the arithmetic lives here so that LocalGroup and
DistributedGroup produce the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .codecs import Codec

__all__ = [
    "REDUCE_METHODS",
    "bucket_bounds",
    "check_args",
    "check_method",
    "decode_mean",
    "encode_shards",
    "reduce_shard",
    "shard_bounds",
    "wire_bytes",
    "screen_norms",
    "Sealer",
    "OUTLIER_FACTOR",
]

#: a contribution whose norm exceeds this many times the median of the others is excluded
OUTLIER_FACTOR = 10.0

REDUCE_METHODS = ("two_phase", "all_gather")


def check_method(method: str) -> None:
    if method not in REDUCE_METHODS:
        raise ValueError(f"unknown reduce method {method!r}; allowed: {list(REDUCE_METHODS)}")


def check_args(buffer: torch.Tensor, method: str) -> None:
    """The argument checks every group's ``all_reduce_mean`` makes before anything is sent."""
    check_method(method)
    if buffer.dim() != 1 or buffer.dtype != torch.float32:
        raise ValueError(
            f"all_reduce_mean takes a 1-D float32 buffer, got {tuple(buffer.shape)} {buffer.dtype}"
        )


def bucket_bounds(numel: int, bucket_elems: int | None, block: int) -> list[tuple[int, int]]:
    """Consecutive buckets of at most ``bucket_elems`` elements (rounded down to whole blocks)."""
    if not bucket_elems or numel <= bucket_elems:
        return [(0, numel)]
    step = max(bucket_elems - bucket_elems % max(block, 1), max(block, 1))
    return [(a, min(a + step, numel)) for a in range(0, numel, step)]


def shard_bounds(numel: int, world: int, block: int) -> list[tuple[int, int]]:
    """Split ``[0, numel)`` into ``world`` contiguous shards whose edges fall on block edges.

    Blocks are dealt as evenly as possible (the first shards get one more); shards may be empty
    when there are fewer blocks than replicas. Every element belongs to exactly one shard.
    """
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    block = max(block, 1)
    nblocks = math.ceil(numel / block)
    q, r = divmod(nblocks, world)
    bounds, start = [], 0
    for j in range(world):
        nb = q + (1 if j < r else 0)
        end = min(start + nb * block, numel)
        bounds.append((start, end))
        start = end
    return bounds


def encode_shards(x: torch.Tensor, codec: Codec, bounds: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Encode each shard of ``x`` separately (one payload per destination replica)."""
    return [codec.encode(x[a:b]) for a, b in bounds]


def decode_mean(
    payloads: Sequence[torch.Tensor], codec: Codec, numel: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Decode ``M`` payloads, sum them in fp32 in rank order and divide by ``M``.

    Returns:
        ``(mean, decoded)``: the fp32 mean and the decoded contributions (each sender's view of
        what it sent, used for error feedback).
    """
    decoded = [codec.decode(p, numel) for p in payloads]
    acc = torch.zeros(numel, dtype=torch.float32, device=decoded[0].device if decoded else None)
    for d in decoded:
        acc += d
    acc /= len(payloads)
    return acc, decoded


def reduce_shard(
    payloads: Sequence[torch.Tensor], codec: Codec, numel: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Owner side of ``two_phase``: :func:`decode_mean` of the shard, re-encoded for everyone.

    Returns:
        ``(mean_payload, decoded)``.
    """
    mean, decoded = decode_mean(payloads, codec, numel)
    return codec.encode(mean), decoded


def wire_bytes(
    codec: Codec, numel: int, world: int, method: str = "two_phase", bucket_elems: int | None = None
) -> list[int]:
    """Bytes each replica hands to its collectives for one mean all-reduce (the formula)."""
    check_method(method)
    if world == 1:
        return [0]
    buckets = bucket_bounds(numel, bucket_elems, codec.block)
    if len(buckets) > 1:
        per = [wire_bytes(codec, b - a, world, method) for a, b in buckets]
        return [sum(p[r] for p in per) for r in range(world)]
    if method == "all_gather":
        return [(world - 1) * codec.encoded_nbytes(numel)] * world
    bounds = shard_bounds(numel, world, codec.block)
    sizes = [codec.encoded_nbytes(b - a) for a, b in bounds]
    total = sum(sizes)
    # replica i sends every shard but its own, then its mean shard to the world-1 others
    return [(total - sizes[i]) + (world - 1) * sizes[i] for i in range(world)]


def screen_norms(norms: Sequence[float], outlier_factor: float = OUTLIER_FACTOR) -> dict[int, str]:
    """Contributions to exclude from a round, by rank, with the reason; the same on every replica
    (every replica sees the same norms). Non-finite norms are excluded; with three or more finite
    ones, so is a norm above ``outlier_factor`` times the median of the finite norms."""
    out = {r: f"non-finite pseudo-gradient (norm {n})" for r, n in enumerate(norms) if not math.isfinite(n)}
    finite = sorted(n for n in norms if math.isfinite(n))
    if len(finite) >= 3:
        med = (
            finite[len(finite) // 2]
            if len(finite) % 2
            else 0.5 * (finite[len(finite) // 2 - 1] + finite[len(finite) // 2])
        )
        if med > 0:
            for r, n in enumerate(norms):
                if math.isfinite(n) and n > outlier_factor * med:
                    out[r] = f"outlier: norm {n:.4g} > {outlier_factor:g} x median {med:.4g}"
    return out


class Sealer:
    """Seals payloads with a tag of the job's key, so a receiver knows a payload came, unchanged,
    from a key holder: ``payload || HMAC-SHA256(key, payload)[:16]``. A stranger who reached the
    group, a damaged link or a flipped byte all fail :meth:`unseal`.

    Args:
        key: the job's shared secret (at least 16 bytes).
        name: what the key is called where it is refused (the caller's argument).
    """

    TAG = 16  # bytes of the truncated HMAC: 2^-128 for a forgery

    def __init__(self, key: bytes, name: str = "key") -> None:
        if not isinstance(key, bytes) or len(key) < 16:  # (the key is not shown)
            what = f"{len(key)} bytes" if isinstance(key, bytes) else f"a {type(key).__name__}"
            raise ValueError(f"{name} must be the job key as bytes, at least 16; got {what}")
        self._key = key

    def _tag(self, payload: torch.Tensor) -> bytes:
        import hashlib
        import hmac

        data = payload.cpu().numpy().tobytes() if payload.numel() else b""
        return hmac.new(self._key, data, hashlib.sha256).digest()[: self.TAG]

    def seal(self, payload: torch.Tensor) -> torch.Tensor:
        """``payload`` (uint8) followed by its tag."""
        tag = torch.frombuffer(bytearray(self._tag(payload)), dtype=torch.uint8).to(payload.device)
        return torch.cat([payload, tag])

    def unseal(self, sealed: torch.Tensor) -> torch.Tensor | None:
        """The payload of :meth:`seal` output, or None if its tag does not match."""
        import hmac

        body, tag = sealed[: -self.TAG], sealed[-self.TAG :].cpu().numpy().tobytes()
        return body if len(tag) == self.TAG and hmac.compare_digest(self._tag(body), tag) else None
