"""The exceptions the command line turns into a one-line message and a non-zero exit (``CalidError``) or into the
cancelled exit (``Cancelled``)."""


class CalidError(Exception):
    """A problem with the user's input, options, model or environment, worded for the user."""


def first_few(names: list[str], count: int = 3) -> str:
    """``names`` for a one-line message: the first ``count``, then how many more."""
    return ", ".join(names[:count]) + (f" and {len(names) - count} more" if len(names) > count else "")


class Cancelled(Exception):
    """SIGTERM arrived (the Slicer module's cancel): the run ends with exit code 130 and leaves no output. An
    Exception so that ``finally`` clauses clean up; loops that go on after other failures (a cohort) let it pass."""
