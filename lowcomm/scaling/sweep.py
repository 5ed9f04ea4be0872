"""Sweeps: a grid of reference-model runs over sizes N, replicas M and DiLoCo settings, with a DP
baseline, following the protocol of the DiLoCo scaling-law study (tokens D = 20·N, a global batch
split B/M across replicas).

A sweep only produces configurations and runs them; the fits read the records afterwards. It is
resumable (a run with a ``summary.json`` is skipped) and a failed run is recorded in
``failed.json`` in its folder and does not stop the others. Rerun with more sizes, M, H or
learning rates it extends the grid; a finished run trained with other settings than the sweep
now gives it (another seq_len, corpus, token budget) is refused by name, never skipped as if it
were this sweep's. ``sweep.json`` lists every run the folder's sweeps asked for and each spec.

References:
    Charles et al., "Scaling Laws for DiLoCo" (2025), section 3 (protocol).
"""

from __future__ import annotations

import json
import logging
import math
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .._checks import is_int, is_number, refuse

if TYPE_CHECKING:  # the sweep runs the trainer; the fits and reports never import it
    from ..runtime.trainer import TrainConfig

__all__ = ["SIZE_PRESETS", "SweepSpec", "grid", "run_sweep", "resolve_size", "non_embedding_params"]

log = logging.getLogger(__name__)

# name -> (model_dim, layers, heads)
SIZE_PRESETS: dict[str, tuple[int, int, int]] = {
    "d16l2": (16, 2, 2),
    "d32l2": (32, 2, 2),
    "d48l2": (48, 2, 4),
    "d64l2": (64, 2, 4),
    "d64l4": (64, 4, 4),
    "d96l4": (96, 4, 4),
    "d128l4": (128, 4, 4),
    "d192l6": (192, 6, 6),
    "d256l8": (256, 8, 8),
}


def non_embedding_params(dim: int, layers: int) -> int:
    """Non-embedding parameters of the reference GPT (blocks and final norm; MLP ratio 4)."""
    per_block = (
        4 * dim
        + (3 * dim * dim + 3 * dim)
        + (dim * dim + dim)
        + (4 * dim * dim + 4 * dim)
        + (4 * dim * dim + dim)
    )
    return layers * per_block + 2 * dim


def resolve_size(size: str) -> tuple[str, int, int, int]:
    """A preset name, or a parameter count ("100k", "2.5M", "30000") mapped to the nearest preset
    (within 2x of it: the presets are at most 3.9x apart).

    Returns:
        ``(preset, dim, layers, heads)``.
    """
    if size in SIZE_PRESETS:
        return (size, *SIZE_PRESETS[size])
    text = size.strip().lower()
    mult = {"k": 1e3, "m": 1e6, "b": 1e9}.get(text[-1:], 1.0)
    try:
        target = float(text[:-1] if mult != 1.0 else text) * mult
    except ValueError:
        target = math.nan
    if not 0 < target < math.inf:  # (a count of 0 or less matched nothing: a ZeroDivisionError)
        raise ValueError(
            f"model size {size!r} is neither a preset {sorted(SIZE_PRESETS)} nor a count > 0 like '100k'"
        )
    counts = {k: non_embedding_params(*v[:2]) for k, v in SIZE_PRESETS.items()}
    best = min(counts, key=lambda k: abs(math.log(counts[k] / target)))
    if not counts[best] / 2 <= target <= 2 * counts[best]:  # '1e20' trained d256l8, recorded as 1e20
        raise ValueError(
            f"model size {size!r} ({target:.3g} parameters) is more than 2x from every preset: a count "
            f"stands for its nearest preset, and the presets hold {min(counts.values()):,} to "
            f"{max(counts.values()):,} non-embedding parameters"
        )
    return (best, *SIZE_PRESETS[best])


