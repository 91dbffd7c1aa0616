"""The one exception type users see: a one-line message naming what is wrong and how to fix it."""


class PtqError(Exception):
    """A user-facing error; the CLI and entry points print its message as a single line."""
