"""Scaling-law fits: pure functions from points to frozen results.

Forms (N = non-embedding parameters, M = replicas, L = final eval loss):

``power_law``         L = A·N^α                 log-log least squares (one curve per M, and DP)
``joint``             L = A·N^α·M^β             log-linear least squares over all DiLoCo points
``joint_irreducible`` L = A·N^α·M^β + C         Huber loss on log residuals, L-BFGS from many starts
``exp_irreducible``   L = A·N^(α+β·M) + C       same

Each fit carries bootstrap percentile intervals (points resampled with replacement) and the
held-out residual: refit without the largest N and report mean |log y − log ŷ| at that N.

References:
    Charles et al., "Scaling Laws for DiLoCo" (2025), section 5 (the forms and the held-out test).
    Hoffmann et al., "Training Compute-Optimal Large Language Models" (2022), appendix D.2
    (Huber loss on log residuals, L-BFGS, many initializations).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .._compat import require

__all__ = [
    "FORMS",
    "FitResult",
    "fit",
    "fit_power_law",
    "fit_joint",
    "fit_irreducible",
    "bootstrap_intervals",
    "heldout_residual",
    "predict",
]

FORMS = ("power_law", "joint", "joint_irreducible", "exp_irreducible")
MIN_POINTS = {"power_law": 2, "joint": 3, "joint_irreducible": 5, "exp_irreducible": 5}
HUBER_DELTA = 1e-3


@dataclass(frozen=True)
class FitResult:
    """A fitted law.

    Attributes:
        form: one of :data:`FORMS`.
        params: fitted values (A, alpha, beta, C as the form has them).
        intervals: 95% bootstrap percentile interval of each parameter (empty if not computed).
        n_points: points used.
        rmse_log: root mean square of in-sample log residuals.
        heldout_residual: mean |log y − log ŷ| at the largest N when fitted without it (None when
            too few points remain).
        label: which curve ("M=4", "dp", "all DiLoCo").
    """

    form: str
    params: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    n_points: int
    rmse_log: float
    heldout_residual: float | None
    label: str = ""

    def predict(self, N, M=None) -> np.ndarray:
        return predict(
            self.form, self.params, np.asarray(N, dtype=float), None if M is None else np.asarray(M, float)
        )

    def to_dict(self) -> dict:
        return asdict(self)


def predict(form: str, p: dict[str, float], N: np.ndarray, M: np.ndarray | None = None) -> np.ndarray:
    """Evaluate a fitted form at sizes ``N`` (and replicas ``M`` where the form has them)."""
    N = np.asarray(N, dtype=float)
    if form == "power_law":
        return p["A"] * N ** p["alpha"]
    if M is None:
        raise ValueError(f"form {form!r} needs M")
    M = np.asarray(M, dtype=float)
    if form == "joint":
        return p["A"] * N ** p["alpha"] * M ** p["beta"]
    if form == "joint_irreducible":
        return p["A"] * N ** p["alpha"] * M ** p["beta"] + p["C"]
    if form == "exp_irreducible":
        return p["A"] * N ** (p["alpha"] + p["beta"] * M) + p["C"]
    raise ValueError(f"unknown form {form!r}; allowed: {list(FORMS)}")


def _check(form: str, N: np.ndarray, L: np.ndarray, M: np.ndarray | None) -> None:
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; allowed: {list(FORMS)}")
    if len(N) < MIN_POINTS[form]:
        raise ValueError(f"the {form} fit needs at least {MIN_POINTS[form]} points, got {len(N)}")
    if len(set(N.tolist())) < 2:
        raise ValueError(f"the {form} fit needs at least 2 model sizes, got only N={sorted(set(N.tolist()))}")
    if form != "power_law" and (M is None or len(set(M.tolist())) < 2):
        raise ValueError(f"the {form} fit needs at least 2 replica counts")
    if not (np.all(np.isfinite(L)) and np.all(L > 0) and np.all(N > 0)):
        raise ValueError("losses and sizes must be finite and positive")


def fit_power_law(N, L) -> dict[str, float]:
    """L = A·N^α by least squares in log-log space."""
    alpha, log_a = np.polyfit(np.log(N), np.log(L), 1)
    return {"A": float(math.exp(log_a)), "alpha": float(alpha)}


def fit_joint(N, M, L) -> dict[str, float]:
    """L = A·N^α·M^β by least squares in log space."""
    X = np.column_stack([np.ones(len(N)), np.log(N), np.log(M)])
    (log_a, alpha, beta), *_ = np.linalg.lstsq(X, np.log(L), rcond=None)
    return {"A": float(math.exp(log_a)), "alpha": float(alpha), "beta": float(beta)}


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def fit_irreducible(
    form: str, N, M, L, *, starts: int = 64, seed: int = 0, init: Sequence[dict[str, float]] = ()
) -> dict[str, float]:
    """``joint_irreducible`` or ``exp_irreducible`` by Huber loss on log residuals, L-BFGS-B from many starts.

    Parameters are optimized as (log A, α, β, log C) so that A, C > 0.
    """
    minimize = require("scipy.optimize", "fitting scaling laws").minimize

    N, M, L = (np.asarray(v, dtype=float) for v in (N, M, L))
    logL = np.log(L)

    def unpack(x):
        return {"A": math.exp(x[0]), "alpha": x[1], "beta": x[2], "C": math.exp(x[3])}

    logN, logM = np.log(N), np.log(M)

    def objective(x):
        """Huber loss of the log residuals and its exact gradient in (log A, α, β, log C)."""
        A, C = math.exp(min(x[0], 700.0)), math.exp(min(x[3], 700.0))
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            expo = x[1] * logN + x[2] * logM if form == "joint_irreducible" else (x[1] + x[2] * M) * logN
            g = np.exp(expo)
            pred = A * g + C
            r = logL - np.log(pred)
        if not np.all(np.isfinite(r)):
            return 1e9, np.zeros(4)
        psi = np.clip(r, -HUBER_DELTA, HUBER_DELTA)  # derivative of the Huber loss
        w = -psi / pred  # d loss / d pred
        with np.errstate(over="ignore", invalid="ignore"):
            dbeta = A * g * (logM if form == "joint_irreducible" else M * logN)
            grad = np.array([np.sum(w * A * g), np.sum(w * A * g * logN), np.sum(w * dbeta), np.sum(w * C)])
        if not np.all(np.isfinite(grad)):
            return 1e9, np.zeros(4)
        return float(_huber(r, HUBER_DELTA).sum()), grad

    rng = np.random.default_rng(seed)
    lo_c = math.log(max(L.min() * 1e-3, 1e-6))
    candidates = [np.array([math.log(p["A"]), p["alpha"], p["beta"], math.log(p["C"])]) for p in init]
    for _ in range(starts):
        candidates.append(
            np.array(
                [
                    rng.uniform(-2, 6),
                    rng.uniform(-1.0, 0.0),
                    rng.uniform(-0.2, 0.2),
                    rng.uniform(lo_c, math.log(L.min())),
                ]
            )
        )
    best, best_f = None, math.inf
    for x0 in candidates:
        res = minimize(objective, x0, jac=True, method="L-BFGS-B")
        if res.fun < best_f:
            best, best_f = res.x, res.fun
    return {k: float(v) for k, v in unpack(best).items()}


def _fit_params(form: str, N, M, L, *, starts: int, seed: int, init=()) -> dict[str, float]:
    if form == "power_law":
        return fit_power_law(N, L)
    if form == "joint":
        return fit_joint(N, M, L)
    return fit_irreducible(form, N, M, L, starts=starts, seed=seed, init=init)


def bootstrap_intervals(
    form: str,
    N,
    M,
    L,
    *,
    n_boot: int = 200,
    seed: int = 0,
    level: float = 0.95,
    best: dict[str, float] | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of each parameter over fits to points resampled with replacement.

    Resamples that no longer satisfy the form's minimum (one size, too few points) are redrawn.
    """
    N, L = np.asarray(N, float), np.asarray(L, float)
    M = None if M is None else np.asarray(M, float)
    rng = np.random.default_rng(seed)
    draws: list[dict[str, float]] = []
    tries = 0
    while len(draws) < n_boot and tries < 20 * n_boot:
        tries += 1
        idx = rng.integers(0, len(N), len(N))
        Nb, Lb, Mb = N[idx], L[idx], None if M is None else M[idx]
        try:
            _check(form, Nb, Lb, Mb)
        except ValueError:
            continue
        draws.append(
            _fit_params(
                form, Nb, Mb, Lb, starts=4, seed=int(rng.integers(1 << 31)), init=[best] if best else ()
            )
        )
    if not draws:
        return {}
    q = (1 - level) / 2
    return {
        k: (float(np.quantile([d[k] for d in draws], q)), float(np.quantile([d[k] for d in draws], 1 - q)))
        for k in draws[0]
    }


