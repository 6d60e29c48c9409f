"""Warnings about a valid policy that probably does not do what ops meant (pure)."""

from __future__ import annotations

from .schema import Match, Policy

__all__ = ["policy_warnings"]


def _empty(match: Match) -> bool:
    return all(v is None for v in match.model_dump().values())


def policy_warnings(policy: Policy, configured_backends: set[str] | None = None) -> list[str]:
    out: list[str] = []
    for i, rule in enumerate(policy.rules):
        for j in range(i):
            earlier = policy.rules[j]
            if _empty(earlier.match) or earlier.match == rule.match:
                out.append(f"rules[{i}] ({rule.name!r}) is unreachable: rules[{j}] ({earlier.name!r}) "
                           f"matches every request it would")
                break
    enabled = {n: b for n, b in policy.backends.items() if b.enabled}
    if configured_backends is not None:
        enabled = {n: b for n, b in enabled.items() if n in configured_backends}
        for name in sorted(set(policy.backends) - configured_backends):
            out.append(f"backends.{name}: not configured in this gateway; never chosen")
    for name, tier in policy.tiers.items():
        if not any(b.quality >= tier.min_quality for b in enabled.values()):
            out.append(f"tiers.{name}: no enabled backend reaches min_quality {tier.min_quality}")
    for i, rule in enumerate(policy.rules):
        for field in ("allow", "deny"):
            for backend in getattr(rule, field) or ():
                if backend not in policy.backends:
                    out.append(f"rules[{i}].{field}: backend {backend!r} is not in the policy's backends; "
                               "the rule applies to the rest")
        if rule.allow is not None and not set(rule.allow) & set(enabled):
            out.append(f"rules[{i}].allow: none of {rule.allow} is enabled; matching requests get 503")
    return out
