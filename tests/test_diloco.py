"""The DiLoCo wrapper: identities from the papers, bitwise consistency, resume, bad configs."""

import copy
import io
import logging

import pytest
import torch
from torch import nn

from lowcomm import DiLoCo, LocalGroup, finish_replicas, step_replicas
from lowcomm.comm.group import CollectiveError
from lowcomm.lm import GPT, GPTConfig

TINY = GPTConfig(vocab_size=32, seq_len=8, n_layer=3, n_head=2, n_embd=16)


def _batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randint(0, 32, (2, 8), generator=g)
    return x, torch.roll(x, -1, dims=1)


def _replicas(M: int, lr: float = 1e-2, seed: int = 0):
    torch.manual_seed(seed)
    base = GPT(TINY)
    models = [copy.deepcopy(base) for _ in range(M)]
    opts = [torch.optim.AdamW(m.parameters(), lr=lr, foreach=False) for m in models]
    return models, opts


def _inner_step(models, opts, step):
    for r, (m, o) in enumerate(zip(models, opts)):
        m(*_batch(step, r)).backward()
        o.step()
        o.zero_grad(set_to_none=True)


def _wrap(models, opts, **kw):
    groups = LocalGroup.create(len(models))
    return [DiLoCo(m, o, g, **kw) for m, o, g in zip(models, opts, groups)]


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_vanilla_equals_reference_diloco_bit_for_bit():
    """P = 1, τ = 0 is Algorithm 1 of DiLoCo with torch's Nesterov SGD as the outer optimizer."""
    H, steps, M = 3, 9, 3
    models, opts = _replicas(M)
    ref_models, ref_opts = _replicas(M)
    dil = _wrap(models, opts, sync_every=H, fragments=1, overlap=0, outer_lr=0.7, outer_momentum=0.9)
    glob = [p.detach().clone().requires_grad_(True) for p in ref_models[0].parameters()]
    outer = torch.optim.SGD(glob, lr=0.7, momentum=0.9, nesterov=True, foreach=False)
    for step in range(1, steps + 1):
        _inner_step(models, opts, step)
        step_replicas(dil)
        _inner_step(ref_models, ref_opts, step)
        if step % H == 0:
            for i, g in enumerate(glob):
                acc = torch.zeros_like(g)
                for m in ref_models:
                    acc += g.detach() - list(m.parameters())[i].detach()
                g.grad = acc / M
            outer.step()
            with torch.no_grad():
                for m in ref_models:
                    for p, g in zip(m.parameters(), glob):
                        p.copy_(g)
        for m, rm in zip(models, ref_models):
            assert torch.equal(_flat(m), _flat(rm)), f"diverged at step {step}"


def test_unit_lr_zero_momentum_is_parameter_averaging():
    models, opts = _replicas(3)
    dil = _wrap(models, opts, sync_every=2, outer_lr=1.0, outer_momentum=0.0)
    _inner_step(models, opts, 1)
    step_replicas(dil)
    _inner_step(models, opts, 2)
    avg = sum(_flat(m) for m in models) / 3
    step_replicas(dil)
    torch.testing.assert_close(dil[0].global_vector(), avg, rtol=0, atol=1e-6)
    for m in models:  # alpha = 0: every replica now holds the average
        assert torch.equal(_flat(m), dil[0].global_vector())


def test_alpha_one_leaves_local_parameters_untouched():
    models, opts = _replicas(2)
    dil = _wrap(models, opts, sync_every=1, alpha=1.0)
    before_global = dil[0].global_vector().clone()
    _inner_step(models, opts, 1)
    local = [_flat(m).clone() for m in models]
    step_replicas(dil)
    for m, loc in zip(models, local):
        assert torch.equal(_flat(m), loc)
    assert not torch.equal(dil[0].global_vector(), before_global)  # the global copy did move


def test_a_round_merges_its_fragment_in_a_few_operations_whatever_the_parameter_count():
    """Applying a round merges each parameter as alpha·local + (1−alpha)·global, in multi-tensor
    operations: as many for a 12-layer model as for a 2-layer one (on a GPU a launch or a few
    each), where a loop over the parameters made two launches a tensor."""
    from helpers import load_benchmark

    counts = []
    for layers in (2, 12):
        torch.manual_seed(0)
        base = GPT(GPTConfig(vocab_size=32, seq_len=8, n_layer=layers, n_head=2, n_embd=16))
        models = [copy.deepcopy(base) for _ in range(2)]
        opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False) for m in models]
        dil = _wrap(models, opts, sync_every=2, overlap=1, alpha=0.5)
        for step in (1, 2):  # the round sent at step 2, applied at step 3
            _inner_step(models, opts, step)
            step_replicas(dil)
        _inner_step(models, opts, 3)
        for d in dil:
            d.send_due()
        local = [[p.detach().clone() for p in m.parameters()] for m in models]
        with load_benchmark("host_overhead")._Count() as counted:
            dil[0].apply_due()
        dil[1].apply_due()
        counts.append(sum(counted.ops.values()))
        with dil[0].global_parameters() as g:
            glob = [p.detach().clone() for p in g.parameters()]
        for m, loc in zip(models, local):
            for p, lp, gp in zip(m.parameters(), loc, glob):
                assert torch.equal(p, lp.mul(0.5).add_(gp, alpha=0.5))
    assert counts[0] == counts[1] and counts[0] < 40, counts


