"""Errors a user can cause. The CLI prints them as one `Error:` line; anything else is a bug."""


class AsapError(Exception):
    """A problem with the user's input or environment, with what to do about it."""


class UsageError(AsapError):
    """A bad option value or argument: exit status 2, like a usage error of the parser."""
