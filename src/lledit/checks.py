"""Checks of config values, so that every config refuses a bad value in the same words."""

from __future__ import annotations

import math
from typing import Any


def at_least(config: Any, minimum: int, *names: str) -> None:
    """Each named field (None allowed) is at least `minimum`."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not value >= minimum:
            raise ValueError(f"{name} must be at least {minimum}, got {value}")


def positive(config: Any, *names: str) -> None:
    """Each named field is a finite number above 0."""
    for name in names:
        value = getattr(config, name)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be positive, got {value}")


def non_negative(config: Any, *names: str) -> None:
    """Each named field is a finite number, 0 or above."""
    for name in names:
        value = getattr(config, name)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be >= 0, got {value}")


def fraction(config: Any, *names: str) -> None:
    """Each named field lies in (0, 1]."""
    for name in names:
        value = getattr(config, name)
        if not 0 < value <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {value}")
