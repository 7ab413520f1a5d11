"""The one exception type users see (the CLI prints its message as a single line and exits non-zero), the check
of count and integer arguments, and the wording of counts in messages and model cards."""
import numbers


class LeopartError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


def positive_int(value, name: str) -> int:
    """``value`` as an int (numpy integers too), or a LeopartError naming ``name`` when it is no count >= 1."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise LeopartError(f"{name} must be a positive integer, not {value!r}")
    return int(value)


def integer(value, name: str, minimum: int | None = None) -> int:
    """``value`` as an int (numpy integers too), or a LeopartError naming ``name`` when it is no integer or below
    ``minimum``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise LeopartError(f"{name} must be an integer, not {value!r}")
    if minimum is not None and value < minimum:
        raise LeopartError(f"{name} must be >= {minimum}, not {value!r}")
    return int(value)


def number(value, name: str) -> float:
    """``value`` as a float (numpy scalars too), or a LeopartError naming ``name`` when it is no number."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise LeopartError(f"{name} must be a number, not {value!r}")
    return float(value)


def plural(n: int, noun: str) -> str:
    """"1 image", "2 images"."""
    return f"{n} {noun}{'s' * (n != 1)}"
