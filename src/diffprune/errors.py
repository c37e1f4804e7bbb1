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


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer


def require_seed(name: str, value, count: int = 1) -> None:
    """Raise unless ``value`` .. ``value + count - 1`` are all valid seeds (integers in [0, 2**63 - 1])."""
    require_int(name, value, 0)
    require(value + count - 1 <= MAX_SEED,
            f"{name}={value} is too large: seeds must be below 2**63 ({MAX_SEED + 1})"
            + (f" and {name} + {count - 1} too" if count > 1 else "") + "; pass a smaller seed, e.g. 0")