@dataclass(frozen=True, kw_only=True)
class SweepSpec:
    """What to sweep.

    Attributes:
        sizes: model sizes (presets or parameter counts).
        replicas: DiLoCo replica counts M.
        baseline: "dp" to add a data-parallel run per size (one replica, the whole global batch), or None.
        sync_every: H values.
        outer_lrs: outer learning rates.
        lrs: inner learning rates (the same for DP).
        tokens_per_param: D / N.
        global_batch: sequences per step over all replicas (B; each replica gets B / M).
        keep_per_replica_batch: give every replica ``global_batch`` sequences instead (D then grows with M).
        seq_len: context length.
        seed: run seed.
        corpus: corpus spec.
        out: folder of the sweep; one sub-folder per run.
        threads: torch threads per run (0 = torch's default).
    """

    sizes: tuple[str, ...]
    replicas: tuple[int, ...] = (1, 2, 4, 8)
    baseline: str | None = "dp"
    sync_every: tuple[int, ...] = (30,)
    outer_lrs: tuple[float, ...] = (0.7,)
    lrs: tuple[float, ...] = (2e-3,)
    tokens_per_param: float = 20.0
    global_batch: int = 32
    keep_per_replica_batch: bool = False
    seq_len: int = 64
    seed: int = 0
    corpus: str = "stdlib"
    out: str = "runs/sweep"
    threads: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.sizes:
            raise ValueError("sizes must name at least one model size")
        presets = [resolve_size(size)[0] for size in self.sizes]
        for name in ("sizes", "replicas", "sync_every", "outer_lrs", "lrs"):  # each value one run
            values = presets if name == "sizes" else list(getattr(self, name))
            twice = sorted({str(v) for v in values if values.count(v) > 1})
            if twice:
                why = "; a count stands for its nearest preset" if name == "sizes" else ""
                allowed = f"each value once ({', '.join(twice)} given twice{why})"
                raise refuse(name, list(getattr(self, name)), allowed)
        for m in self.replicas:
            if not is_int(m, 1):
                raise refuse("replicas", m, "an int >= 1")
            if not self.keep_per_replica_batch and self.global_batch % m:
                raise ValueError(f"global_batch={self.global_batch} is not divisible by replicas={m}")
        if self.baseline not in (None, "dp"):
            raise ValueError(f"baseline must be 'dp' or None, got {self.baseline!r}")
        if not (is_number(self.tokens_per_param) and self.tokens_per_param > 0):
            raise refuse("tokens_per_param", self.tokens_per_param, "a finite number > 0")
        for name in ("global_batch", "seq_len"):  # a step's tokens: the divisor of every run's steps
            v = getattr(self, name)
            if not is_int(v, 1):
                raise refuse(name, v, "an int >= 1")


def grid(spec: SweepSpec) -> list[tuple[str, TrainConfig]]:
    """Every run of the sweep as (name, config), DP baselines first within each size."""
    from ..runtime.trainer import TrainConfig

    runs = []
    for size in spec.sizes:
        preset, dim, layers, heads = resolve_size(size)
        n = non_embedding_params(dim, layers)
        tokens = spec.tokens_per_param * n
        for lr in spec.lrs:
            common = dict(
                model_dim=dim,
                layers=layers,
                heads=heads,
                seq_len=spec.seq_len,
                lr=lr,
                seed=spec.seed,
                corpus=spec.corpus,
                eval_every=0,
                eval_batches=16,
                threads=spec.threads,
                overwrite=True,  # only unfinished runs are (re)started: a failed one's folder is replaced
                **spec.extra,
            )
            if spec.baseline == "dp":
                steps = max(1, round(tokens / (spec.global_batch * spec.seq_len)))
                name = f"{preset}/dp_lr{lr:g}"
                runs.append(
                    (
                        name,
                        TrainConfig.from_flat(
                            mode="dp",
                            replicas=1,
                            batch_size=spec.global_batch,
                            steps=steps,
                            warmup=max(1, steps // 10),
                            run_dir=f"{spec.out}/{name}",
                            **common,
                        ),
                    )
                )
            for m in spec.replicas:
                per_replica = spec.global_batch if spec.keep_per_replica_batch else spec.global_batch // m
                steps = max(1, round(tokens / (per_replica * m * spec.seq_len)))
                for h in spec.sync_every:
                    for olr in spec.outer_lrs:
                        name = f"{preset}/diloco_M{m}_H{h}_olr{olr:g}_lr{lr:g}"
                        runs.append(
                            (
                                name,
                                TrainConfig.from_flat(
                                    mode="diloco",
                                    replicas=m,
                                    batch_size=per_replica,
                                    steps=steps,
                                    sync_every=min(h, steps),
                                    outer_lr=olr,
                                    warmup=max(1, steps // 10),
                                    run_dir=f"{spec.out}/{name}",
                                    **common,
                                ),
                            )
                        )
    return runs


def run_sweep(spec: SweepSpec, *, progress: bool = True) -> dict:
    """Run every unfinished run of the grid; returns counts and the failures (name, error)."""
    from ..lm.data import load_corpus
    from ..runtime.trainer import loop
    from ..runtime.trainer.build import check_memory, check_threads

    runs = grid(spec)
    # a corpus, a thread count or a run too large for this machine, which every run (or the
    # largest) would fail on, is refused before any folder is made
    corpus = load_corpus(spec.corpus)
    corpus.check_fits(spec.seq_len)
    check_threads(spec.threads)
    for _, cfg in runs:
        check_memory(cfg, corpus.vocab_size, cfg.run.replicas, cfg.run.torch_device())
    record = _sweep_record(spec, runs)  # both refuse before anything is written
    _check_finished(spec, runs, corpus.sha256)
    Path(spec.out).mkdir(parents=True, exist_ok=True)
    (Path(spec.out) / "sweep.json").write_text(json.dumps(record, indent=2, default=list) + "\n")
    done = skipped = 0
    failed: list[tuple[str, str]] = []
    t0 = time.time()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(runs), desc="sweep", unit="run", dynamic_ncols=True)
    for name, cfg in runs:
        run_dir = Path(cfg.run.run_dir)
        if (run_dir / "summary.json").exists():
            skipped += 1
        else:
            if bar is not None:
                bar.set_postfix_str(name)
            try:
                loop.train(cfg, progress=progress)  # (its bar of steps below the sweep's)
                (run_dir / "failed.json").unlink(missing_ok=True)
                done += 1
            except Exception as e:  # one bad run must not stop the sweep
                failed.append((name, f"{type(e).__name__}: {e}"))
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "failed.json").write_text(
                    json.dumps({"error": str(e), "traceback": traceback.format_exc()})
                )
                log.error("run %s failed: %s", name, e)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {
        "runs": len(runs),
        "done": done,
        "skipped": skipped,
        "failed": failed,
        "wall_seconds": time.time() - t0,
    }


