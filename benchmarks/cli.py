"""What every benchmark command does at its ``__main__``: a ``ValueError`` (bad flags, bad data, a checkpoint of
another architecture) is a usage error, printed on one line with exit code 2, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


def run_cli(main: Callable[[], object]) -> None:
    """Call ``main()``; on ``ValueError`` print ``error: <message>`` to stderr and exit with code 2."""
    try:
        main()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
