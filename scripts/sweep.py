"""Run a sweep: subjects x methods x budgets x seeds, each trained, generated and scored, then one report.

    python scripts/sweep.py --sweep configs/sweeps/tiny.yaml [--dry-run] [--gpus N] [key.sub=value ...]

The logic lives in the eval/sweep/ package (eval/sweep/cli.py); `python -m eval.sweep` is the same command.
"""
from eval.sweep.cli import main

if __name__ == "__main__":
    main()
