"""Counts for people: parameters and MACs with the unit that fits (``558K``, ``65.7M``, ``1.23G``)."""
from __future__ import annotations

UNITS = (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3))


def unit_of(n: float) -> tuple[str, float]:
    """The largest unit not above ``n`` (``("", 1)`` below a thousand)."""
    return next(((u, f) for u, f in UNITS if abs(n) >= f), ("", 1.0))


def si(n: float, like: float | None = None, sep: str = "") -> str:
    """``n`` in the unit that fits it, or that fits ``like`` (so a before -> after pair shares one unit), with three
    significant digits where the value allows (``65.7M``, ``0.558M``, ``512``)."""
    unit, factor = unit_of(float(f"{n if like is None else like:.3g}"))  # 999.6M is 1.00G
    v = n / factor
    r = abs(float(f"{v:.3g}"))
    decimals = 0 if (r >= 100 or not unit) else 1 if r >= 10 else 2 if r >= 1 else 3
    return f"{v:.{decimals}f}{sep}{unit}"


__all__ = ["si", "unit_of"]
