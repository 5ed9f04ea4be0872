"""The reference GPT and the corpora."""

import numpy as np
import pytest
import torch

from lowcomm.lm import GPT, BatchSampler, GPTConfig, eval_batches, load_corpus


def test_param_counts_split_embeddings_from_the_rest():
    cfg = GPTConfig(vocab_size=256, seq_len=32, n_layer=2, n_head=2, n_embd=32)
    m = GPT(cfg)
    per_block = (
        2 * 2 * 32 + (3 * 32 * 32 + 3 * 32) + (32 * 32 + 32) + (4 * 32 * 32 + 4 * 32) + (4 * 32 * 32 + 32)
    )
    non_emb = 2 * per_block + 2 * 32  # blocks + final norm; the head is tied to wte
    assert m.num_params(non_embedding=True) == non_emb
    assert m.num_params() == non_emb + 256 * 32 + 32 * 32
    assert m.flops_per_token() == 6 * non_emb + 6 * 2 * 32 * 32


def test_forward_shapes_and_loss_at_init_is_near_uniform():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, n_embd=32))
    x = torch.randint(0, 64, (3, 16))
    assert m(x).shape == (3, 16, 64)
    y = torch.randint(0, 64, (3, 16))
    assert float(m(x, y).detach()) == pytest.approx(np.log(64), rel=0.05)
    with pytest.raises(ValueError, match="seq_len"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_bad_model_config_names_the_field():
    with pytest.raises(ValueError, match="n_head=3 must divide n_embd=32"):
        GPTConfig(n_head=3, n_embd=32)
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig(n_layer=0)


def test_stdlib_corpus_is_deterministic_and_split():
    a = load_corpus("stdlib", max_bytes=1 << 20)
    b = load_corpus(None, max_bytes=1 << 20)  # second load comes from the cache
    assert a.sha256 == b.sha256 and a.vocab_size == 256
    assert a.train.size > 500_000 and a.val.size > 1000
    assert a.train.dtype == np.uint8


def test_directory_corpus_and_token_file(tmp_path):
    for i in range(3):
        (tmp_path / "texts" / f"d{i}").mkdir(parents=True)
        (tmp_path / "texts" / f"d{i}" / "a.txt").write_text("hello lowcomm " * 200 * (i + 1))
    (tmp_path / "texts" / "blob.bin").write_bytes(b"\0\1\2")  # binary: skipped
    c = load_corpus(tmp_path / "texts")
    assert c.train.size + c.val.size == len("hello lowcomm ") * 200 * 6
    toks = np.arange(1000, dtype="<u2") % 300
    toks.tofile(tmp_path / "t.bin")
    t = load_corpus(tmp_path / "t.bin")
    assert t.vocab_size == 320 and t.train.size == 950 and t.val.size == 50


def test_corpus_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no/such/dir"):
        load_corpus("no/such/dir")
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match="odd size"):
        load_corpus(tmp_path / "odd.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable text"):
        load_corpus(tmp_path / "empty")


def test_sampler_is_deterministic_per_rank_and_resumable():
    toks = np.arange(10_000, dtype=np.uint8)
    s0, s0b, s1 = (
        BatchSampler(toks, 4, 16, 7, 0),
        BatchSampler(toks, 4, 16, 7, 0),
        BatchSampler(toks, 4, 16, 7, 1),
    )
    x0, y0 = s0.next()
    assert torch.equal(x0, s0b.next()[0]) and not torch.equal(x0, s1.next()[0])
    assert torch.equal(y0[:, :-1], x0[:, 1:])
    state = s0.state_dict()
    nxt = s0.next()[0]
    s0b.load_state_dict(state)
    assert torch.equal(s0b.next()[0], nxt)


def test_eval_batches_are_fixed():
    toks = np.arange(5000, dtype=np.uint8)
    a, b = eval_batches(toks, 3, 4, 16), eval_batches(toks, 3, 4, 16)
    assert len(a) == 3 and all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b))
