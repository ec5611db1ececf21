"""Errors a user can cause, and the one place that turns them into a clear message and a non-zero exit."""
import sys


class UserError(Exception):
    """Bad input from the user (missing record, wrong dataset, corrupt file): reported in one line, no traceback."""


def run_cli(main, argv=None):
    """Run a script's main(argv); a UserError ends the process with its message and exit status 2."""
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
