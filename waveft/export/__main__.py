"""`python -m waveft.export`: the export command (waveft/export/cli.py)."""
from waveft.export.cli import main

main()
