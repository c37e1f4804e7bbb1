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


def require_int(name: str, value, minimum: int) -> None:
    """Raise unless ``value`` is an integer (not a bool) >= ``minimum``; the message names the setting."""
    require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
            f"{name}={value!r} must be an integer >= {minimum}")
