"""Outer Nesterov step against torch SGD, and the Streaming DiLoCo schedule."""

import pytest
import torch

from lowcomm.optim import (
    apply_update,
    fragment_offsets,
    is_send_step,
    nesterov_init,
    nesterov_update,
    partition_blocks,
    sends_at,
    validate_schedule,
)


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("lr", [0.7, 1.0, 0.1])
def test_nesterov_matches_torch_sgd_bit_for_bit(momentum, lr):
    torch.manual_seed(0)
    p0 = torch.randn(513)
    grads = [torch.randn(513) for _ in range(6)]
    ref = p0.clone().requires_grad_(True)
    opt = torch.optim.SGD([ref], lr=lr, momentum=momentum, nesterov=momentum > 0, foreach=False)
    ours, state = p0.clone(), nesterov_init(p0)
    for g in grads:
        ref.grad = g.clone()
        opt.step()
        d, state = nesterov_update(g, state, momentum)
        apply_update(ours, d, lr)
        assert torch.equal(ours, ref.detach())


def test_offsets_follow_floor_p_h_over_p():
    assert fragment_offsets(10, 3) == [0, 3, 6]
    assert fragment_offsets(50, 4) == [0, 12, 25, 37]


@pytest.mark.parametrize("H,P", [(8, 4), (10, 3), (50, 4), (5, 5), (7, 1)])
def test_each_fragment_sends_every_h_steps_from_its_offset(H, P):
    offsets = fragment_offsets(H, P)
    sends = {p: [] for p in range(P)}
    for step in range(1, 6 * H + 1):
        due = sends_at(step, H, P)
        assert len(due) <= 1  # P <= H: at most one send per step
        for p in due:
            sends[p].append(step)
    for p in range(P):
        expected = list(range(offsets[p] + H, 6 * H + 1, H))
        assert sends[p] == expected
        assert all(is_send_step(s, p, H, P) for s in expected)


def test_no_fragment_sends_before_its_first_period():
    assert not any(sends_at(s, 10, 2) for s in range(1, 10))
    assert sends_at(10, 10, 2) == [0] and sends_at(15, 10, 2) == [1]


@pytest.mark.parametrize(
    "H,P,tau,match",
    [
        (0, 1, 0, "sync_every"),
        (4, 5, 0, "fragments"),
        (8, 4, 2, "overlap"),
        (8, 2, -1, "overlap"),
        (8, 0, 0, "fragments"),
    ],
)
def test_invalid_schedules_name_the_value(H, P, tau, match):
    with pytest.raises(ValueError, match=match):
        validate_schedule(H, P, tau)


def test_largest_valid_overlap_is_accepted():
    validate_schedule(10, 3, 3)  # 3·3 = 9 < 10
    with pytest.raises(ValueError, match="overlap"):
        validate_schedule(9, 3, 3)


def test_patterns_assign_each_block_once():
    assert partition_blocks(6, 3, "strided") == [[0, 3], [1, 4], [2, 5]]
    assert partition_blocks(7, 3, "sequential") == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(ValueError, match="pattern"):
        partition_blocks(4, 2, "random")
