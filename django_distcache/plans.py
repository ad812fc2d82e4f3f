"""The language of plans: what a plan may yield besides calls, and the values plans pass around.

Each operation is written once, as a *plan*: a generator that yields a `topology.Call` or a list of calls
(I/O), or one of the steps below, and receives the replies. The drivers in core.py run plans; this module
has no imports of the package, so every layer may speak it.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

T = TypeVar("T")

PlanOf: TypeAlias = Generator[Any, Any, T]
"""A plan returning a T: yields calls and steps, receives their replies, returns the operation's result."""
Plan: TypeAlias = Generator[Any, Any, Any]
"""A plan whose result the type checker does not follow."""


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


MISSING: Any = _Sentinel("missing")
"""What a read plan returns for "no usable value" (None is a value a user may cache)."""
STRICT: Any = _Sentinel("strict")
"""As a fallback: the operation never degrades (invalidations); an outage raises CacheUnavailable."""


class CacheUnavailable(Exception):
    """Raised instead of degrading when OPTIONS['FAILURE_POLICY'] is 'raise' (or the operation is strict)."""


# -- the steps a plan may yield besides calls ---------------------------------------------------------------
@dataclass(slots=True)
class Guarded:
    """A step of a plan that is a whole operation of its own, with its own failure fallback.

    get_or_set is "get, compute, add, get": an outage in the get must still let the value be computed
    and returned, so each step degrades on its own instead of the whole plan.
    """

    plan: Plan
    operation: str
    fallback: Any


@dataclass(slots=True)
class Compute:
    """Call user code from a plan: the async driver awaits the result when it is awaitable."""

    function: Callable[..., Any]
    args: tuple[Any, ...] = ()


@dataclass(slots=True)
class Sleep:
    """Wait inside a plan (time.sleep for the sync driver, asyncio.sleep for the async one)."""

    seconds: float


@dataclass(slots=True)
class Spawn:
    """Run `plan_factory()`'s plan in the background (a thread, or a task on the running loop), under
    its own failure policy; the plan that spawned it goes on at once."""

    plan_factory: Callable[[], Plan]
    operation: str
