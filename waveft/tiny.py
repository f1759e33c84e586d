"""`python -m waveft.tiny DIR [--size full]`: the built-in random-weight SDXL (waveft/fixtures/tiny.py)."""
from waveft.fixtures.tiny import main

if __name__ == "__main__":
    main()
