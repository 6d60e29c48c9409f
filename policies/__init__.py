"""The pure policy engine: schema, cost models and `decide()`. No I/O lives here."""

from .decide import decide
from .schema import Policy
from .types import Decision, RouteRequest, Snapshot

__all__ = ["Decision", "Policy", "RouteRequest", "Snapshot", "decide"]
