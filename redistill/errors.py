"""The one error type a user sees, and the wrapper that prints it as one line."""

import sys
from collections.abc import Callable


class PipelineError(Exception):
    """Something the user can fix: a bad param, a missing file, a teacher that refuses. Printed as one line."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main``; a PipelineError becomes one line on stderr and exit status 1."""
    try:
        main()
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