@pytest.mark.parametrize("codec", ["fp32", "e3m0", "int4", "fp8_e4m3"])
@pytest.mark.parametrize("fragments,overlap,alpha", [(1, 0, 0.0), (4, 1, 0.5), (2, 1, 0.0)])
def test_replicas_hold_bitwise_identical_globals_after_every_round(codec, fragments, overlap, alpha):
    models, opts = _replicas(3)
    H, steps = 8, 24
    dil = _wrap(
        models,
        opts,
        sync_every=H,
        fragments=fragments,
        overlap=overlap,
        alpha=alpha,
        codec=codec,
        codec_block=32,
        error_feedback=codec != "fp32",
    )
    rounds = 0
    for step in range(1, steps + 1):
        _inner_step(models, opts, step)
        step_replicas(dil)
        stats = [d.drain_round_stats() for d in dil]
        rounds += len(stats[0])
        for d in dil[1:]:
            assert torch.equal(d.global_vector(), dil[0].global_vector())
    offsets = [p * H // fragments for p in range(fragments)]
    assert rounds == sum(len(range(t + H, steps + 1 - overlap, H)) for t in offsets)


def test_rounds_apply_overlap_steps_after_sending():
    models, opts = _replicas(2)
    dil = _wrap(models, opts, sync_every=6, fragments=3, overlap=1)
    seen = []
    for step in range(1, 19):
        _inner_step(models, opts, step)
        step_replicas(dil)
        seen += [(r.fragment, r.send_step, r.apply_step) for r in dil[0].drain_round_stats()]
    # fragment 0 sends again at 18, due at 19: not applied yet
    assert seen == [(0, 6, 7), (1, 8, 9), (2, 10, 11), (0, 12, 13), (1, 14, 15), (2, 16, 17)]


def test_strided_fragments_split_blocks_and_put_the_rest_where_the_largest_fragment_is_smallest():
    """With a count, the parameters outside the blocks form a fragment of their own, unless
    splitting the blocks over all P and adding them to the smallest fragment makes the largest
    fragment smaller (a byte-level vocabulary's small embeddings): then that."""
    from lowcomm.optim import build_fragments

    rest = {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"}
    models, opts = _replicas(1)
    d = _wrap(models, opts, sync_every=8, fragments=3)[0]
    names = d.fragment_names  # TINY: 3 blocks, each larger than the rest
    for i in range(3):
        assert all(n.startswith(f"blocks.{i}.") or n in rest for n in names[i]), names[i]
    assert rest <= set(names[2])  # with the last of the equal fragments
    sizes = d.fragment_numels()
    block = sum(p.numel() for n, p in models[0].named_parameters() if n.startswith("blocks.0."))
    assert sizes[:2] == [block, block] and block < sizes[2] < 2 * block  # apart: 2 blocks in one
    # embeddings larger than a block (a big vocabulary): apart, and the blocks over the other P − 1
    big = GPT(GPTConfig(**{**TINY.__dict__, "vocab_size": 4096}))
    names = build_fragments(big, 3)
    assert all(n.startswith(("blocks.0.", "blocks.2.")) for n in names[0])
    assert all(n.startswith("blocks.1.") for n in names[1])
    assert set(names[2]) == rest


def test_a_state_of_another_fragment_layout_is_refused_naming_what_differs():
    """A DiLoCo state saved with the same number of fragments laid out otherwise (here explicit
    fragments against the split by count) is refused by name, the model left as it was."""
    models, opts = _replicas(1)
    apart = _wrap(models, opts, sync_every=4, fragments=[["blocks"], ["wte", "wpe", "ln_f"]])[0]
    state = apart.state_dict()
    apart.detach()
    models, opts = _replicas(1)
    before = {n: p.detach().clone() for n, p in models[0].named_parameters()}
    by_count = _wrap(models, opts, sync_every=4, fragments=2)[0]
    with pytest.raises(
        ValueError, match=r"fragment 0 of the state holds other parameters.*another fragment layout"
    ):
        by_count.load_state_dict(state)
    assert all(torch.equal(p, before[n]) for n, p in models[0].named_parameters())


def test_custom_fragments_from_names_and_modules():
    models, opts = _replicas(2)
    m = models[0]
    frags = [[m.blocks[0], m.blocks[1]], [m.blocks[2], "wte.weight", "wpe.weight", m.ln_f]]
    groups = LocalGroup.create(2)
    d = DiLoCo(m, opts[0], groups[0], sync_every=4, fragments=frags)
    assert d.num_fragments == 2 and "wte.weight" in d.fragment_names[1]
    with pytest.raises(ValueError, match="in no fragment"):
        DiLoCo(m, opts[0], groups[0], sync_every=4, fragments=[[m.blocks[0]]])
    with pytest.raises(ValueError, match="is in fragment 0 and fragment 1"):
        DiLoCo(m, opts[0], groups[0], sync_every=4, fragments=[[m], [m.ln_f]])
    with pytest.raises(ValueError, match="neither a trainable parameter nor a module"):
        DiLoCo(m, opts[0], groups[0], sync_every=4, fragments=[["nope.weight"]])
    with pytest.raises(ValueError, match=r"^fragments=\[\] is not allowed: a count >= 1, or one list"):
        DiLoCo(m, opts[0], groups[0], sync_every=4, fragments=[])  # it was named 'fragments=0'


def _run(dil, models, opts, steps):
    for step in steps:
        _inner_step(models, opts, step)
        step_replicas(dil)


@pytest.mark.parametrize("compact", [False, True])
def test_resume_from_state_dict_continues_bit_for_bit(compact):
    kw = dict(
        sync_every=4, fragments=2, overlap=1, alpha=0.5, codec="e3m0", codec_block=32, error_feedback=True
    )
    models, opts = _replicas(2)
    dil = _wrap(models, opts, **kw)
    _run(dil, models, opts, range(1, 5))  # at step 4 fragment 0 is in flight (due at 5)
    assert any(f["inflight"]["active"] for f in dil[0].state_dict()["fragments"]), (
        "must cover an in-flight round"
    )
    saved = []
    for m, o, d in zip(models, opts, dil):
        buf = io.BytesIO()
        state = {"model": m.state_dict(), "opt": o.state_dict(), "diloco": d.state_dict(compact=compact)}
        torch.save(state, buf)
        saved.append(buf.getvalue())
    _run(dil, models, opts, range(5, 14))

    models2, opts2 = _replicas(2, seed=123)  # different init: everything must come from the state
    states = [torch.load(io.BytesIO(b), weights_only=True) for b in saved]
    dil2 = _wrap(models2, opts2, **kw)  # built first: it makes the replicas start alike
    for m, o, d, s in zip(models2, opts2, dil2, states):  # then each replica's own state
        m.load_state_dict(s["model"])
        o.load_state_dict(s["opt"])
        d.load_state_dict(s["diloco"])
    _run(dil2, models2, opts2, range(5, 14))
    for a, b, da, db in zip(models, models2, dil, dil2):
        assert torch.equal(_flat(a), _flat(b))
        assert torch.equal(da.global_vector(), db.global_vector())
        assert da.step_count == db.step_count == 13


def test_state_dict_is_the_live_state_and_an_empty_slot_takes_no_outer_memory():
    """As a module's, the state's tensors are the live ones: a checkpoint copied the global
    parameters, the momentum and a zero round per fragment on the outer device (three times the
    model on a GPU at every save). An empty slot is zeros in host memory in the fixed layout
    (torch.distributed.checkpoint loads into it) and empty with ``compact``."""
    models, opts = _replicas(2)
    dil = _wrap(models, opts, sync_every=4, fragments=2, overlap=1, error_feedback=True, codec="int8")
    _run(dil, models, opts, range(1, 5))  # fragment 0 in flight, fragment 1's slot empty
    d = dil[0]
    fixed, compact = d.state_dict(), d.state_dict(compact=True)
    for state in (fixed, compact):
        for fs, f in zip(state["fragments"], d._frags):
            assert fs["global"] is f.global_ and fs["momentum"] is f.momentum.momentum
            assert fs["residual"] is f.residual and fs["global_buffers"] is f.global_buffers
        assert state["fragments"][0]["inflight"]["delta"] is d._inflight[0].delta
    slot, little = fixed["fragments"][1]["inflight"], compact["fragments"][1]["inflight"]
    assert not slot["active"] and slot["delta"].device.type == "cpu"
    assert slot["delta"].shape == d._frags[1].momentum.momentum.shape and not slot["delta"].any()
    assert little["delta"].numel() == 0 and little["delta"].dtype == torch.float32

    def nbytes(state):
        buf = io.BytesIO()
        torch.save(state, buf)
        return buf.tell()

    assert nbytes(fixed) - nbytes(compact) >= 4 * d._frags[1].momentum.momentum.numel()


def test_another_replica_s_state_gives_only_the_job_s_part():
    """``own=False`` (a static job resumed with another number of replicas: each takes replica 0's
    checkpoint): the global parameters, outer momentum and step are taken; the local parameters
    are the global ones, and that replica's round in flight and error-feedback residual are not
    (sent by every replica, its pseudo-gradient would have been counted once per replica)."""
    kw = dict(sync_every=4, fragments=2, overlap=1, codec="e3m0", codec_block=32, error_feedback=True)
    models, opts = _replicas(2)
    dil = _wrap(models, opts, **kw)
    _run(dil, models, opts, range(1, 7))  # at step 6 fragment 1 is in flight, fragment 0 has a residual
    state = dil[0].state_dict()
    assert any(f["inflight"]["active"] for f in state["fragments"])
    assert any(f["residual"].abs().sum() > 0 for f in state["fragments"])
    (model,), (opt,) = _replicas(1, seed=123)
    joined = _wrap([model], [opt], **kw)[0]
    joined.load_state_dict(state, own=False)
    assert joined.in_flight == 0 and joined.step_count == 6
    assert torch.equal(joined.global_vector(), dil[0].global_vector())
    with dil[0].global_parameters() as g:
        assert torch.equal(_flat(model), _flat(g))
    assert not torch.equal(_flat(model), _flat(models[0]))  # (replica 0's own parameters are not taken)
    assert all(f.momentum.momentum.equal(g.momentum.momentum) for f, g in zip(joined._frags, dil[0]._frags))
    assert all(not f.residual.any() for f in joined._frags)
    _run([joined], [model], [opt], range(7, 13))  # (and it trains on, alone, through its rounds)
    assert joined.step_count == 12


def test_a_replica_resumed_from_another_s_state_among_resumed_ones_sends_its_rounds_again():
    """A job of two replicas resumed with three (the integrations' resume_checkpoint: the new one
    from replica 0's checkpoint; torch.distributed.checkpoint from replica 0's folder) with a
    round in flight: replicas 0 and 1 send theirs again, so the new one must too
    (``rounds=True``), as a copy of replica 0, or its first collective is the next round's while
    theirs is the saved one's. The state records whose it is: by default the new replica takes it
    as another's."""
    kw = dict(sync_every=4, fragments=2, overlap=1, codec="e3m0", codec_block=32, error_feedback=True)
    models, opts = _replicas(2)
    dil = _wrap(models, opts, **kw)
    _run(dil, models, opts, range(1, 5))  # fragment 0 in flight
    saved = [
        copy.deepcopy({"model": m.state_dict(), "opt": o.state_dict(), "diloco": d.state_dict(compact=True)})
        for m, o, d in zip(models, opts, dil)
    ]

    def resumed(**how):
        models3, opts3 = _replicas(3, seed=9)
        dil3 = _wrap(models3, opts3, **kw)
        for r, (m, o, d) in enumerate(zip(models3, opts3, dil3)):
            s = copy.deepcopy(saved[r if r < 2 else 0])  # (AdamW's state would alias replica 0's)
            m.load_state_dict(s["model"])
            o.load_state_dict(s["opt"])
            d.load_state_dict(s["diloco"], **(how if r == 2 else {}))
        return models3, opts3, dil3

    ends = []
    for how in ({"own": False, "rounds": True}, {}):  # {}: the state says it is replica 0's
        models3, opts3, dil3 = resumed(**how)
        assert [d.in_flight for d in dil3] == [1, 1, 1]
        assert not dil3[2]._frags[0].residual.any()  # (replica 0's quantization error is not its own)
        with dil3[0].global_parameters():
            assert torch.equal(_flat(models3[2]), _flat(models3[0]))  # (its local = the global)
        _run(dil3, models3, opts3, range(5, 13))
        assert torch.equal(dil3[2].global_vector(), dil3[0].global_vector())
        assert torch.equal(dil3[1].global_vector(), dil3[0].global_vector())
        ends.append(dil3[0].global_vector())
    assert torch.equal(ends[0], ends[1])
    models3, opts3, dil3 = resumed(own=False)  # (own=False alone: no round in flight)
    assert [d.in_flight for d in dil3] == [1, 1, 0]
    with pytest.raises(CollectiveError, match=r"collective #0 still waits for replica\(s\) \[2\]"):
        _run(dil3, models3, opts3, range(5, 13))


def test_state_from_another_configuration_is_refused():
    models, opts = _replicas(1)
    d = _wrap(models, opts, sync_every=4, codec="int8")[0]
    state = d.state_dict()
    other = _wrap(models, opts, sync_every=4, codec="e3m0")[0]
    with pytest.raises(ValueError, match="codec"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="DiLoCo state version must be 2, got 99"):
        d.load_state_dict({"version": 99})
    # not a state at all: it read "version must be 2, got None (another lowcomm version's state)"
    for junk, got in [({}, r"a dict of keys \[\]"), (None, "NoneType"), ({"model": 1}, r"\['model'\]")]:
        with pytest.raises(
            ValueError, match=rf"^not a DiLoCo state \(what DiLoCo.state_dict\(\) returns.*{got}"
        ):
            d.load_state_dict(junk)
    # a part of a replica of several processes (torch.distributed.checkpoint layout), or not a state
    with pytest.raises(ValueError, match=r"holds \['part 1 of 2'\].*this process is part 0 of 1"):
        d.load_state_dict({"version": state["version"], "part 1 of 2": state})
    with pytest.raises(ValueError, match=r"lacks \['config', 'fragments'\]"):
        d.load_state_dict({"version": state["version"], "step": 3})
    d.load_state_dict(state)  # (and its own loads)


def test_a_compiled_model_holds_its_parameters_under_their_own_names():
    """torch.compile's wrapper adds ``_orig_mod.`` to every parameter name: a replica that compiles
    and one that does not used to differ in the configuration check, and a state saved compiled
    did not load into a run resumed without compiling. The wrapper is looked through."""
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=32, seq_len=8, n_layer=3, n_head=2, n_embd=16))
    plain, compiled = copy.deepcopy(base), torch.compile(copy.deepcopy(base))  # (never run: no compile)
    groups = LocalGroup.create(2)
    dil = [DiLoCo(m, None, g, sync_every=2, fragments=2) for m, g in zip([plain, compiled], groups)]
    assert dil[0].fragment_names == dil[1].fragment_names
    assert dil[1].fragment_names[0][0] == "blocks.0.ln1.weight"
    dil[0].load_state_dict(dil[1].state_dict())


