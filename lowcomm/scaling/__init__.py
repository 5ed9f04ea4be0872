"""Scaling laws from run records: sweeps, loss-vs-replicas tables, fits, reports and plots."""

from .analyze import Analysis, best_records, fit_records, loss_table, percent_vs_dp
from .fit import FORMS, FitResult, bootstrap_intervals, fit, heldout_residual, predict
from .records import Record, load_records
from .report import qualitative_findings, write_report
from .sweep import SIZE_PRESETS, SweepSpec, grid, non_embedding_params, resolve_size, run_sweep

__all__ = [
    "FORMS",
    "SIZE_PRESETS",
    "Analysis",
    "FitResult",
    "Record",
    "SweepSpec",
    "best_records",
    "bootstrap_intervals",
    "fit",
    "fit_records",
    "grid",
    "heldout_residual",
    "load_records",
    "loss_table",
    "non_embedding_params",
    "percent_vs_dp",
    "predict",
    "qualitative_findings",
    "resolve_size",
    "run_sweep",
    "write_report",
]
