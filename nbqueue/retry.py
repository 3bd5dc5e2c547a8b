"""Back-off strategies for task retries.

machinery's default is Fibonacci seeded by ``retry_timeout``: from 0 the delays are
1, 2, 3, 5, 8 … seconds. ``Backoff`` adds exponential and fixed delays with a cap and
jitter; it travels inside the message as a small dict.
"""
from __future__ import annotations

import dataclasses
import math
import random

from .errors import Retry  # re-exported: the retry-later error lives in the one error tree

__all__ = ["Backoff", "fibonacci_next", "next_delay", "Retry"]


def fibonacci_next(value: float) -> int:
    """The first Fibonacci number greater than ``value`` (machinery's FibonacciNext)."""
    a, b = 1, 2
    if value < 1:
        return 1
    while a <= value:
        a, b = b, a + b
    return a


@dataclasses.dataclass(frozen=True)
class Backoff:
    """``Backoff("exponential", base=1, factor=2, max=60, jitter=True)`` or ``Backoff("fixed", base=5)``."""

    kind: str = "fibonacci"
    base: float = 1.0
    factor: float = 2.0
    max: float | None = None
    jitter: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("fibonacci", "exponential", "fixed"):
            raise ValueError(f"unknown back-off kind {self.kind!r}: use fibonacci, exponential or fixed")
        for name in ("base", "factor", "max"):
            value = getattr(self, name)
            if value is None and name == "max":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"back-off {name} must be a finite number of at least 0, not {value!r}")
        if not isinstance(self.jitter, bool):
            raise ValueError(f"back-off jitter must be True or False, not {self.jitter!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "Backoff | None":
        return None if data is None else cls(**data)


def next_delay(
    retries_done: int, retry_timeout: float, backoff: dict | Backoff | None, rng: random.Random | None = None
) -> tuple[float, float]:
    """Delay before the next attempt, and the retry_timeout to carry forward.

    ``retries_done`` counts the retries already used (0 before the first retry).
    """
    if isinstance(backoff, dict):
        backoff = Backoff.from_dict(backoff)
    if backoff is None or backoff.kind == "fibonacci":
        timeout = fibonacci_next(retry_timeout)
        delay = float(timeout)
        if backoff is not None and backoff.max is not None:
            delay = min(delay, backoff.max)
    elif backoff.kind == "exponential":
        timeout = retry_timeout
        delay = backoff.base * backoff.factor ** retries_done
        if backoff.max is not None:
            delay = min(delay, backoff.max)
    else:
        timeout = retry_timeout
        delay = backoff.base
    if backoff is not None and backoff.jitter:
        delay = (rng or random).uniform(delay / 2, delay)
    return delay, timeout
