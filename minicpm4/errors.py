"""User-facing errors and the command-line error tail: a problem the user can fix is printed as one line
(`PROG: error: message`, exit status 2), never as a traceback. A leaf module, so the subcommands in
train/ and data/ raise UserError without importing the top-level cli.py."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class UserError(Exception):
    """A problem with the command line or the files it names: shown as one line."""


class MissingDependency(UserError, ImportError):
    """An optional package a feature needs is not installed; the message names the extra that installs it."""

    def __init__(self, feature: str, package: str, extra: str) -> None:
        super().__init__(f"{feature} needs the '{package}' package: pip install 'minicpm4[{extra}]'")


# What a user can fix: config.ConfigError is a ValueError (it names the key), so it is covered too.
USER_ERRORS = (UserError, ValueError, FileNotFoundError, IsADirectoryError, PermissionError)


def run_command(func: Callable[[argparse.Namespace], object], args: argparse.Namespace, prog: str) -> int:
    """Run a subcommand handler and turn the errors a user can fix into one line on stderr; the exit status."""
    try:
        func(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `minicpm4 info X | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0
