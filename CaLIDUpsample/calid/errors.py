"""The exceptions the command line turns into a one-line message and a non-zero exit (``CalidError``) or into the
cancelled exit (``Cancelled``)."""


class CalidError(Exception):
    """A problem with the user's input, options, model or environment, worded for the user."""


class Cancelled(Exception):
    """SIGTERM arrived (the Slicer module's cancel): the run ends with exit code 130 and leaves no output. An
    Exception so that ``finally`` clauses clean up; loops that go on after other failures (a cohort) let it pass."""
