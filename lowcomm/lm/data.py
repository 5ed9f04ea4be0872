"""Byte-level corpora and deterministic batch samplers.

The default corpus is the Python standard library's own source (``*.py`` outside test folders),
which every machine that runs lowcomm already has: read at first use in sorted path order, capped
in size, and cached as bytes. It is deterministic for a given Python version. The train/validation
split is fixed per file (a file goes to validation when the CRC32 of its relative path is 0 mod 20).

Other corpora: any directory of text files (same split rule; files holding NUL bytes are skipped;
all of them read, and refused by name when they would not fit the host's memory), one text file
(bytes; the last 5% is validation), or a pre-tokenized ``.bin`` file of little-endian uint16
tokens (the last 5% is validation). A file is mapped into memory rather than read, so it may be
larger than the host's memory; it is passed over once, a chunk at a time, for its digest.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._checks import host_available_bytes, human_bytes

__all__ = ["Corpus", "BatchSampler", "load_corpus", "eval_batches", "cache_dir"]

log = logging.getLogger(__name__)

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "dist-packages"}
DEFAULT_MAX_BYTES = 8 << 20


def cache_dir() -> Path:
    """``$LOWCOMM_CACHE`` or ``~/.cache/lowcomm``."""
    return Path(os.environ.get("LOWCOMM_CACHE", Path.home() / ".cache" / "lowcomm"))


@dataclass(frozen=True)
class Corpus:
    """Token streams of one corpus.

    Attributes:
        name: where it came from.
        train, val: 1-D numpy arrays of token ids (uint8 for bytes, uint16 for .bin files).
        vocab_size: number of token ids the model needs.
        sha256: digest of train + val, recorded in run configs.
    """

    name: str
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    sha256: str

    def check_fits(self, seq_len: int) -> None:
        """Refuse (ValueError naming the corpus and both splits' sizes) a corpus whose training or
        validation split is too short for one window of ``seq_len`` tokens and its target."""
        need = seq_len + 2
        if self.train.size < need or self.val.size < need:
            raise ValueError(
                f"corpus {self.name!r} is too small for seq_len={seq_len}: its training split holds "
                f"{self.train.size} tokens and its validation split {self.val.size}, and each needs at "
                f"least seq_len + 2 = {need}: give a larger corpus or a smaller seq_len"
            )


def _is_val(rel: str) -> bool:
    return zlib.crc32(rel.encode()) % 20 == 0


def _split_files(files: list[tuple[str, bytes]]) -> tuple[np.ndarray, np.ndarray]:
    train = b"".join(b for rel, b in files if not _is_val(rel))
    val = b"".join(b for rel, b in files if _is_val(rel))
    return np.frombuffer(train, dtype=np.uint8), np.frombuffer(val, dtype=np.uint8)


def _read_text_tree(
    root: Path, pattern: str, skip: set[str], max_bytes: int | None
) -> list[tuple[str, bytes]]:
    out, total = [], 0
    paths = sorted(
        p for p in root.rglob(pattern) if p.is_file() and not (skip & set(p.relative_to(root).parts))
    )
    if max_bytes is None:  # all of it: its files and their two splits joined are held at once
        size, free = sum(p.stat().st_size for p in paths), host_available_bytes()
        if free is not None and 2 * size > free:
            raise ValueError(
                f"corpus directory {str(root)!r} holds {human_bytes(size)} of files, and reading them "
                f"takes twice that, more than the {human_bytes(free)} of host memory available: "
                "concatenate them into one text file or tokenize them into a .bin file (either is "
                "mapped, not read, and may be of any size)"
            )
    for p in paths:
        try:
            b = p.read_bytes()
        except OSError:
            continue
        if b"\0" in b or not b:
            continue
        out.append((p.relative_to(root).as_posix(), b))
        total += len(b)
        if max_bytes is not None and total >= max_bytes:
            break
    return out


def _stdlib_corpus(max_bytes: int) -> Corpus:
    import sys

    tag = f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}-{max_bytes}"
    cdir = cache_dir()
    train_p, val_p = cdir / f"{tag}.train.bin", cdir / f"{tag}.val.bin"
    if train_p.exists() and val_p.exists():
        train = np.fromfile(train_p, dtype=np.uint8)
        val = np.fromfile(val_p, dtype=np.uint8)
    else:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = _read_text_tree(root, "*.py", _SKIP_DIRS, max_bytes)
        if not files:
            raise FileNotFoundError(f"no Python sources found under the standard library at {root}")
        train, val = _split_files(files)
        try:  # a cache only: a home or $LOWCOMM_CACHE that cannot be written costs a rebuild per run
            cdir.mkdir(parents=True, exist_ok=True)
            for path, arr in ((train_p, train), (val_p, val)):
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                arr.tofile(tmp)
                os.replace(tmp, path)
        except OSError as e:
            log.warning(
                "the corpus cache %s cannot be written (%s): the standard library corpus is built again "
                "by every run; set LOWCOMM_CACHE to a writable folder to keep it",
                cdir,
                e,
            )
    return Corpus(f"stdlib:{tag}", train, val, 256, _digest(train, val))


#: bytes a pass over a corpus file reads at a time
_CHUNK_BYTES = 32 << 20


def _digest(train: np.ndarray, val: np.ndarray) -> str:
    """SHA-256 of the training then the validation tokens' bytes (of the arrays' memory: no copy)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(train).data)
    h.update(np.ascontiguousarray(val).data)
    return h.hexdigest()


