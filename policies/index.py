"""A policy compiled for decide()'s hot path: what every request asks of it, worked out once per policy.

Built lazily by `Policy.index` and kept with that (immutable) policy, so a hot-reload brings a fresh one.
Memoized answers are pure functions of the policy: the same policy always answers the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .schema import Policy, Rule, Tier
    from .types import RouteRequest

__all__ = ["PolicyIndex"]


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    """A rule's match as sets (membership in a list is a linear scan)."""

    rule: Rule
    tenants: frozenset[str] | None
    tiers: frozenset[str] | None
    tags_any: frozenset[str] | None
    min_megapixels: float | None
    max_megapixels: float | None

    @classmethod
    def of(cls, rule: Rule) -> _CompiledRule:
        m = rule.match
        return cls(rule, _set(m.tenants), _set(m.tiers), _set(m.tags_any), m.min_megapixels, m.max_megapixels)


def _set(values: list[str] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(values)


class PolicyIndex:
    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._rules = tuple(_CompiledRule.of(rule) for rule in policy.rules)
        # (tier minimum quality, rule name) -> backends the policy alone lets serve; bounded by the policy's
        # distinct tier minimums (plus 0 for an unknown tier) times its rules plus one.
        self._eligible: dict[tuple[float, str | None], frozenset[str]] = {}

    def first_rule(self, request: RouteRequest, tier: str) -> Rule | None:
        """Rules are ordered: the first whose every condition holds wins."""
        for r in self._rules:
            if r.tenants is not None and request.tenant not in r.tenants:
                continue
            if r.tiers is not None and tier not in r.tiers:
                continue
            if r.tags_any is not None and r.tags_any.isdisjoint(request.tags):
                continue
            if r.min_megapixels is not None and request.megapixels < r.min_megapixels:
                continue
            if r.max_megapixels is not None and request.megapixels > r.max_megapixels:
                continue
            return r.rule
        return None

    def eligible(self, tier: Tier, rule: Rule | None) -> frozenset[str]:
        """Backends that the policy's own terms (enabled, tier quality, rule allow/deny) let serve."""
        key = (tier.min_quality, rule.name if rule is not None else None)
        names = self._eligible.get(key)
        if names is None:
            names = self._eligible[key] = frozenset(
                name for name, bp in self._policy.backends.items()
                if bp.enabled and bp.best_quality >= tier.min_quality
                and (rule is None or ((rule.allow is None or name in rule.allow)
                                      and (rule.deny is None or name not in rule.deny))))
        return names