def test_a_model_without_values_yet_is_refused_by_name():
    """torchtitan builds models on the meta device and materializes them after sharding: a
    DiLoCo built before that is told so, naming the parameter."""
    model = nn.Linear(4, 4, device="meta")
    with pytest.raises(ValueError, match="parameter 'weight' is on the meta device"):
        DiLoCo(model, None, LocalGroup.create(1)[0], sync_every=2)


def test_global_parameters_context_swaps_and_restores():
    models, opts = _replicas(2)
    dil = _wrap(models, opts, sync_every=2, alpha=1.0)
    _run(dil, models, opts, range(1, 4))
    local = _flat(models[0]).clone()
    with dil[0].global_parameters() as m:
        assert torch.equal(_flat(m), dil[0].global_vector())
    assert torch.equal(_flat(models[0]), local)


def test_finish_syncs_all_unsynced_progress_once():
    models, opts = _replicas(2)
    dil = _wrap(models, opts, sync_every=4, fragments=2, overlap=1, outer_lr=1.0, outer_momentum=0.0)
    _run(dil, models, opts, range(1, 8))  # fragment 1 sent at step 6; fragment 0 last at 4
    finish_replicas(dil)
    stats = dil[0].drain_round_stats()
    finals = [(s.fragment, s.final) for s in stats if s.send_step == 7]
    assert finals == [(0, True), (1, True)]
    avg = sum(_flat(m) for m in models) / 2
    for m in models:
        assert torch.equal(_flat(m), _flat(models[0]))
    torch.testing.assert_close(_flat(models[0]), avg, rtol=0, atol=1e-5)


