"""Run records: one directory per run, written so that a crash never leaves a torn file.

    run_dir/
      config.json     the full configuration (+ corpus digest, versions)
      events.jsonl    one JSON object per line: {"kind": "step" | "round" | "eval" | ..., "t": ...}
      eval.jsonl      evaluations of the global parameters: {"step", "tokens", "loss", ...}
      summary.json    written at the end (see SUMMARY_KEYS)

JSON files are written to a temporary file and renamed into place; JSONL lines are appended with
one ``write`` each and flushed, so a reader sees whole lines only. A run directory the recorder
creates is its owner's only (0700) and so is every file in it (0600): events name the job's
members, addresses and transfers.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from ..._checks import human_bytes
from ..files import check_folder, private_open, read_jsonl, timeline
from .metrics import scalars_of

__all__ = [
    "check_run_dir",
    "NullRecorder",
    "RunRecorder",
    "SUMMARY_KEYS",
    "atomic_write_json",
    "config_changes",
    "human_bytes",
    "read_jsonl",
    "timeline",
    "write_summary",
    "RECORD_FILES",
]

#: the files a run directory holds (a folder with any of them holds a run)
RECORD_FILES = ("config.json", "events.jsonl", "eval.jsonl", "summary.json")
#: settings of a continued run's process, not of what it trains (--resume itself, --overwrite)
_NOT_A_CHANGE = ("resume", "overwrite")

SUMMARY_KEYS = (
    "mode",
    "replicas",
    "sync_every",
    "fragments",
    "codec",
    "params",
    "params_non_embedding",
    "tokens",
    "steps",
    "final_eval_loss",
    "bytes_sent_per_replica",
    "wall_seconds",
    "seed",
    "lowcomm_version",
)


def check_run_dir(run_dir: str | Path, *, overwrite: bool = False, continuing: bool = False) -> None:
    """Refuse, before anything is built or written, a run directory this run may not write in: a
    file where the folder (or a folder above it) should be, a folder it cannot write, or a folder
    that already holds something, unless the run continues it (a resumed or restarted worker) or
    ``overwrite`` says to replace its records.

    Raises:
        ValueError: naming the directory and what to do.
    """
    check_folder("run_dir", run_dir)
    p = Path(run_dir)
    held = sorted(x.name for x in p.iterdir()) if p.is_dir() else []
    if held and not (overwrite or continuing):
        shown = ", ".join(held[:5]) + (" ..." if len(held) > 5 else "")
        raise ValueError(
            f"run_dir={str(run_dir)!r} already holds files ({shown}); nothing was changed: give a new "
            "--run-dir, --overwrite to replace its run (records and checkpoints), or --resume to continue it"
        )
    # --overwrite replaces a run's records: a file of the same name that is no run's (a project's
    # config.json, with --run-dir .) was written over
    foreign = [n for n in RECORD_FILES if n in held and not _a_record(p / n)]
    if foreign:
        raise ValueError(
            f"run_dir={str(run_dir)!r} holds {', '.join(foreign)}, which no lowcomm run wrote; nothing was "
            "changed: give the run a folder of its own"
        )


def _a_record(path: Path) -> bool:
    """Whether ``path`` (one of RECORD_FILES) reads as a run's: its JSON (or its first line's) has
    the keys a run writes; an empty file has nothing to lose."""
    try:
        with open(path, "rb") as f:
            first = f.read() if path.suffix == ".json" else f.readline()
        if not first.strip():
            return True
        obj = json.loads(first)
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and all(k in obj for k in _RECORD_KEYS[path.name])


#: what each of RECORD_FILES holds, in its JSON or its first line, when a run wrote it
_RECORD_KEYS = {
    "config.json": ("lowcomm_version",),
    "summary.json": ("lowcomm_version",),
    "events.jsonl": ("kind",),
    "eval.jsonl": ("step", "loss"),
}


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with private_open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def config_changes(run_dir: str | Path, config: dict[str, Any], ignore: tuple[str, ...] = ()) -> dict | None:
    """The settings of ``config`` that differ from those ``run_dir/config.json`` recorded: key ->
    [recorded, now], as JSON (``config`` written as config.json is), keys the file lacks (an older
    lowcomm's) and ``ignore`` aside. None when the file cannot be read as a configuration."""
    try:
        was = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(was, dict):
        return None
    now = json.loads(json.dumps(config, default=_default))
    return {k: [was[k], v] for k, v in now.items() if k in was and was[k] != v and k not in ignore}


def _default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_summary(run_dir: str | Path, summary: dict[str, Any]) -> None:
    """Check the required keys and write ``summary.json`` atomically."""
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if missing:
        raise ValueError(f"summary lacks required keys {missing}")
    atomic_write_json(Path(run_dir) / "summary.json", summary)


class NullRecorder:
    """The recorder of processes that do not write records (every rank but 0 of a job)."""

    @property
    def changed(self) -> dict[str, list]:
        return {}  # (rank 0's recorder says what a continued run changed)

    def event(self, kind: str, **fields: Any) -> None:
        pass

    def eval(self, **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def begin(self) -> None:
        pass


class RunRecorder:
    """Writes one run's records. Use as a context manager or call :meth:`close`."""

    def __init__(
        self, run_dir: str | Path, config: dict[str, Any], append: bool = False, sink=None, first_replica=0
    ):
        """``append`` continues the records of an earlier process of the same run (a resumed or
        restarted worker: its events and evaluations are kept, and so is its config.json);
        otherwise earlier records in the folder are replaced (the trainer only lets that happen
        with ``overwrite``), once :meth:`begin` says the new run is under way: until then its
        lines wait in memory, and a run refused before (by the coordinator, say) leaves the old
        records as they were. ``sink`` (:mod:`.metrics`) also receives the numbers as scalars
        (held with the lines); rounds of ``first_replica`` only."""
        self.dir = Path(run_dir)
        if not self.dir.exists():
            self.dir.mkdir(parents=True, mode=0o700)
        self.t0 = time.time()
        self._lock = threading.Lock()
        self._append, self._config = append, config
        self._files: dict[str, Any] = {}  # "events.jsonl", "eval.jsonl": open while recording
        self._held: list[tuple[str, str]] | None = None  # replacing: (file, line) until begin()
        self._held_scalars: list[tuple[int, dict[str, float]]] = []  # the sink's, likewise
        self._closed = False
        # continuing, the settings that differ from the kept config.json (more steps, another lr):
        # the records say so rather than have config.json speak for steps it did not govern
        self.changed = (config_changes(self.dir, config, _NOT_A_CHANGE) or {}) if append else {}
        if not append and any((self.dir / name).exists() for name in RECORD_FILES):
            self._held = []
        else:
            self._open()
        self.sink, self.first_replica = sink, first_replica

    def _open(self) -> None:
        """Write config.json (unless continuing a run that has one) and open the JSONL files;
        replacing, the old run's records go first."""
        if not self._append or not (self.dir / "config.json").exists():
            atomic_write_json(self.dir / "config.json", self._config)
        for name in ("events.jsonl", "eval.jsonl", "summary.json") if not self._append else ():
            (self.dir / name).unlink(missing_ok=True)
        self._files = {name: private_open(self.dir / name, "a") for name in ("events.jsonl", "eval.jsonl")}

    def begin(self) -> None:
        """The run is under way (an elastic worker's coordinator has taken it): what it replaces
        or continues no longer holds. Continuing, the summary of the run so far goes; replacing,
        the old run's records are replaced and the lines held since the start are written."""
        with self._lock:
            if self._held is None:
                if self._append:
                    (self.dir / "summary.json").unlink(missing_ok=True)
                return
            held, self._held = self._held, None
            self._open()
            for name, line in held:
                self._files[name].write(line)
            scalars, self._held_scalars = self._held_scalars, []
            for sent in scalars:
                self.sink.scalars(*sent)

    def _write(self, name: str, obj: dict) -> None:
        """One line of ``name`` (held until :meth:`begin` when replacing); under the lock."""
        line = json.dumps(obj, default=_default) + "\n"
        if self._held is not None:
            self._held.append((name, line))
        else:
            self._files[name].write(line)

    def event(self, kind: str, **fields: Any) -> None:
        """Append one event with its kind, seconds since this recorder started and wall-clock time
        (safe from any thread)."""
        now = time.time()
        line = {"kind": kind, "t": round(now - self.t0, 6), "wall": now, **fields}
        with self._lock:
            if not self._closed:
                self._write("events.jsonl", line)
                if self.sink is not None:
                    sent = scalars_of(kind, fields, self.first_replica)
                    if sent is not None and self._held is not None:
                        self._held_scalars.append(sent)
                    elif sent is not None:
                        self.sink.scalars(*sent)

    def eval(self, **fields: Any) -> None:
        """Append one evaluation (also recorded as an event)."""
        with self._lock:
            if not self._closed:
                self._write("eval.jsonl", fields)
        self.event("eval", **fields)

    def summary(self, summary: dict[str, Any]) -> None:
        write_summary(self.dir, summary)

    def close(self) -> None:
        """Close the files; a run that never began (refused) writes nothing, and the records it
        would have replaced stay as they were."""
        with self._lock:
            self._closed, self._held, self._held_scalars = True, None, []
            for f in self._files.values():
                f.close()
            self._files = {}
            if self.sink is not None:
                self.sink.close()
                self.sink = None

    def __enter__(self) -> RunRecorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