def load_corpus(spec: str | os.PathLike | None = None, max_bytes: int | None = None) -> Corpus:
    """Load a corpus.

    Args:
        spec: None or "stdlib" for the default; a directory of text files; one text file; or a
            ``.bin`` file of uint16 tokens.
        max_bytes: cap on bytes taken from a text corpus (None: all of it; the standard
            library's is capped at ``DEFAULT_MAX_BYTES`` unless given).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the corpus is too small, empty or malformed.
    """
    if spec is None or str(spec) == "stdlib":
        corpus = _stdlib_corpus(max_bytes or DEFAULT_MAX_BYTES)
    else:
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(
                f"corpus path {str(spec)!r} does not exist; pass 'stdlib', a directory of text files, a "
                "text file or a .bin file of uint16 tokens"
            )
        if path.is_dir():
            files = _read_text_tree(path, "*", {"__pycache__", ".git"}, max_bytes)
            if not files:
                raise ValueError(f"corpus directory {str(path)!r} holds no readable text files")
            train, val = _split_files(files)
            if val.size == 0:  # too few files for the per-file rule: hold out the tail instead
                corpus = _tail_held_out(f"dir:{path}", train, 256)
            else:
                corpus = Corpus(f"dir:{path}", train, val, 256, _digest(train, val))
        elif path.suffix != ".bin":  # one text file, as bytes (a nanoGPT-style input.txt)
            size = path.stat().st_size if max_bytes is None else min(path.stat().st_size, max_bytes)
            if size == 0:
                raise ValueError(f"corpus file {str(path)!r} is empty")
            digest, lowest, _ = _scan_file(path, "u1", size)
            if lowest == 0:
                raise ValueError(
                    f"corpus file {str(path)!r} holds NUL bytes, so it is not text; a file of uint16 tokens "
                    "must be named *.bin"
                )
            corpus = _tail_held_out(f"file:{path}", _map_file(path, "u1", size), 256, digest)
        else:
            size = path.stat().st_size
            if size % 2:
                raise ValueError(
                    f"token file {str(path)!r} has an odd size; expected little-endian uint16 tokens"
                )
            if size == 0:
                raise ValueError(f"token file {str(path)!r} is empty")
            digest, _, top = _scan_file(path, "<u2", size)
            vocab = max(256, -(-(top + 1) // 64) * 64)
            corpus = _tail_held_out(f"bin:{path}", _map_file(path, "<u2", size), vocab, digest)
    return corpus


def _tail_held_out(name: str, toks: np.ndarray, vocab_size: int, digest: str | None = None) -> Corpus:
    """One token stream as a corpus whose last 5% is the validation split (``digest``: its
    :func:`_digest`, when already known)."""
    cut = int(toks.size * 0.95)
    return Corpus(name, toks[:cut], toks[cut:], vocab_size, digest or _digest(toks[:cut], toks[cut:]))


def _map_file(path: Path, dtype: str, size: int) -> np.ndarray:
    """The first ``size`` bytes of a corpus file as tokens, mapped, not read: the file may be
    larger than the host's memory, and only the pages of the windows drawn are read. The windows
    are drawn at random, so the kernel is told not to read ahead of each (read-ahead read ~8x
    the pages a window needs, and held them). A file cut short while a run maps it (writing it
    anew with ``open(path, "wb")`` does so first) ends the process with SIGBUS at the next window
    drawn from the part that went, and one written over in place changes the data under the run:
    a corpus is replaced by writing a new file and renaming it over the old, as lowcomm's own
    files are."""
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):  # (Linux and macOS)
        mapped.madvise(mmap.MADV_RANDOM)
    # (read-only; the array keeps the map open)
    return np.frombuffer(mapped, dtype=dtype, count=size // np.dtype(dtype).itemsize)


def _scan_file(path: Path, dtype: str, size: int) -> tuple[str, int, int]:
    """One pass over the first ``size`` bytes of a corpus file, a chunk at a time: their digest
    (SHA-256: :func:`_digest` of the two splits) and the smallest and largest token (read, not
    mapped: the pages passed over are the page cache's, not the process's)."""
    h, lo, hi = hashlib.sha256(), None, None
    buf = bytearray(_CHUNK_BYTES)  # (even: a uint16 token is never split between two reads)
    with open(path, "rb") as f:
        while size > 0 and (n := f.readinto(buf)):
            chunk = memoryview(buf)[: min(n, size)]
            size -= len(chunk)
            h.update(chunk)
            toks = np.frombuffer(chunk, dtype=dtype)
            lo = int(toks.min()) if lo is None else min(lo, int(toks.min()))
            hi = int(toks.max()) if hi is None else max(hi, int(toks.max()))
    return h.hexdigest(), lo, hi


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    w = torch.from_numpy(tokens[idx].astype(np.int64))  # (B, T+1)
    return w[:, :-1], w[:, 1:]


class BatchSampler:
    """Random windows of one token stream for one replica, deterministic for (seed, rank).

    Its position is its generator state, saved and restored with ``state_dict``.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, rank: int = 0):
        if tokens.size < seq_len + 2:
            raise ValueError(
                f"token stream of {tokens.size} tokens is shorter than seq_len + 2 = {seq_len + 2}"
            )
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(rank))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One (inputs, targets) pair, int64 of shape (batch_size, seq_len)."""
        return _windows(self.tokens, self._starts().numpy(), self.seq_len)

    def skip(self, batches: int) -> None:
        """Pass over the next ``batches`` batches (their positions drawn, no tokens read)."""
        for _ in range(batches):
            self._starts()

    def _starts(self) -> torch.Tensor:
        """The next batch's window starts: the one draw from the generator that :meth:`next` and
        :meth:`skip` share, so that a skipped batch leaves the generator where a read one does."""
        return torch.randint(0, self.tokens.size - self.seq_len - 1, (self.batch_size,), generator=self.gen)

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])


def eval_batches(
    tokens: np.ndarray, num_batches: int, batch_size: int, seq_len: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of evenly spaced validation windows (the same for every run on the corpus)."""
    n = num_batches * batch_size
    hi = tokens.size - seq_len - 1
    if hi < 1:
        raise ValueError(f"validation stream of {tokens.size} tokens is shorter than seq_len + 2")
    starts = np.linspace(0, hi - 1, n).astype(np.int64)
    return [
        _windows(tokens, starts[i * batch_size : (i + 1) * batch_size], seq_len) for i in range(num_batches)
    ]