def test_round_stats_nobody_drains_are_kept_to_the_newest(monkeypatch):
    """A loop that never drains the round statistics (a framework's callback, a plain loop) held
    every round of its run; the newest MAX_UNDRAINED_ROUNDS are kept."""
    from lowcomm.optim import diloco as module

    monkeypatch.setattr(module, "MAX_UNDRAINED_ROUNDS", 3)
    models, opts = _replicas(1)
    dil = _wrap(models, opts, sync_every=1)
    _run(dil, models, opts, range(1, 9))
    assert [s.send_step for s in dil[0].drain_round_stats()] == [6, 7, 8]


def test_round_stats_count_bytes_and_norms():
    models, opts = _replicas(4)
    dil = _wrap(models, opts, sync_every=2, codec="e3m0")
    _run(dil, models, opts, range(1, 3))
    (s,) = dil[0].drain_round_stats()
    from lowcomm.comm import get_codec, wire_bytes

    assert s.bytes_sent == wire_bytes(get_codec("e3m0"), s.numel, 4)[0]
    assert s.pseudo_grad_norm > 0 and s.mean_pseudo_grad_norm > 0 and s.momentum_norm > 0


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(fragments=6), r"fragments must be in \[1, 4\]"),
        (dict(sync_every=8, fragments=4, overlap=2), "overlap"),
        (dict(alpha=1.5), "alpha"),
        (dict(alpha=-0.1), "alpha"),
        (dict(codec="fp4"), "unknown codec"),
        (dict(sync_every=0), "sync_every"),
        (dict(outer_lr=0), "outer_lr"),
        (dict(outer_momentum=1.0), "outer_momentum"),
        (dict(reduce="ring"), "reduce method"),
        (dict(pattern="zigzag"), "pattern"),
        (dict(outer_device="cuda:99"), r"outer_device='cuda:99' is not allowed: 'cpu' or the parameters'"),
        (dict(outer_device="meta"), "outer_device='meta' is not allowed: a device that holds values"),
        # a misspelt keyword (of DiLoCo, or a Lightning or HF callback) names the settings
        (dict(sync_evry=4), r"unknown DiLoCo setting\(s\) \['sync_evry'\]; allowed: \['alpha', 'codec'"),
    ],
)
def test_bad_configuration_is_refused_with_the_value_named(kw, match):
    models, opts = _replicas(1)
    args = dict(sync_every=8)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        DiLoCo(models[0], opts[0], LocalGroup.create(1)[0], **args)


