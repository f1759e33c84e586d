"""Sweeps of training runs: `schema` (the sweep file), `runs` (its runs and the work on one run), `runner`
(local processes, locks, signals, worker pool), `slurm` (the same work as a Slurm job array), `cost` (cost per
run), `cli` (`python scripts/sweep.py` / `python -m eval.sweep`)."""
