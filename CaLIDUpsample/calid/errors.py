"""The one exception type the command line turns into a one-line message and a non-zero exit."""


class CalidError(Exception):
    """A problem with the user's input, options, model or environment, worded for the user."""
