"""Errors a user can fix: the `esm3` command prints them as one line and exits with 2."""


class UserError(Exception):
    """A mistake in the command, config or environment, with what to do about it."""