def test_step_must_follow_exactly_one_inner_optimizer_step():
    models, opts = _replicas(1)
    d = DiLoCo(models[0], opts[0], LocalGroup.create(1)[0], sync_every=4)
    with pytest.raises(RuntimeError, match="stepped 0 times since the last diloco.step"):
        d.step()  # before optimizer.step()
    _inner_step(models, opts, 1)
    d.step()
    with pytest.raises(RuntimeError, match="stepped 0 times"):
        d.step()  # twice for one inner step
    _inner_step(models, opts, 2)
    _inner_step(models, opts, 3)
    with pytest.raises(RuntimeError, match="stepped 2 times"):
        d.step()  # a missed call
    assert d.step_count == 1
    unchecked = DiLoCo(models[0], None, LocalGroup.create(1)[0], sync_every=4)
    unchecked.step()  # no inner optimizer given: nothing to check
    assert unchecked.step_count == 1


def test_replicas_built_from_different_weights_start_alike_or_are_refused():
    models, opts = _replicas(3)
    with torch.no_grad():
        for i, m in enumerate(models):  # a different seed per rank: the usual mistake
            for p in m.parameters():
                p.add_(0.1 * i)
    groups = LocalGroup.create(3)
    dil = [DiLoCo(m, o, g, sync_every=2) for m, o, g in zip(models, opts, groups)]
    assert all(torch.equal(_flat(m), _flat(models[0])) for m in models)  # replica 0's weights everywhere
    assert all(torch.equal(d.global_vector(), dil[0].global_vector()) for d in dil)
    models, opts = _replicas(3)
    with torch.no_grad():
        next(models[2].parameters()).add_(1.0)
    groups = LocalGroup.create(3)
    DiLoCo(models[0], opts[0], groups[0], sync_every=2, init="check")
    DiLoCo(models[1], opts[1], groups[1], sync_every=2, init="check")
    with pytest.raises(
        ValueError, match=r"replica\(s\) \[2\] differ from replica 0 in the initial parameters"
    ):
        DiLoCo(models[2], opts[2], groups[2], sync_every=2, init="check")
    with pytest.raises(ValueError, match="init='copy' is not allowed"):
        DiLoCo(models[0], opts[0], LocalGroup.create(1)[0], sync_every=2, init="copy")


@pytest.mark.parametrize("bucket", [64 << 20, 40])
def test_start_up_copies_every_parameter_bit_for_bit_and_refuses_other_models_by_name(monkeypatch, bucket):
    """Broadcast carries each parameter's own bits (an fp64 one is not rounded through fp32) and
    the frozen ones too (as DDP does: nothing would ever pull them together); replicas of another
    shape are refused naming the parameter; a complex parameter is refused by name. With buckets
    of 40 bytes (a few small tensors to a bucket, a larger one alone, broadcast in place), the
    same: start-up holds no copy of the whole model."""
    from lowcomm.optim import diloco as module

    monkeypatch.setattr(module, "START_BUCKET_BYTES", bucket)

    def model(seed):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1).double(), nn.Linear(4, 4))
        m[2].requires_grad_(False)  # frozen: trained by no one, copied at start-up
        return m

    models = [model(s) for s in range(2)]
    with torch.no_grad():
        models[0][1].weight[0, 0] = 1 + 2**-40  # no fp32 holds it
    groups = LocalGroup.create(2)
    for m, g in zip(models, groups):
        DiLoCo(m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad]), g, sync_every=2)
    assert models[1][1].weight[0, 0].item() == 1 + 2**-40
    for (n, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(a, b), n
    models = [model(0), model(0)]
    with torch.no_grad():
        models[1][2].weight[0, 0] += 1  # only a frozen parameter differs
    groups = LocalGroup.create(2)
    DiLoCo(models[0], None, groups[0], sync_every=2, init="check")
    with pytest.raises(ValueError, match=r"\[1\] differ from replica 0 in the initial parameters"):
        DiLoCo(models[1], None, groups[1], sync_every=2, init="check")
    wide = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2).double(), nn.Linear(4, 4).requires_grad_(False))
    groups = LocalGroup.create(2)
    DiLoCo(model(0), None, groups[0], sync_every=2)
    with pytest.raises(
        ValueError, match=r"parameters and init: \{'param 1.bias': \{'replica 0': \['torch.float64', 1\]"
    ):
        DiLoCo(wide, None, groups[1], sync_every=2)
    odd = nn.Linear(4, 1)
    odd.phase = nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="parameter 'phase' is torch.complex64: DiLoCo syncs floating-point"):
        DiLoCo(odd, None, LocalGroup.create(1)[0], sync_every=2)


