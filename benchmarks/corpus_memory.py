"""Host memory of loading a large ``.bin`` token file: read whole (lowcomm before 2026-12-07) vs mapped.

    python benchmarks/corpus_memory.py --gib 4 --json benchmarks/results/corpus_memory.json

Writes a file of random uint16 tokens (``--gib`` GiB) and, in a fresh process for each way,
loads it and draws 200 batches of 16 x 1024 tokens: ``read`` is what ``load_corpus`` did before
(``np.fromfile``, then the digest over ``tobytes()`` copies of both splits), ``mapped`` is
``load_corpus`` now (one pass of 32 MiB reads for the digest and the largest token, then
a read-only map told not to read ahead). The file is dropped from the page cache before each
way loads it and again before it samples, as a file larger than the page cache would be (the
mapped way's scan reads it into the cache, where the map's faults would find it all).
Reported per way: seconds to load, the process's anonymous memory after loading, its peak
resident memory (``ru_maxrss``), the mapped file's pages the 200 batches left resident (what
read-ahead would multiply), the time per batch, and the corpus digest, which both ways must
agree on. The goal: loading takes no anonymous memory in proportion to the file, so a
file larger than the host's memory can be trained on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import stamp, write_result

_CHILD = r"""
import hashlib, json, os, resource, sys, time
import numpy as np
from lowcomm.lm import BatchSampler, load_corpus

def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None

way, path = sys.argv[1], sys.argv[2]
def uncache():  # out of the page cache, as a file larger than it would be: read from the disk
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)

uncache()
t0 = time.perf_counter()
if way == "read":  # load_corpus before the change, restated
    toks = np.fromfile(path, dtype="<u2")
    vocab = int(toks.max()) + 1
    cut = int(toks.size * 0.95)
    train, val = toks[:cut], toks[cut:]
    h = hashlib.sha256(); h.update(train.tobytes()); h.update(val.tobytes()); digest = h.hexdigest()
else:
    corpus = load_corpus(path)
    train, digest = corpus.train, corpus.sha256
load_s = time.perf_counter() - t0
anon_after_load = status_kib("RssAnon")
uncache()
file_before = status_kib("RssFile")
sampler = BatchSampler(train, 16, 1024, seed=0)
t1 = time.perf_counter()
for _ in range(200):
    sampler.next()
sample_s = time.perf_counter() - t1
print(json.dumps({
    "load_s": round(load_s, 2),
    "anon_after_load_mib": round(anon_after_load / 1024, 1),
    "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    "ms_per_batch": round(1000 * sample_s / 200, 3),
    "file_pages_held_by_sampling_mib": round((status_kib("RssFile") - file_before) / 1024, 1),
    "digest": digest,
}))
"""


def write_tokens(path: Path, gib: float) -> int:
    """A file of random uint16 tokens below 50257 (GPT-2's vocabulary), written 64 MiB at a time."""
    rng = np.random.default_rng(0)
    total = int(gib * (1 << 30)) // 2
    with open(path, "wb") as f:
        for i in range(0, total, 1 << 25):
            rng.integers(0, 50257, min(1 << 25, total - i), dtype=np.uint16).astype("<u2").tofile(f)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.0, help="size of the token file in GiB (default 2)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokens.bin"
        tokens = write_tokens(path, args.gib)
        rows = {}
        for way in ("read", "mapped"):
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, way, str(path)], capture_output=True, text=True, check=True
            ).stdout
            rows[way] = json.loads(out.strip().splitlines()[-1])
            print(f"{way}: {rows[way]}", flush=True)
    same = rows["read"]["digest"] == rows["mapped"]["digest"]
    result = {
        **stamp("corpus_memory"),
        "file_gib": args.gib,
        "tokens": tokens,
        "same_digest": same,
        "results": rows,
    }
    write_result(result, args.json)
    if not same:
        sys.exit("the two ways disagree on the corpus digest")


if __name__ == "__main__":
    main()
