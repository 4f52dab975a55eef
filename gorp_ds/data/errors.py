"""The one exception type of the data layer.

Every problem with user-supplied data or data settings is reported as a :class:`DataError` with a
one-line message that names the file (or setting), the offending field or entry, and the fix. It is
raised while the task sequence is loaded, i.e. before any training starts.
"""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad data or data configuration (a ``ValueError``, so generic handlers still catch it)."""

    def __init__(self, message: str) -> None:
        # Keep the message on one line: log lines and launcher output stay readable.
        super().__init__(" ".join(str(message).split()))
