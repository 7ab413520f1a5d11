"""The one exception type users see (the CLI prints its message as a single line and exits non-zero), and the
wording of counts in messages and model cards."""


class LeopartError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


def plural(n: int, noun: str) -> str:
    """"1 image", "2 images"."""
    return f"{n} {noun}{'s' * (n != 1)}"
