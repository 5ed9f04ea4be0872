"""Scaling-law records, fits and plots (see the scaling issue); nothing here yet."""
