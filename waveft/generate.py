"""`python -m waveft.generate`: the generation command (waveft/infer/cli.py)."""
from waveft.infer.cli import main

if __name__ == "__main__":
    main()
