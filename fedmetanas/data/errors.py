"""The one exception type for data problems a user can cause and fix."""

from __future__ import annotations


class DataError(ValueError):
    """A user-caused data problem; the one-line message names the config field or file and the fix."""
