"""The one exception type users see: the CLI prints its message as a single line and exits non-zero."""


class LeopartError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""
