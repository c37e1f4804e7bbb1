"""Text conditioning given as a dict (SDXL, PixArt): the form checked before a denoiser call reads its keys."""
from __future__ import annotations

from . import Conditioning


def require_form(spec: Conditioning, cond, what: str = "conditioning") -> dict:
    """``cond`` itself when it is a dict with exactly ``spec.keys``; else the one-line error of
    :meth:`Conditioning.check_context`, which names the keys expected (nothing is copied or cast on the good path,
    so a half-precision model keeps its dtype)."""
    if not isinstance(cond, dict) or set(cond) != set(spec.keys):
        spec.check_context(cond, what)  # raises: it names the keys this model takes and what it got
    return cond
