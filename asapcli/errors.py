"""Errors a user can cause. The CLI prints them as one `Error:` line; anything else is a bug."""

import difflib
from collections.abc import Sequence


class AsapError(Exception):
    """A problem with the user's input or environment, with what to do about it."""


class UsageError(AsapError):
    """A bad option value or argument: exit status 2, like a usage error of the parser."""


class UnsupportedModel(AsapError):
    """The model is built in a way the pruning engine cannot drive (yet)."""


def describe(error: Exception) -> str:
    """The one line an error prints: a user error's own message; anything else names its type
    (it is a bug, or a library's refusal we did not foresee)."""
    if isinstance(error, AsapError):
        return str(error)
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first} (ASAP_DEBUG=1 shows the traceback)"


def not_one_of(value: str, choices: Sequence[str]) -> str:
    """The refusal of a value that is none of `choices`, with the closest one as a suggestion:
    every command, option and API argument that takes a choice words it so."""
    text = value if isinstance(value, str) else repr(value)
    lowered = {choice.lower(): choice for choice in choices}  # ASAP: asap, whatever difflib's ratio says
    close = [lowered[text.lower()]] if text.lower() in lowered else difflib.get_close_matches(text, choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{value!r} is not one of {', '.join(choices)}{hint}"


def whole_number(text: str, what: str, minimum: int = 1) -> int:
    """`text` as a whole number of at least `minimum`, in ASCII digits."""
    text = text.strip()
    if not ascii_digits(text) or int(text) < minimum:
        raise UsageError(f"{what} needs a whole number of at least {minimum}, got {text!r}")
    return int(text)


def ascii_digits(text: str) -> bool:
    """Only the digits 0-9: str.isdigit() also takes '²', which int() refuses."""
    text = text.strip()
    return bool(text) and text.isascii() and text.isdigit()


def first_line(error: Exception) -> str:
    """Library errors run to many lines; the first says what went wrong."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
