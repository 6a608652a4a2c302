"""Errors that reach the user as one clear line and a non-zero exit code."""

# Exit codes (docs/guarantees.md lists them for users).
EXIT_OK = 0
EXIT_ERROR = 1          # bad input or a failed check: the message says what to do
EXIT_USAGE = 2          # bad command line (argparse's own convention)
EXIT_INTERRUPTED = 130  # Ctrl-C: state saved, run the same command to resume
EXIT_PEER = 3           # several processes: this rank lost contact with another, which failed


class Exl2Error(Exception):
    """A problem the user can act on. ``str(err)`` is the whole message: what is wrong,
    where (file, tensor or flag) and what to do."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class FormatError(Exl2Error):
    """A file that is not what it claims to be (corrupt, truncated, foreign)."""


class Interrupted(Exl2Error):
    exit_code = EXIT_INTERRUPTED
