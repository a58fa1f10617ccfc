"""Config validation helpers shared by every config dataclass (a leaf: imports nothing from moekit).

Errors name the class, the field, the offending value and what is allowed, so that a bad YAML key or
override is fixed from the message alone::

    fail("TrainConfig", "lr", inf, "must be a finite number > 0")
    # ValueError: TrainConfig.lr=inf is invalid: must be a finite number > 0
"""

from __future__ import annotations

import math
from typing import Any, NoReturn

__all__ = ["fail", "is_int", "is_number", "is_finite_number"]


def fail(cls: str, name: str, value: Any, allowed: str) -> NoReturn:
    """Raise the standard config error: ``<cls>.<name>=<value!r> is invalid: <allowed>``."""
    raise ValueError(f"{cls}.{name}={value!r} is invalid: {allowed}")


def is_int(x: Any) -> bool:
    """An ``int`` that is not a ``bool`` (YAML's ``true`` must not pass as 1)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_finite_number(x: Any) -> bool:
    """A number that is neither inf nor nan."""
    return is_number(x) and math.isfinite(x)
