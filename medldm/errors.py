"""The one exception type for bad input, and the CLI wrapper that turns it into a clear message."""

from __future__ import annotations

import sys
from collections.abc import Callable


class InputError(ValueError):
    """Bad input or configuration: the message names the file or key and says what to do."""


EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 75  # SIGTERM/SIGUSR1 received: checkpoint written, rerun resumes


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a script's ``main``; an InputError becomes ``error: ...`` on stderr and exit code 2."""
    try:
        code = main(argv)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    sys.exit(code or 0)
