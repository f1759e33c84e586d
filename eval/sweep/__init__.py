"""Sweeps of training runs. `schema`: the sweep file and its checks; `stages`: the settings and command lines of
the stage CLIs (generation, scoring); `runs`: the sweep's runs, their folders and the work on one run;
`runner`: local processes, locks, signals and the worker pool (the launcher seam); `slurm`: the same work as a
Slurm job array; `cli`: `python scripts/sweep.py` (= `python -m eval.sweep`)."""
