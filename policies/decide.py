"""`decide(request, policy, snapshot) -> Decision`: pure, deterministic routing."""

from __future__ import annotations

from .costs import predicted_cost_usd
from .schema import BackendPolicy, Objective, Policy, Rule, Tier
from .types import (
    BackendView,
    Candidate,
    Decision,
    Health,
    PoolModel,
    Rejection,
    RejectReason,
    RouteRequest,
    Snapshot,
)

__all__ = ["decide", "first_matching_rule"]

_NOT_READY = {
    Health.UNCONFIGURED: RejectReason.UNCONFIGURED,
    Health.WARMING: RejectReason.NOT_READY,
    Health.OPEN: RejectReason.UNHEALTHY,
}


def first_matching_rule(request: RouteRequest, tier: str, rules: list[Rule]) -> Rule | None:
    """Rules are ordered: the first whose every condition holds wins."""
    for rule in rules:
        m = rule.match
        if m.tenants is not None and request.tenant not in m.tenants:
            continue
        if m.tiers is not None and tier not in m.tiers:
            continue
        if m.tags_any is not None and not request.tags.intersection(m.tags_any):
            continue
        if m.min_megapixels is not None and request.megapixels < m.min_megapixels:
            continue
        if m.max_megapixels is not None and request.megapixels > m.max_megapixels:
            continue
        return rule
    return None


