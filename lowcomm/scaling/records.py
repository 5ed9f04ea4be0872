"""Run records as the scaling tools see them: one :class:`Record` per ``summary.json``.

Records come from lowcomm's own runs (sweeps, ``lowcomm train``, multi-node jobs); anything that
wrote a ``summary.json`` with the required keys works. Unusable records (missing fields, a
non-finite loss, unreadable JSON) are reported by path and reason and left out, never guessed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .._checks import is_int, is_number

__all__ = ["Record", "load_records", "REQUIRED"]

log = logging.getLogger(__name__)

REQUIRED = ("mode", "replicas", "params_non_embedding", "final_eval_loss", "tokens")
#: fields a record may lack (null or absent: the default), each with its rule
_OPTIONAL = (
    ("sync_every", lambda v: is_int(v, 1), "an int >= 1"),
    ("fragments", lambda v: is_int(v, 1), "an int >= 1"),
    ("overlap", lambda v: is_int(v, 0), "an int >= 0"),
    ("codec", lambda v: isinstance(v, str) and v.strip() == v != "", "a codec's name"),
    ("lr", lambda v: is_number(v) and v > 0, "a finite number > 0"),
    ("outer_lr", lambda v: is_number(v) and v > 0, "a finite number > 0"),
    ("batch_size", lambda v: is_int(v, 1), "an int >= 1"),
    ("corpus", lambda v: isinstance(v, str) and v != "", "a corpus's name"),
    ("seq_len", lambda v: is_int(v, 1), "an int >= 1"),
)


@dataclass(frozen=True)
class Record:
    """One finished run.

    Attributes:
        path: folder of the run.
        algorithm: "dp" or "diloco".
        N: non-embedding parameters (the model size the fits use).
        M: replicas (1 for a DP baseline of one replica).
        loss: final evaluation loss of the global parameters.
        tokens: training tokens over all replicas.
        sync_every, fragments, overlap, codec: DiLoCo settings (1, 1, 0, "fp32" for DP).
        lr, outer_lr, batch_size: hyperparameters (batch per replica).
        corpus, seq_len: what the loss is measured on (None where a record does not say).
        bytes_per_replica: wire bytes per replica.
        flops: 6·N·D.
    """

    path: str
    algorithm: str
    N: int
    M: int
    loss: float
    tokens: int
    sync_every: int = 1
    fragments: int = 1
    overlap: int = 0
    codec: str = "fp32"
    lr: float | None = None
    outer_lr: float | None = None
    batch_size: int | None = None
    corpus: str | None = None
    seq_len: int | None = None
    bytes_per_replica: float | None = None
    flops: float | None = None

    @property
    def method(self) -> str:
        """The method of the run: dp; diloco, the scaling-law study's DiLoCo (one fragment, no
        overlap, fp32 rounds); or a variant named by what differs, as the trainer names its
        settings: "streaming P=4 tau=1 e3m0", "diloco tau=1", "diloco e3m0". A variant is a
        method of its own, never the best run of another's cell."""
        if self.algorithm == "dp":
            return "dp"
        name = "diloco" if self.fragments <= 1 else f"streaming P={self.fragments}"
        name += f" tau={self.overlap}" if self.overlap else ""
        return name if self.codec == "fp32" else f"{name} {self.codec}"

    @property
    def key(self) -> str:
        """The curve this record belongs to: "dp", "diloco M=4", "streaming P=4 tau=1 e3m0 M=4"."""
        return "dp" if self.algorithm == "dp" else f"{self.method} M={self.M}"


def _given(summary: dict, key: str, default):
    """``summary[key]``, or ``default`` where it is absent or null."""
    value = summary.get(key)
    return default if value is None else value


def _find_summaries(paths: list[str | Path]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_file() and p.name == "summary.json":
            out.append(p)
        elif p.is_dir():
            out.extend(sorted(p.rglob("summary.json")))
        else:
            log.warning("skipping %s: not a run directory or summary.json", p)
    return out


def load_records(paths: list[str | Path]) -> tuple[list[Record], list[tuple[str, str]]]:
    """Read every ``summary.json`` under ``paths``.

    Returns:
        ``(records, rejected)``: usable records, and (path, reason) for each left out.
    """
    records, rejected = [], []
    for f in _find_summaries(paths):
        try:
            s = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            rejected.append((str(f), f"unreadable JSON: {e}"))
            continue
        if not isinstance(s, dict):
            rejected.append((str(f), f"a JSON {type(s).__name__}, not an object of fields"))
            continue
        missing = [k for k in REQUIRED if k not in s]
        if missing:
            rejected.append((str(f), f"missing fields {missing}"))
            continue
        loss = s["final_eval_loss"]
        if not is_number(loss) or loss <= 0:
            rejected.append((str(f), f"final_eval_loss is {loss!r}, not a finite positive number"))
            continue
        bad = [  # a count the fits divide by or take the log of (params=-5 made a curve of its own)
            f"{k} is {s[k]!r}, not an int >= 1"
            for k in ("params_non_embedding", "replicas", "tokens")
            if isinstance(s[k], bool) or not isinstance(s[k], int) or s[k] < 1
        ]
        bad += [  # the settings a curve is named by and the hyperparameters fitted (when given)
            f"{k} is {s[k]!r}, not {what}"
            for k, ok, what in _OPTIONAL
            if s.get(k) is not None and not ok(s[k])
        ]
        if s["mode"] not in ("dp", "diloco"):
            bad.append(f"mode is {s['mode']!r}, not 'dp' or 'diloco'")
        if bad:
            rejected.append((str(f), "; ".join(bad)))
            continue
        records.append(
            Record(
                path=str(f.parent),
                algorithm=str(s["mode"]),
                N=int(s["params_non_embedding"]),
                M=int(s["replicas"]),
                loss=float(loss),
                tokens=int(s["tokens"]),
                sync_every=_given(s, "sync_every", 1),
                fragments=_given(s, "fragments", 1),
                overlap=_given(s, "overlap", 0),
                codec=_given(s, "codec", "fp32"),
                lr=s.get("lr"),
                outer_lr=s.get("outer_lr"),
                batch_size=s.get("batch_size"),
                corpus=s.get("corpus"),
                seq_len=s.get("seq_len"),
                bytes_per_replica=s.get("bytes_sent_per_replica"),
                flops=s.get("flops"),
            )
        )
    for path, why in rejected:  # (returned: the CLI and the report show them)
        log.info("left out %s: %s", path, why)
    return records, rejected
