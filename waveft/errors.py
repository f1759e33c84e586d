"""One way to report bad input: raise `UserError`, and the CLI wrapper prints one line and exits 2."""
import functools
import sys


class UserError(Exception):
    """Bad input from the user (a file, a config key, a value). The message names the culprit."""


def cli_entry(main):
    """Wrap a CLI `main()` so that a `UserError` becomes `error: ...` on stderr and exit status 2, no traceback."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    return wrapped