def heldout_residual(form: str, N, M, L, *, starts: int = 32, seed: int = 0) -> float | None:
    """Mean |log y − log ŷ| at the largest N, fitted on the smaller ones (None if too few remain)."""
    N, L = np.asarray(N, float), np.asarray(L, float)
    M = None if M is None else np.asarray(M, float)
    top = N == N.max()
    try:
        _check(form, N[~top], L[~top], None if M is None else M[~top])
    except ValueError:
        return None
    p = _fit_params(form, N[~top], None if M is None else M[~top], L[~top], starts=starts, seed=seed)
    pred = predict(form, p, N[top], None if M is None else M[top])
    return float(np.mean(np.abs(np.log(L[top]) - np.log(pred))))


def fit(
    form: str, N, L, M=None, *, label: str = "", n_boot: int = 200, starts: int = 64, seed: int = 0
) -> FitResult:
    """Fit ``form`` to points (N, L[, M]) with bootstrap intervals and the held-out residual.

    Raises:
        ValueError: unknown form, too few points, a single model size, non-positive values.
    """
    N, L = np.asarray(N, float), np.asarray(L, float)
    M = None if M is None else np.asarray(M, float)
    _check(form, N, L, M)
    params = _fit_params(form, N, M, L, starts=starts, seed=seed)
    resid = np.log(L) - np.log(predict(form, params, N, M))
    return FitResult(
        form=form,
        params=params,
        intervals=bootstrap_intervals(form, N, M, L, n_boot=n_boot, seed=seed, best=params) if n_boot else {},
        n_points=len(N),
        rmse_log=float(np.sqrt(np.mean(resid**2))),
        heldout_residual=heldout_residual(form, N, M, L, seed=seed),
        label=label,
    )


def best_per_point(points: Sequence, key: Callable, value: Callable) -> list:
    """The point with the lowest ``value`` for each ``key`` (the study fits the best run per N and M)."""
    best: dict = {}
    for p in points:
        k = key(p)
        if k not in best or value(p) < value(best[k]):
            best[k] = p
    return list(best.values())
