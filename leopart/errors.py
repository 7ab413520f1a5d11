"""The one exception type users see (the CLI prints its message as a single line and exits non-zero), the checks
of an argument's kind (a count, an integer, a number, a flag, a settings dataclass's fields), and the wording of counts in
messages and model cards."""
import dataclasses
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


def flag(value, name: str) -> bool:
    """``value`` when it is True or False, else a LeopartError naming ``name`` (a string "no" would read as true)."""
    if not isinstance(value, bool):
        raise LeopartError(f"{name} must be True or False, not {value!r}")
    return value


def check_kinds(config, prefix: str = "") -> None:
    """Numbers and flags where a dataclass's annotations ("int", "float | None", "bool") want them, in one line
    naming the field: a string (say, from a hand-edited config) would otherwise fail a range check as a TypeError."""
    wanted = {"int": (numbers.Integral, "an integer"), "float": (numbers.Real, "a number"),
              "bool": (bool, "True or False")}
    for field in dataclasses.fields(config):
        annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
        kinds = [kind.strip() for kind in annotation.split("|")]  # "int | None" -> ["int", "None"]
        value = getattr(config, field.name)
        if kinds[0] not in wanted or (value is None and "None" in kinds):
            continue
        cls, what = wanted[kinds[0]]
        if not isinstance(value, cls) or (kinds[0] != "bool" and isinstance(value, bool)):
            raise LeopartError(f"{prefix}{field.name} must be {what}, not {value!r}")


def plural(n: int, noun: str) -> str:
    """"1 image", "2 images"."""
    return f"{n} {noun}{'s' * (n != 1)}"