def test_arguments_of_the_wrong_kind_and_an_optimizer_of_another_model_are_refused_by_name():
    """A string, None or another model's optimizer: a TypeError naming the argument (these were
    AttributeErrors from inside), and an optimizer that updates none of the model's trained
    parameters is refused (it was taken: DiLoCo synced weights the inner steps never changed).
    One over part of them, or over views of them (the trainer's batched replicas), is taken."""
    model, other = nn.Linear(4, 2), nn.Linear(4, 2)
    group = LocalGroup.create(1)[0]
    opt = torch.optim.AdamW(model.parameters())
    for args, match in [
        (("model", opt, group), "model must be a torch.nn.Module, got str"),
        ((model, "adamw", group), "inner_optimizer must be a torch.optim.Optimizer or None, got str"),
        ((model, opt, None), "group must be a lowcomm ReplicaGroup .*, got NoneType"),
    ]:
        with pytest.raises(TypeError, match=match):
            DiLoCo(*args, sync_every=2)
    with pytest.raises(ValueError, match="inner_optimizer updates none of the model's 2 trained parameters"):
        DiLoCo(model, torch.optim.AdamW(other.parameters()), LocalGroup.create(1)[0], sync_every=2)
    DiLoCo(model, torch.optim.AdamW([model.bias]), LocalGroup.create(1)[0], sync_every=2)
    stacked = torch.zeros(2, 2, 4)  # two replicas' weights; each model's weight is a view of one
    viewed = nn.Linear(4, 2)
    viewed.weight = nn.Parameter(stacked[0])
    DiLoCo(viewed, torch.optim.AdamW([stacked]), LocalGroup.create(1)[0], sync_every=2)


def test_attached_to_the_optimizer_diloco_steps_itself_and_matches_explicit_steps():
    kw = dict(sync_every=3, fragments=2, overlap=1, codec="int8")
    models, opts = _replicas(1)
    explicit = _wrap(models, opts, **kw)
    models2, opts2 = _replicas(1)
    hooked = _wrap(models2, opts2, **kw)
    with hooked[0].attached():
        for step in range(1, 10):
            _inner_step(models, opts, step)
            explicit[0].step()
            _inner_step(models2, opts2, step)  # no diloco.step(): the optimizer's hook takes it
        with pytest.raises(RuntimeError, match="stepped 0 times"):
            hooked[0].step()  # a step() on top of the hook is one too many
    assert hooked[0].step_count == explicit[0].step_count == 9
    assert torch.equal(hooked[0].global_vector(), explicit[0].global_vector())
    _inner_step(models2, opts2, 10)  # detached: the hook no longer steps it
    assert hooked[0].step_count == 9
    with pytest.raises(ValueError, match="pass it to DiLoCo"):
        DiLoCo(models2[0], None, LocalGroup.create(1)[0], sync_every=3).attach()
    # a second DiLoCo on the same optimizer (a notebook cell run twice) is refused while the first
    # is attached: both would sync every round
    hooked[0].attach()
    again = DiLoCo(models2[0], opts2[0], LocalGroup.create(1)[0], **kw)
    with pytest.raises(ValueError, match="another DiLoCo is attached to this inner optimizer"):
        again.attach()
    hooked[0].detach()
    again.attach()
    _inner_step(models2, opts2, 11)
    assert (again.step_count, hooked[0].step_count) == (1, 9)


@pytest.mark.parametrize("save", ["save", "async_save"])
def test_state_saves_and_loads_with_distributed_checkpoint_with_a_round_in_flight(tmp_path, save, caplog):
    """The state is the live one (no copy): ``async_save`` copies it before it returns, so the
    steps trained while it writes do not reach the checkpoint."""
    import torch.distributed.checkpoint as dcp

    kw = dict(sync_every=4, fragments=2, overlap=1, codec="e3m0", codec_block=32, error_feedback=True)
    models, opts = _replicas(1)
    dil = _wrap(models, opts, **kw)
    _run(dil, models, opts, range(1, 5))  # fragment 0 in flight at step 4
    layout = dil[0].state_dict()
    assert [f["inflight"]["active"] for f in layout["fragments"]] == [True, False]
    inner = copy.deepcopy(opts[0].state_dict())  # (the optimizer's state is not the point here)
    saving = getattr(dcp, save)({"diloco": dil[0], "model": models[0]}, checkpoint_id=str(tmp_path / "ckpt"))
    if save == "async_save":
        _run(dil, models, opts, range(5, 10))  # (a round applied, another sent, while it writes)
        saving.result()

    models2, opts2 = _replicas(1, seed=7)
    dil2 = _wrap(models2, opts2, **kw)
    assert [f["inflight"]["active"] for f in dil2[0].state_dict()["fragments"]] == [False, False]
    dcp.load({"diloco": dil2[0], "model": models2[0]}, checkpoint_id=str(tmp_path / "ckpt"))
    opts2[0].load_state_dict(inner)
    assert dil2[0].in_flight == 1 and dil2[0].step_count == 4
    models3, opts3 = _replicas(1)
    dil3 = _wrap(models3, opts3, **kw)
    _run(dil3, models3, opts3, range(1, 5))
    _run(dil3, models3, opts3, range(5, 12))
    _run(dil2, models2, opts2, range(5, 12))
    assert torch.equal(dil2[0].global_vector(), dil3[0].global_vector())  # bit for bit
    if save == "save":  # a replica added to the job loads replica 0's folder: another's state
        models4, opts4 = _replicas(2, seed=7)
        dil4 = _wrap(models4, opts4, **kw)
        with caplog.at_level(logging.WARNING, logger="lowcomm.optim.diloco"):
            dcp.load({"diloco": dil4[1]}, checkpoint_id=str(tmp_path / "ckpt"))
        assert "replica 1 takes replica 0's DiLoCo state (step 4)" in caplog.text
        assert dil4[1].in_flight == 1 and dil4[1].step_count == 4


