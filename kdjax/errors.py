"""The exceptions kdjax raises for user mistakes.

Each subclasses the builtin a caller expects (``except ValueError`` still catches an
``InputError``). The command line reports exactly these, plus its own usage errors,
as one line with exit status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import numbers

__all__ = ["InputError", "InputTypeError", "check_count"]


class InputError(ValueError):
    """A value kdjax cannot accept: a shape, a range, a missing key, a bad file."""


class InputTypeError(TypeError):
    """An argument of the wrong type or dtype."""


def check_count(name: str, value, minimum: int = 1) -> None:
    """Check that ``value`` is an int ``>= minimum``.

    Args:
      name: the argument's name, for the message.
      value: the value to check.
      minimum: the smallest value accepted.

    Raises:
      InputTypeError: not an int (a float, a bool, a string), the type named.
      InputError: an int below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputTypeError(f"{name}: expected an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise InputError(f"{name}: expected an int >= {minimum}, got {value}")
