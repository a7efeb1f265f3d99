"""The one exception type for errors a user can cause and fix (bad config, bad path, missing data)."""


class QuantbenchError(Exception):
    """A user-facing error: the message names the offending thing and how to fix it."""
