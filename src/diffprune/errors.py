"""One exception type for every problem caused by user input.

Messages are one line and name the bad value, the constraint and the fix, e.g.
``ratio=1.5 must be in (0, 1); pass e.g. --ratio 0.3``. The CLI prints them as
``diffprune: error: <message>`` and exits with status 2.
"""


class DiffPruneError(ValueError):
    """Bad user input or an unmet precondition; the message is a one-line explanation and fix."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`DiffPruneError` with ``message`` unless ``condition`` holds (never ``assert``)."""
    if not condition:
        raise DiffPruneError(message)
