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
    with pytest.raises(ValueError, match="GPTConfig.n_layer must be an int >= 1, got True"):
        GPTConfig(n_layer=True)  # a bool is not a count (it made a model of one layer)


def test_stdlib_corpus_is_deterministic_and_split():
    a = load_corpus("stdlib", max_bytes=1 << 20)
    b = load_corpus(None, max_bytes=1 << 20)  # second load comes from the cache
    assert a.sha256 == b.sha256 and a.vocab_size == 256
    assert a.train.size > 500_000 and a.val.size > 1000
    assert a.train.dtype == np.uint8


def test_a_cache_folder_that_cannot_be_written_costs_a_rebuild_not_the_run(tmp_path, monkeypatch, caplog):
    """A read-only home (a container's) or a LOWCOMM_CACHE in the way stopped every run at its
    corpus with '[Errno 2] No such file or directory'; the cache is only a cache."""
    cached = load_corpus("stdlib", max_bytes=1 << 20)
    (tmp_path / "a_file").write_text("in the way")
    monkeypatch.setenv("LOWCOMM_CACHE", str(tmp_path / "a_file"))
    with caplog.at_level("WARNING", logger="lowcomm.lm.data"):
        rebuilt = load_corpus("stdlib", max_bytes=1 << 20)
    assert rebuilt.sha256 == cached.sha256 and (tmp_path / "a_file").read_text() == "in the way"
    assert "the corpus cache" in caplog.text and "set LOWCOMM_CACHE to a writable folder" in caplog.text


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


def test_a_token_file_is_mapped_not_read_and_passed_over_in_chunks(tmp_path, monkeypatch):
    """A .bin of billions of tokens (nanoGPT's train.bin) was read whole, then copied whole again
    for its digest: twice its size in host memory. It is mapped now, and its digest (the same
    as before: SHA-256 of the file's bytes) and largest token are taken a chunk at a time."""
    import hashlib
    import mmap

    import lowcomm.lm.data as data

    toks = (np.arange(10_001, dtype=np.int64) * 7919 % 5000).astype("<u2")
    toks[1234] = 7777  # the largest, inside a chunk neither first nor last
    toks.tofile(tmp_path / "t.bin")
    monkeypatch.setattr(data, "_CHUNK_BYTES", 2000)
    t = load_corpus(tmp_path / "t.bin")
    base = t.train  # a view of the map: array -> array -> memoryview -> mmap
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else base.base
    assert base is not None and t.train.dtype == np.dtype("<u2") and not t.train.flags.writeable
    assert t.sha256 == hashlib.sha256((tmp_path / "t.bin").read_bytes()).hexdigest()
    assert t.vocab_size == 7808  # 7778 rounded up to a multiple of 64
    x, y = BatchSampler(t.train, 4, 16, seed=0).next()  # the same windows as from the tokens in memory
    x0, y0 = BatchSampler(toks[:9500].copy(), 4, 16, seed=0).next()
    assert x.dtype == torch.int64 and torch.equal(x, x0) and torch.equal(y, y0)
    mapped, held = eval_batches(t.val, 2, 4, 16), eval_batches(toks[9500:].copy(), 2, 4, 16)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(mapped, held))
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.bin' is empty"):
        load_corpus(tmp_path / "empty.bin")


