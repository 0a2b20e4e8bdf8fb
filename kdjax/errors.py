"""The exceptions kdjax raises for user mistakes.

Each subclasses the builtin a caller expects (``except ValueError`` still catches an
``InputError``). The command line reports exactly these, plus its own usage errors,
as one line with exit status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["InputError", "InputTypeError"]


class InputError(ValueError):
    """A value kdjax cannot accept: a shape, a range, a missing key, a bad file."""


class InputTypeError(TypeError):
    """An argument of the wrong type or dtype."""