@pytest.mark.parametrize("version", ["2.4.1", "2.7.1", "2.8.0", "2.13.0"])
def test_distributed_checkpoint_in_a_group_without_rank_0_gets_the_jobs_rank_before_torch_2_8(
    monkeypatch, version
):
    """torch.distributed.checkpoint before 2.8 passed the group's coordinator (its rank in the
    group) to collectives that read the job's rank; dcp_group_coordinator() makes the wrapper keep
    its choice and store the job's rank of it there, and leaves torch 2.8 on alone. A stand-in
    with torch 2.4's constructor, in the process of job rank 2 that is rank 0 of the group (2, 3);
    the whole path ran under torch 2.4.1 (the four-process test's resumed replicas)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint import state_dict_loader, utils
    from torch.torch_version import TorchVersion

    from lowcomm._compat import dcp_group_coordinator

    class Wrapper:  # torch 2.4's constructor
        def __init__(self, group, use_dist, coordinator_rank):
            self.group, self.use_dist, self.coordinator_rank = group, use_dist, coordinator_rank
            self.rank = dist.get_rank(group) if use_dist else 0
            self.is_coordinator = not use_dist or self.rank == coordinator_rank

    group = object()
    monkeypatch.setattr(dist, "get_rank", lambda g=None: 0 if g is group else 2)
    monkeypatch.setattr(dist, "get_global_rank", lambda g, r: {0: 2, 1: 3}[r])
    monkeypatch.setattr(utils, "_DistWrapper", Wrapper)
    monkeypatch.setattr(Wrapper, "__init__", Wrapper.__init__)  # (restored after the test)
    keys = object()  # torch 2.4's gather of the keys (gone from torch 2.8's loader)
    monkeypatch.setattr(state_dict_loader, "_all_gather_keys", keys, raising=False)
    version = TorchVersion(version)  # (compares as a version: 2.13 is after 2.8)
    monkeypatch.setattr(torch, "__version__", version)
    made = Wrapper.__init__
    dcp_group_coordinator.cache_clear()
    try:
        dcp_group_coordinator()
    finally:
        dcp_group_coordinator.cache_clear()
    w = Wrapper(group, True, 0)
    assert w.is_coordinator and w.coordinator_rank == (2 if version < "2.8" else 0)
    assert Wrapper(None, True, 0).coordinator_rank == 0 and Wrapper(group, False, 0).coordinator_rank == 0
    assert (state_dict_loader._all_gather_keys is keys) == (version >= "2.5")
    assert (Wrapper.__init__ is made) == (version >= "2.8")


def test_fragments_by_module_name_across_block_lists_with_tied_weights():
    from torch import nn

    from lowcomm.optim import build_fragments, find_block_lists

    class EncDec(nn.Module):  # T5's shape: two lists of blocks and an embedding tied to the head
        def __init__(self):
            super().__init__()
            self.shared = nn.Embedding(16, 8)
            self.encoder = nn.Module()
            self.encoder.block = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
            self.decoder = nn.Module()
            self.decoder.block = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
            self.head = nn.Linear(8, 16, bias=False)
            self.head.weight = self.shared.weight

    m = EncDec()
    assert [n for n, _ in find_block_lists(m)] == ["encoder.block", "decoder.block"]
    frags = build_fragments(m, 3, "sequential")  # the 4 blocks of both lists over 2 + the rest
    assert frags == [
        ["encoder.block.0.weight", "encoder.block.0.bias", "encoder.block.1.weight", "encoder.block.1.bias"],
        ["decoder.block.0.weight", "decoder.block.0.bias", "decoder.block.1.weight", "decoder.block.1.bias"],
        ["shared.weight"],
    ]
    by_name = build_fragments(m, [["encoder.block.0", "encoder.block.1", "head"], ["decoder", "shared"]])
    assert by_name[0][-1] == "shared.weight"  # tied: placed once, with the first module holding it
    assert "shared.weight" not in by_name[1] and by_name[1] == frags[1]
    with pytest.raises(ValueError, match="is in fragment 0 and fragment 1"):
        build_fragments(m, [["encoder", "decoder", "shared"], ["encoder.block.0"]])


def test_uneven_fragments_are_named_in_a_warning_and_rounds_are_logged(caplog, monkeypatch):
    import lowcomm.optim.fragments as fragments_module

    monkeypatch.setattr(fragments_module, "_WARNED", set())  # earlier tests may have built this layout
    models, opts = _replicas(2)
    with caplog.at_level("INFO", logger="lowcomm"):
        # every block in one fragment, the embeddings and final norm in the other
        dil = _wrap(models, opts, sync_every=2, fragments=[["blocks"], ["wte", "wpe", "ln_f"]])
        _run(dil, models, opts, range(1, 3))
    text = caplog.text
    warning = (
        "fragments differ in size by more than 2x: fragment 0 holds 9840 parameters, fragment 1 holds 672"
    )
    assert text.count(warning) == 1  # once for both replicas
    assert "round of fragment 0: sent at step 2, applied at step 2" in text


class _NormNet(nn.Module):
    """A ResNet's shape: blocks with BatchNorm, a parameterless norm, a buffer of the model's own."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4, affine=False))
            for _ in range(2)
        )
        self.norm = nn.BatchNorm1d(4, affine=False)
        self.head = nn.Linear(4, 1)
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("table", torch.randn(64))  # a constant: must stay bit for bit

    def forward(self, x):
        for b in self.blocks:
            x = torch.relu(b(x))
        return self.head(self.norm(x)).mean() * self.scale

    def step(self, opt, step, rank):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x = torch.randn(8, 4, generator=g) * (1 + rank)  # the replicas' statistics differ
        self.scale.mul_(1.0 + 0.01 * rank)  # a buffer the model updates itself
        self(x).pow(2).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _norm_replicas(M, seed=0, **kw):
    torch.manual_seed(seed)
    base = _NormNet()
    models = [copy.deepcopy(base) for _ in range(M)]
    models[-1].norm.running_var.fill_(3.0)  # started apart: replica 0's buffers are copied, as DDP does
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False) for m in models]
    return models, opts, _wrap(models, opts, **kw)


