"""The one exception type a user can cause; the CLI prints its message and exits 2."""


class S2TError(Exception):
    """A user-facing error with a one-line message (no traceback is shown for it)."""
