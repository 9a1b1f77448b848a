"""The two kinds of failure a user can act on, and how each ends a run.

A `StageError` (or a subclass) is reported as its one line, `error: <message>`, on stderr and
as the message of the Failed Prefect state, with no traceback anywhere: the message names the
file, parameter or version and what is wrong. Its `exit_status` says which: 2 for bad input
(`BadInput`: a parameter, an unknown crawl, a damaged file the user gave), 1 for a run that
failed (an outage, a killed worker). Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class StageError(Exception):
    """A run that failed for a reason the user can act on: exit status 1 (2 with `bad_input`)."""

    exit_status = 1

    def __init__(self, message: str, *, bad_input: bool = False):
        super().__init__(message)
        if bad_input:
            self.exit_status = 2  # an instance attribute: it survives pickling between processes


class BadInput(StageError):
    """Bad input (a parameter, a reference, a file): exit status 2."""

    exit_status = 2