#: a finished run's settings that may differ from the sweep's without changing what it trained
#: (the corpus is compared by its digest: the same data by another path is the same corpus)
_NOT_COMPARED = ("threads", "overwrite", "run_dir", "corpus")


def _check_finished(spec: SweepSpec, runs: list[tuple[str, TrainConfig]], corpus_sha256: str) -> None:
    """Refuse (ValueError naming the run and its settings) a finished run of the folder that was
    trained with other settings, or on other data, than this sweep gives it: skipped, it would
    stand in the records for a run it is not. A setting its config.json lacks (an older
    lowcomm's) is not compared."""
    from ..runtime.trainer.records import config_changes

    for name, cfg in runs:
        run_dir = Path(cfg.run.run_dir)
        if not (run_dir / "summary.json").exists():
            continue
        diff = config_changes(run_dir, {**cfg.flat(), "corpus_sha256": corpus_sha256}, _NOT_COMPARED)
        if diff is None:
            raise ValueError(
                f"out={spec.out!r}: run {name} has a summary.json but no readable config.json, so what "
                "it trained cannot be checked against this sweep; move it aside, or give another out"
            )
        if diff:
            shown = list(diff.items())[:4]
            was = ", ".join(f"{k}={a!r}" for k, (a, _) in shown)
            now = ", ".join(f"{k}={b!r}" for k, (_, b) in shown)
            raise ValueError(
                f"out={spec.out!r}: run {name} was finished with {was}, this sweep gives it {now}; "
                "a sweep folder holds one set of run settings: rerun with the earlier ones to resume "
                "or extend it, or give another out"
            )


def _sweep_record(spec: SweepSpec, runs: list[tuple[str, TrainConfig]]) -> dict:
    """sweep.json's new content: every run the folder's sweeps asked for (earlier ones first) and
    this spec, the earlier ones kept in ``earlier_specs``. A sweep.json lowcomm did not write is
    refused (ValueError), not replaced."""
    path = Path(spec.out) / "sweep.json"
    spec_now = json.loads(json.dumps(spec.__dict__, default=list))
    names = [n for n, _ in runs]
    if not path.exists():
        return {"spec": spec_now, "runs": names}
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    if not (
        isinstance(old, dict)
        and isinstance(old.get("spec"), dict)
        and isinstance(old.get("runs"), list)
        and all(isinstance(n, str) for n in old["runs"])
        and isinstance(old.get("earlier_specs", []), list)
    ):
        raise ValueError(
            f"out={spec.out!r}: {str(path)!r} is not a sweep record lowcomm wrote (a JSON object "
            "with 'spec' and 'runs'); it is left as it is: give another out"
        )
    earlier = [s for s in [*old.get("earlier_specs", []), old["spec"]] if s != spec_now]
    record = {"spec": spec_now, "runs": old["runs"] + [n for n in names if n not in old["runs"]]}
    return {**record, "earlier_specs": earlier} if earlier else record