def test_a_users_text_corpus_is_taken_whole_not_its_first_8_mib(tmp_path, monkeypatch):
    """A text file or a directory of them was cut at 8 MiB without a word (the standard library's
    cap), so a 100 MB corpus trained on its first 8. A file is mapped and taken whole; a
    directory is read whole, or refused by name when it would not fit the host's memory."""
    import hashlib

    import lowcomm.lm.data as data

    line = b"the quick brown fox jumps over the lazy dog 0123456789\n"
    big = line * ((9 << 20) // len(line) + 1)  # past 8 MiB
    (tmp_path / "big.txt").write_bytes(big)
    c = load_corpus(tmp_path / "big.txt")
    assert c.train.size + c.val.size == len(big) and c.train.dtype == np.uint8
    assert c.sha256 == hashlib.sha256(big).hexdigest() and bytes(c.val[-len(line) :]) == line
    (tmp_path / "texts").mkdir()
    for i in range(3):
        (tmp_path / "texts" / f"part{i}.txt").write_bytes(big[: 4 << 20])
    d = load_corpus(tmp_path / "texts")
    assert d.train.size + d.val.size == 3 * (4 << 20)
    capped = load_corpus(tmp_path / "texts", max_bytes=1 << 20)  # a cap, given: the first file
    assert capped.train.size + capped.val.size == 4 << 20
    monkeypatch.setattr(data, "host_available_bytes", lambda: 16 << 20)
    with pytest.raises(
        ValueError,
        match=r"texts' holds 12.0 MB of files, and reading them takes twice that, more than the 16.0 MB "
        r"of host memory available: concatenate them into one text file or tokenize them into a .bin",
    ):
        load_corpus(tmp_path / "texts")
    assert load_corpus(tmp_path / "big.txt").sha256 == c.sha256  # a file is mapped: any size


def test_one_text_file_is_a_byte_corpus_not_uint16_tokens(tmp_path):
    """A nanoGPT-style input.txt: its bytes, the last 5% validation. It used to be read as uint16
    tokens (two characters a token, a vocabulary of ~26000) or refused for an odd size."""
    text = "To be, or not to be, that is the question:\n" * 50  # 2150 bytes, an even size
    (tmp_path / "input.txt").write_text(text)
    c = load_corpus(tmp_path / "input.txt")
    assert c.vocab_size == 256 and c.train.dtype == np.uint8
    assert bytes(c.train) + bytes(c.val) == text.encode() and c.val.size == 2150 - 2042
    (tmp_path / "odd.txt").write_text(text + "!")
    assert load_corpus(tmp_path / "odd.txt").train.size == 2043  # 95% of 2151
    assert load_corpus(tmp_path / "input.txt", max_bytes=1000).train.size == 950  # the cap holds
    (tmp_path / "tokens.u16").write_bytes(b"ab\0c")
    with pytest.raises(
        ValueError, match=r"tokens.u16' holds NUL bytes, so it is not text; .* must be named \*.bin"
    ):
        load_corpus(tmp_path / "tokens.u16")
    (tmp_path / "none.txt").write_text("")
    with pytest.raises(ValueError, match="none.txt' is empty"):
        load_corpus(tmp_path / "none.txt")


def test_a_corpus_too_small_for_the_context_is_refused_naming_both_splits(tmp_path, capsys):
    from lowcomm.runtime.cli import main

    (tmp_path / "short.txt").write_text("hello world\n" * 10)  # 120 bytes: 114 + 6
    c = load_corpus(tmp_path / "short.txt")
    c.check_fits(4)
    with pytest.raises(ValueError, match=r"its training split holds 114 tokens and its validation split 6"):
        c.check_fits(64)
    argv = ["train", "--corpus", str(tmp_path / "short.txt"), "--run-dir", str(tmp_path / "r"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is too small for seq_len=128" in err[0] and "smaller seq_len" in err[0], err
    assert not (tmp_path / "r").exists()


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
    # skip: where a sampler that drew the batches stands (a replica resumed into a job of another size)
    drawn, skipped = BatchSampler(toks, 4, 16, 7, 1), BatchSampler(toks, 4, 16, 7, 1)
    for _ in range(5):
        drawn.next()
    skipped.skip(5)
    assert torch.equal(skipped.next()[0], drawn.next()[0])


def test_eval_batches_are_fixed():
    toks = np.arange(5000, dtype=np.uint8)
    a, b = eval_batches(toks, 3, 4, 16), eval_batches(toks, 3, 4, 16)
    assert len(a) == 3 and all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b))