def _buffers(model, names):
    return torch.cat([model.get_buffer(n).reshape(-1).float() for n in names])


def test_running_statistics_are_averaged_with_their_fragment_s_round():
    """Each fragment's round averages the buffers of its modules (fp32, whatever the codec) as they
    were when it was sent, on every replica alike; the others' stay each replica's own until their
    round; a buffer of a parameterless module goes with the module around it."""
    M = 3
    models, opts, dil = _norm_replicas(M, sync_every=6, fragments=3, overlap=1, codec="e3m0")
    assert all(torch.equal(m.norm.running_var, torch.ones(4)) for m in models)
    assert [f.buffers for f in dil[0]._frags] == [
        [f"blocks.0.{i}.{s}" for i in (1, 2) for s in ("running_mean", "running_var")],
        [f"blocks.1.{i}.{s}" for i in (1, 2) for s in ("running_mean", "running_var")],
        ["scale", "table", "norm.running_mean", "norm.running_var"],  # no parameters around but the model's
    ]
    seen = {}  # step -> each replica's buffers after its inner step
    applied = [0] * 3
    for step in range(1, 19):
        for r, (m, o) in enumerate(zip(models, opts)):
            m.step(o, step, r)
        seen[step] = [[_buffers(m, f.buffers) for f in dil[0]._frags] for m in models]
        step_replicas(dil)
        rounds = {s.fragment: s for s in dil[0].drain_round_stats()}
        for d in dil[1:]:
            d.drain_round_stats()
        for p, f in enumerate(dil[0]._frags):
            now = [_buffers(m, f.buffers) for m in models]
            if p in rounds:
                applied[p] += 1
                sent = torch.stack([seen[rounds[p].send_step][r][p] for r in range(M)])
                assert all(torch.equal(now[0], b) for b in now[1:])  # alike on every replica
                assert all(torch.equal(d._frags[p].global_buffers, now[0]) for d in dil)  # kept as global
                assert torch.allclose(now[0], sent.mean(0), rtol=1e-6, atol=0)  # their mean, unquantized
                assert not torch.equal(sent[0], sent[1])  # (they were apart when sent)
                assert rounds[p].bytes_sent > dil[0].codec.encoded_nbytes(f.hi - f.lo)  # counted
            elif step > 1:
                assert not torch.equal(now[0], now[1])  # the others' drift until their own round
    assert applied == [2, 2, 2], applied  # sent at steps 6, 8, 10, 12, 14, 16 (18: due at 19)
    assert all(torch.equal(m.table, models[0].table) for m in models)
    assert torch.equal(models[0].table, _norm_replicas(1)[0][0].table)  # unchanged by its rounds
    names = [n for f in dil[0]._frags for n in f.buffers]
    local = _buffers(models[1], names)
    with dil[1].global_parameters() as m:  # evaluation sees the global buffers, as every replica does
        assert torch.equal(_buffers(m, names), torch.cat([f.global_buffers for f in dil[0]._frags]))
    assert torch.equal(_buffers(models[1], names), local)  # and the local ones come back


def test_running_statistics_in_flight_resume_bit_for_bit_and_can_be_left_apart(caplog):
    kw = dict(sync_every=4, fragments=3, overlap=1)
    models, opts, dil = _norm_replicas(2, **kw)

    def run(models, opts, dil, steps):
        for step in steps:
            for r, (m, o) in enumerate(zip(models, opts)):
                m.step(o, step, r)
            step_replicas(dil)

    run(models, opts, dil, range(1, 5))
    assert any(
        f["inflight"]["active"] and f["inflight"]["buffers"].numel() for f in dil[0].state_dict()["fragments"]
    )
    saved = [
        {
            "model": copy.deepcopy(m.state_dict()),
            "opt": copy.deepcopy(o.state_dict()),
            "diloco": copy.deepcopy(d.state_dict()),  # (the live state, as a module's)
        }
        for m, o, d in zip(models, opts, dil)
    ]
    run(models, opts, dil, range(5, 14))
    models2, opts2, dil2 = _norm_replicas(2, seed=5, **kw)
    for m, o, d, s in zip(models2, opts2, dil2, saved):
        m.load_state_dict(s["model"])
        o.load_state_dict(s["opt"])
        d.load_state_dict(s["diloco"])
    run(models2, opts2, dil2, range(5, 14))
    for a, b in zip(models, models2):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    models[0].table = torch.zeros(65)  # a buffer that grew: named, not a shape error
    with pytest.raises(RuntimeError, match=r"'table': \(65,\).* hold 74 values, 73 when DiLoCo was built"):
        run(models, opts, dil, range(14, 20))

    with caplog.at_level("WARNING", logger="lowcomm.optim.diloco"):  # sync_buffers=False: said once
        models, opts, dil = _norm_replicas(2, sync_buffers=False, **kw)
    warned = [r.getMessage() for r in caplog.records if "buffers" in r.getMessage()]
    assert len(warned) == 1 and "(scale, table, blocks.0.1.running_mean and 9 more)" in warned[0], warned
    run(models, opts, dil, range(1, 13))
    assert not torch.equal(
        models[0].blocks[0][1].running_mean, models[1].blocks[0][1].running_mean
    )  # drifted
    caplog.clear()
    with caplog.at_level("WARNING", logger="lowcomm.optim.diloco"):  # nothing to say of a model without any
        gpt = GPT(GPTConfig(vocab_size=32, seq_len=8, n_layer=2, n_head=2, n_embd=16))
        DiLoCo(gpt, None, LocalGroup.create(1)[0], sync_every=5, sync_buffers=False)
    assert "buffers" not in caplog.text
