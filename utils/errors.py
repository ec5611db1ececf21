"""Errors a user can cause, and the one place that turns them into a clear message and a non-zero exit."""
import signal
import sys

MESSAGE_LIMIT = 300  # characters of one error line: a crafted value can be megabytes long


class UserError(Exception):
    """Bad input from the user (missing record, wrong dataset, corrupt file): reported in one line, no traceback."""


def one_line(text, limit=MESSAGE_LIMIT):
    """`text` folded to one line of at most `limit` characters (long values cut, marked with ...)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def summarise_error(err, limit=200):
    """An exception from deep inside torch, pybind or PIL as a short phrase: its first line, its type if empty."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return one_line(lines[0] if lines else type(err).__name__, limit)


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_cli(main, argv=None):
    """Run a script's main(argv); a UserError ends the process with its message and exit status 2. SIGTERM is
    handled as Ctrl-C, so a killed run cleans up its partial output the same way."""
    try:
        signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
