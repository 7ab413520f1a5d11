"""The one exception type users see (the CLI prints its message as a single line and exits non-zero), the check
of a count argument, and the wording of counts in messages and model cards."""
import numbers


class LeopartError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


def positive_int(value, name: str) -> int:
    """``value`` as an int (numpy integers too), or a LeopartError naming ``name`` when it is no count >= 1."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise LeopartError(f"{name} must be a positive integer, not {value!r}")
    return int(value)


def plural(n: int, noun: str) -> str:
    """"1 image", "2 images"."""
    return f"{n} {noun}{'s' * (n != 1)}"