def _ceiling(*values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _static_rejection(
    view: BackendView,
    bp: BackendPolicy | None,
    request: RouteRequest,
    tier: Tier,
    rule: Rule | None,
) -> Rejection | None:
    """Why this backend cannot serve this request at all, whatever it would cost or take."""

    def no(reason: RejectReason, detail: str) -> Rejection:
        return Rejection(view.name, reason, detail)

    if request.backend is not None and request.backend != view.name:
        return no(RejectReason.NOT_REQUESTED, f"request names backend {request.backend!r}")
    if bp is None:
        return no(RejectReason.NOT_IN_POLICY, "backend has no entry in the policy's backends")
    if not bp.enabled:
        return no(RejectReason.DISABLED, "disabled in policy")
    if view.health in _NOT_READY:
        return no(_NOT_READY[view.health], f"backend is {view.health.value}")
    if request.model is not None and request.model not in view.models:
        return no(RejectReason.MODEL_UNAVAILABLE, f"model {request.model!r} not offered")
    if bp.quality < tier.min_quality:
        return no(
            RejectReason.QUALITY_BELOW_TIER,
            f"quality {bp.quality} < tier minimum {tier.min_quality}",
        )
    if rule is not None and rule.allow is not None and view.name not in rule.allow:
        return no(RejectReason.RULE_DENY, f"rule {rule.name!r} allows only {rule.allow}")
    if rule is not None and rule.deny is not None and view.name in rule.deny:
        return no(RejectReason.RULE_DENY, f"rule {rule.name!r} denies it")
    if not view.sizes.allows(request.width, request.height):
        return no(RejectReason.SIZE_UNSUPPORTED, f"size {request.width}x{request.height}")
    if request.n > view.max_n:
        return no(RejectReason.N_UNSUPPORTED, f"n={request.n} > {view.max_n}")
    return None


def _rank_key(objective: Objective):
    if objective is Objective.MIN_LATENCY:
        return lambda c: (c.predicted_latency_ms, c.predicted_cost_usd, -c.quality, c.backend)
    if objective is Objective.MAX_QUALITY:
        return lambda c: (-c.quality, c.predicted_cost_usd, c.predicted_latency_ms, c.backend)
    return lambda c: (c.predicted_cost_usd, c.predicted_latency_ms, -c.quality, c.backend)


def decide(request: RouteRequest, policy: Policy, snapshot: Snapshot) -> Decision:
    """Filter, predict, drop what misses the SLA or the ceiling, rank by the objective."""
    tier_name = request.tier or policy.defaults.tier
    tier = policy.tiers.get(tier_name, Tier())
    rule = first_matching_rule(request, tier_name, policy.rules)
    sla_ms = (
        request.sla_ms
        or (rule.sla_ms if rule else None)
        or tier.sla_ms
        or policy.defaults.sla_ms
    )
    max_cost = _ceiling(
        request.max_cost_usd,
        rule.max_cost_usd if rule else None,
        tier.max_cost_usd,
        policy.defaults.max_cost_usd,
    )
    objective = (rule.objective if rule and rule.objective else None) or policy.objective

    candidates: list[Candidate] = []
    rejected: list[Rejection] = []
    reserve_bound: list[tuple[PoolModel, Candidate]] = []
    pooled: set[str] = set()  # queueing backends among the candidates (only they get release times)
    for view in sorted(snapshot.backends, key=lambda v: v.name):
        bp = policy.backends.get(view.name)
        rejection = _static_rejection(view, bp, request, tier, rule)
        if rejection is not None:
            rejected.append(rejection)
            continue
        assert bp is not None
        steps = request.steps or view.default_steps
        latency = view.latency.predict(request, steps, policy.latency_quantile, view.pool, sla_ms)
        cost = predicted_cost_usd(view, bp, request, steps, policy.cost_accounting)
        if view.pool is not None and tier.local_max_ms is not None and latency > tier.local_max_ms:
            rejected.append(Rejection(view.name, RejectReason.SLA_MISS,
                                      f"predicted {latency:.0f} ms > tier's local_max_ms {tier.local_max_ms}"))
            continue
        if latency > sla_ms:
            rejected.append(
                Rejection(
                    view.name,
                    RejectReason.SLA_MISS,
                    f"predicted {policy.latency_quantile} {latency:.0f} ms > SLA {sla_ms} ms",
                )
            )
            continue
        if max_cost is not None and cost > max_cost:
            rejected.append(
                Rejection(
                    view.name,
                    RejectReason.COST_CEILING,
                    f"predicted ${cost:.6f} > ceiling ${max_cost:.6f}",
                )
            )
            continue
        candidate = Candidate(view.name, request.model or view.models[0], latency, cost, bp.quality, steps)
        if view.pool is not None:
            pooled.add(view.name)
            if view.pool.delays_committed(request, steps, sla_ms / 1000):
                reserve_bound.append((view.pool, candidate))
                continue
        candidates.append(candidate)

    # A pool place that would eat into committed jobs' slack reserve goes to other backends first; where
    # there is none, the request may still have it if no committed job is predicted to miss its deadline.
    alternatives = bool(candidates)
    for pool, candidate in reserve_bound:
        if not alternatives and not pool.delays_committed(request, candidate.steps, sla_ms / 1000, reserve=1.0):
            candidates.append(candidate)
        else:
            rejected.append(Rejection(candidate.backend, RejectReason.SLA_MISS,
                                      "would eat into the slack reserve of committed pool jobs"))

    candidates.sort(key=_rank_key(objective))
    if pooled:
        candidates = _with_release_times(candidates, pooled, snapshot, sla_ms)
    for known in sorted(set(policy.backends) - {v.name for v in snapshot.backends}):
        if request.backend in (None, known):
            rejected.append(
                Rejection(known, RejectReason.UNCONFIGURED, "not configured in this gateway")
            )
    return Decision(
        policy_version=policy.fingerprint,
        tier=tier_name,
        sla_ms=sla_ms,
        max_cost_usd=max_cost,
        objective=objective.value,
        rule=rule.name if rule else None,
        candidates=tuple(candidates),
        rejected=tuple(rejected),
        reason=_explain(objective, candidates, rule),
        hedge=rule.hedge if rule and rule.hedge is not None else policy.dispatch.hedge,
    )


def _with_release_times(candidates: list[Candidate], pooled: set[str], snapshot: Snapshot,
                        sla_ms: float) -> list[Candidate]:
    """A queueing backend followed by another candidate may hold the job only while that one could still
    make the SLA at its p99; past that it must have started (see policies.batching on late binding)."""
    out = list(candidates)
    for i, candidate in enumerate(out[:-1]):
        if candidate.backend in pooled and (fallback := snapshot.get(out[i + 1].backend)) is not None:
            c = candidate  # built directly: dataclasses.replace costs more than the rest of this function
            out[i] = Candidate(c.backend, c.model, c.predicted_latency_ms, c.predicted_cost_usd, c.quality, c.steps,
                               start_within_ms=max(0.0, sla_ms - fallback.latency.p99_ms))
    return out


def _explain(objective: Objective, candidates: list[Candidate], rule: Rule | None) -> str:
    via = f" under rule {rule.name!r}" if rule else ""
    if not candidates:
        return f"no backend meets the constraints{via}"
    best = candidates[0]
    return (
        f"{best.backend} ranks first by {objective.value}{via}: "
        f"predicted {best.predicted_latency_ms:.0f} ms, ${best.predicted_cost_usd:.6f}"
        f" among {len(candidates)} candidate(s)"
    )
