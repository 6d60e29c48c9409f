"""`decide(request, policy, snapshot) -> Decision`: pure, deterministic routing."""

from __future__ import annotations

import math

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

__all__ = ["decide", "first_matching_rule", "start_within_ms"]

_NOT_READY = {
    Health.UNCONFIGURED: RejectReason.UNCONFIGURED,
    Health.WARMING: RejectReason.NOT_READY,
    Health.OPEN: RejectReason.UNHEALTHY,
}
# A probe is worth it when it may take at least this share of the SLA before the next candidate must start.
_PROBE_MIN_SLACK = 0.2
_NO_TIER = Tier()  # a tier the policy does not define has no constraints (built once: pydantic models cost ~2 us)


def first_matching_rule(request: RouteRequest, tier: str, policy: Policy) -> Rule | None:
    """Rules are ordered: the first whose every condition holds wins."""
    return policy.index.first_rule(request, tier)


def _ceiling(*values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _passes(view: BackendView, eligible: bool, request: RouteRequest) -> bool:
    """The fast form of `_static_rejection(...) is None` (`eligible`: the policy's own terms allow it)."""
    health = view.health
    return (eligible and (request.backend is None or request.backend == view.name)
            and (health is Health.OK or health is Health.HALF_OPEN)
            and (request.model is None or request.model in view.models)
            and request.n <= view.max_n and view.sizes.allows(request.width, request.height))


def _static_rejection(
    view: BackendView,
    bp: BackendPolicy | None,
    request: RouteRequest,
    tier: Tier,
    rule: Rule | None,
) -> Rejection | None:
    """Why this backend cannot serve this request at all, whatever it would cost or take."""
    name = view.name
    if request.backend is not None and request.backend != name:
        return Rejection(name, RejectReason.NOT_REQUESTED, f"request names backend {request.backend!r}")
    if bp is None:
        return Rejection(name, RejectReason.NOT_IN_POLICY, "backend has no entry in the policy's backends")
    if not bp.enabled:
        return Rejection(name, RejectReason.DISABLED, "disabled in policy")
    health = view.health
    if health is not Health.OK and health is not Health.HALF_OPEN:
        return Rejection(name, _NOT_READY[health], f"backend is {health.value}")
    if request.model is not None and request.model not in view.models:
        return Rejection(name, RejectReason.MODEL_UNAVAILABLE, f"model {request.model!r} not offered")
    if bp.best_quality < tier.min_quality:
        return Rejection(name, RejectReason.QUALITY_BELOW_TIER,
                         f"quality {bp.best_quality} < tier minimum {tier.min_quality}")
    if rule is not None:
        if rule.allow is not None and name not in rule.allow:
            return Rejection(name, RejectReason.RULE_DENY, f"rule {rule.name!r} allows only {rule.allow}")
        if rule.deny is not None and name in rule.deny:
            return Rejection(name, RejectReason.RULE_DENY, f"rule {rule.name!r} denies it")
    if not view.sizes.allows(request.width, request.height):
        return Rejection(name, RejectReason.SIZE_UNSUPPORTED, f"size {request.width}x{request.height}")
    if request.n > view.max_n:
        return Rejection(name, RejectReason.N_UNSUPPORTED, f"n={request.n} > {view.max_n}")
    return None


def _rank_key(objective: Objective):
    # Ties go to the expected completion under live load (shortest expected delay), not the name: equal
    # deployments share traffic instead of one taking it all.
    if objective is Objective.MIN_LATENCY:
        return lambda c: (c.expected_ms, c.predicted_latency_ms, c.predicted_cost_usd, -c.quality, c.backend)
    if objective is Objective.MAX_QUALITY:
        return lambda c: (-c.quality, c.predicted_cost_usd, c.expected_ms, c.predicted_latency_ms, c.backend)
    return lambda c: (c.predicted_cost_usd, c.expected_ms, c.predicted_latency_ms, -c.quality, c.backend)


def decide(request: RouteRequest, policy: Policy, snapshot: Snapshot) -> Decision:
    """Filter, predict, drop what misses the SLA or the ceiling, rank by the objective."""
    tier_name = request.tier or policy.defaults.tier
    tier = policy.tiers.get(tier_name, _NO_TIER)
    index = policy.index
    rule = index.first_rule(request, tier_name)
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
    probes: list[Candidate] = []
    late: list[Candidate] = []  # predicted to miss the SLA only
    pooled: set[str] = set()  # queueing backends among the candidates (only they get release times)
    eligible = index.eligible(tier, rule)
    backends = policy.backends
    in_policy = 0
    api_floor_usd = math.inf  # the cheapest API that may serve it, in time or not: what the pool saves it
    pool_seen: tuple[str, PoolModel, int] | None = None
    alone_ms: dict[str, float] = {}  # a pool that pre-empts: its prediction against its pool-only work alone
    flexible_ms: dict[str, float] = {}  # ... and behind all its work, as flexible work waits
    for view in snapshot.backends:
        name = view.name
        bp = backends.get(name)
        in_policy += bp is not None
        if not _passes(view, name in eligible, request):
            rejected.append(_static_rejection(view, bp, request, tier, rule))  # says which check failed
            continue
        assert bp is not None
        pool = view.pool
        steps = tier.pool_steps(request.steps, view.default_steps) if pool is not None else \
            request.steps or view.default_steps
        quality = bp.quality_at(steps)
        if quality < tier.min_quality:
            rejected.append(Rejection(name, RejectReason.QUALITY_BELOW_TIER,
                                      f"quality {quality} at {steps} steps < tier minimum {tier.min_quality}"))
            continue
        latency = view.latency.predict(request, steps, policy.latency_quantile, pool, sla_ms) + view.wait_ms
        preempts = False
        if pool is not None and pool.preemptive:
            alone_ms[name] = view.latency.predict(request, steps, policy.latency_quantile, pool.pool_only(),
                                                  sla_ms) + view.wait_ms
            flexible_ms[name] = latency
            if latency > sla_ms:  # late as flexible work: predicted as work that pre-empts it (kept if pool-only)
                latency, preempts = alone_ms[name], True
        cost = predicted_cost_usd(view, bp, request, steps, policy.cost_accounting)
        if pool is None:
            api_floor_usd = min(api_floor_usd, cost)
        elif pool_seen is None:
            pool_seen = (name, pool, steps)
        if pool is not None and tier.local_max_ms is not None and latency > tier.local_max_ms:
            rejected.append(Rejection(name, RejectReason.SLA_MISS,
                                      f"predicted {latency:.0f} ms > tier's local_max_ms {tier.local_max_ms}"))
            continue
        if latency > sla_ms:
            if pool is not None and pool.has_headroom and not pool.profile.observed(pool.model, request.width,
                                                                                   request.height, steps):
                probes.append(Candidate(name, request.model or view.models[0], latency, cost, quality, steps,
                                        expected_ms=latency, probe=True))
                continue
            rejected.append(Rejection(name, RejectReason.SLA_MISS,
                                      f"predicted {policy.latency_quantile} {latency:.0f} ms > SLA {sla_ms} ms"))
            if max_cost is None or cost <= max_cost:  # the best effort, should nothing meet the SLA
                late.append(Candidate(name, request.model or view.models[0], latency, cost, quality, steps,
                                      expected_ms=latency, preempts=preempts))
            continue
        if max_cost is not None and cost > max_cost:
            rejected.append(Rejection(name, RejectReason.COST_CEILING,
                                      f"predicted ${cost:.6f} > ceiling ${max_cost:.6f}"))
            continue
        candidate = Candidate(name, request.model or view.models[0], latency, cost, quality, steps, preempts=preempts)
        if pool is None:
            candidate.p99_ms = view.latency.p99_ms + view.wait_ms
            candidate.expected_ms = view.latency.p50_ms * (1 + view.inflight) + view.wait_ms
        else:
            candidate.expected_ms = latency
            pooled.add(name)
            if (pool.pool_only() if preempts else pool).delays_committed(request, steps, sla_ms / 1000):
                reserve_bound.append((pool, candidate))
                continue
        candidates.append(candidate)

    # A pool place that would eat into committed jobs' slack reserve goes to other backends first; where
    # there is none, the request may still have it if no committed job is predicted to miss its deadline. With
    # the pool's reservation on, a request only the pool can serve has it anyway: the flexible jobs were admitted
    # predicted behind such requests (the reserved share), and a sure miss elsewhere buys a likely one here.
    alternatives = bool(candidates)
    for pool, candidate in reserve_bound:
        if not alternatives and (policy.reserve_pool or
                                 not pool.delays_committed(request, candidate.steps, sla_ms / 1000, reserve=1.0)):
            candidates.append(candidate)
        else:
            rejected.append(Rejection(candidate.backend, RejectReason.SLA_MISS,
                                      "would eat into the slack reserve of committed pool jobs"))

    if alone_ms and candidates:
        candidates = _pool_only_pre_empts(candidates, pooled, alone_ms, flexible_ms, sla_ms, rejected)
    pool_demand = _pool_demand(pool_seen, request, api_floor_usd)
    if policy.reserve_pool and candidates:
        candidates = _keep_reserved_room(candidates, pooled, snapshot, sla_ms, rejected, pool_demand)
    # A best-effort request nothing is predicted to serve in time is served all the same, a pool's try at a shape
    # it never measured included: bounded by the SLA, that try could not even start (a 1 s SLA against a 1 s guess).
    at_risk = not candidates and bool(late or probes) and tier.on_no_candidate == "best_effort"
    if at_risk:  # the one predicted to finish first, then the rest by the same prediction
        candidates = sorted([*late, *probes], key=lambda c: (c.predicted_latency_ms, c.predicted_cost_usd, c.backend))
        probes = []
        if policy.reserve_pool:  # a late job on a pressed pool would take the room of requests still on time
            candidates.sort(key=lambda c: _pressed_pool(snapshot, c))
    else:
        candidates.sort(key=_rank_key(objective))
    if probes:
        candidates = _with_probes(probes, candidates, sla_ms, rejected)
    if pooled:
        candidates = _with_release_times(candidates, pooled, snapshot, sla_ms)
    if in_policy < len(backends):
        for known in sorted(set(backends) - {v.name for v in snapshot.backends}):
            if request.backend in (None, known):
                rejected.append(Rejection(known, RejectReason.UNCONFIGURED, "not configured in this gateway"))
    return Decision(
        policy_version=policy.fingerprint,
        tier=tier_name,
        sla_ms=sla_ms,
        max_cost_usd=max_cost,
        objective=objective.value,
        rule=rule.name if rule else None,
        candidates=tuple(candidates),
        rejected=tuple(rejected),
        reason=_explain_at_risk(candidates, sla_ms, rule) if at_risk else _explain(objective, candidates, rule),
        hedge=rule.hedge if rule and rule.hedge is not None else (
            policy.dispatch.hedge or (policy.dispatch.hedge_pressed_pool and policy.reserve_pool and bool(candidates)
                                      and _pressed_pool(snapshot, candidates[0]))),
        at_risk=at_risk,
        pool_demand=pool_demand,
    )


def _pool_demand(pool_seen: tuple[str, PoolModel, int] | None, request: RouteRequest,
                 api_floor_usd: float) -> tuple[str, float, float] | None:
    """(the pool, GPU-seconds alone, USD it saves per GPU-second) where a pool may serve it (Decision.pool_demand)."""
    if pool_seen is None:
        return None
    name, pool, steps = pool_seen
    alone_s = pool.profile.seconds(pool.model, request.width, request.height, steps, request.n)
    return name, alone_s, api_floor_usd / alone_s if alone_s > 0 else math.inf


def _pool_only_pre_empts(candidates: list[Candidate], pooled: set[str], alone_ms: dict[str, float],
                         flexible_ms: dict[str, float], sla_ms: float, rejected: list[Rejection]) -> list[Candidate]:
    """On a pool that pre-empts, a request only the pool can serve in time goes ahead of the flexible work
    (predicted against the pool-only work alone); one another backend can serve in time is flexible work, and a
    place on the pool that only pre-emption would make in time is not its to take."""
    if any(c.backend not in pooled for c in candidates):
        kept = []
        for c in candidates:
            if c.preempts:
                rejected.append(Rejection(c.backend, RejectReason.SLA_MISS,
                                          f"predicted {flexible_ms[c.backend]:.0f} ms behind the pool's work > SLA "
                                          f"{sla_ms} ms; another backend can serve it in time"))
            else:
                kept.append(c)
        return kept
    for c in candidates:
        if c.backend in alone_ms:
            c.preempts = True
            c.predicted_latency_ms = c.expected_ms = alone_ms[c.backend]
    return candidates


def _pressed_pool(snapshot: Snapshot, candidate: Candidate) -> bool:
    view = snapshot.get(candidate.backend)
    return view is not None and view.pool is not None and view.pool.pressed


def _keep_reserved_room(candidates: list[Candidate], pooled: set[str], snapshot: Snapshot, sla_ms: float,
                        rejected: list[Rejection], demand: tuple[str, float, float] | None) -> list[Candidate]:
    """A request that other backends can serve in time is predicted on the pool as if work only the pool can
    serve had the share of it such work has been taking (policies.reservation); if it would then miss its SLA it
    goes elsewhere, leaving the room to the work that has nowhere else to go; so does every such request while
    that work has taken a saturating share of the pool over the last minute (PoolModel.saturated), unless it fits
    on an idle worker between such work's arrivals (PoolModel.fits_between). The same holds against recent
    requests that valued the pool more per GPU-second (`demand`: PoolModel.denser_delay_s), whichever delays it
    more: where the pool is short, the work that saves least per GPU-second is the work to send elsewhere."""
    if all(c.backend in pooled for c in candidates):
        return candidates
    own_s, value = (demand[1], demand[2]) if demand else (math.inf, math.inf)  # a pooled candidate sets it
    kept = []
    for c in candidates:
        pool = snapshot.get(c.backend).pool if c.backend in pooled else None
        if pool is not None and pool.saturated and not pool.fits_between(own_s):
            rejected.append(Rejection(c.backend, RejectReason.RESERVED,
                                      f"work only the pool can serve took {pool.sustained_share:.0%} of it over the "
                                      "last minute; another backend can serve this one in time"))
            continue
        reserved_ms = pool.reserved_delay_s(sla_ms / 1000) * 1000 if pool is not None else 0.0
        denser_ms = pool.denser_delay_s(sla_ms / 1000, value) * 1000 if pool is not None else 0.0
        delay_ms = max(reserved_ms, denser_ms)
        if delay_ms and c.predicted_latency_ms + delay_ms > sla_ms:
            kept_for = (f"the {pool.reserved_share:.0%} of the pool kept for requests only it can serve"
                        if reserved_ms >= denser_ms else "requests worth more per GPU-second that overtake it")
            rejected.append(Rejection(c.backend, RejectReason.RESERVED,
                                      f"predicted {c.predicted_latency_ms:.0f} ms + {delay_ms:.0f} ms for {kept_for} "
                                      f"> SLA {sla_ms} ms; another backend can serve this one in time"))
        else:
            kept.append(c)
    return kept


def _with_probes(probes: list[Candidate], candidates: list[Candidate], sla_ms: float,
                 rejected: list[Rejection]) -> list[Candidate]:
    """An idle pool with no measurement of this shape goes first when the SLA leaves room for the next candidate
    after it (or there is none): the pool learns the shape's real time; else it is refused as before."""
    slack_ms = sla_ms - candidates[0].predicted_latency_ms if candidates else sla_ms
    for probe in probes:
        if slack_ms >= _PROBE_MIN_SLACK * sla_ms:
            candidates = [probe, *candidates]
        else:
            rejected.append(Rejection(probe.backend, RejectReason.SLA_MISS,
                                      f"predicted {probe.predicted_latency_ms:.0f} ms > SLA {sla_ms} ms (never "
                                      "measured; no slack to try it)"))
    return candidates


def _with_release_times(candidates: list[Candidate], pooled: set[str], snapshot: Snapshot,
                        sla_ms: float) -> list[Candidate]:
    """A queueing backend followed by another candidate may hold the job only while that one could still
    make the SLA at its p99; past that it must have started (see policies.batching on late binding)."""
    for candidate, following in zip(candidates, candidates[1:], strict=False):
        if candidate.probe:
            continue  # committed at once: predicted late by a guess, it would be given back unstarted
        if candidate.backend in pooled and (fallback := snapshot.get(following.backend)) is not None:
            candidate.start_within_ms = start_within_ms(sla_ms, fallback)  # built by this decide()
    return candidates


def start_within_ms(sla_ms: float, fallback: BackendView) -> float:
    """How long a queueing backend may hold a job before it must have started: while `fallback` could still make
    the SLA at its p99 (policies.batching on late binding)."""
    return max(0.0, sla_ms - fallback.latency.p99_ms)


def _explain_at_risk(candidates: list[Candidate], sla_ms: float, rule: Rule | None) -> str:
    via = f" under rule {rule.name!r}" if rule else ""
    best = candidates[0]
    return (f"no backend is predicted to meet the {sla_ms:.0f} ms SLA{via}; best effort (the tier's on_no_candidate) "
            f"on {best.backend}, predicted to finish first: {best.predicted_latency_ms:.0f} ms, "
            f"${best.predicted_cost_usd:.6f}")


def _explain(objective: Objective, candidates: list[Candidate], rule: Rule | None) -> str:
    via = f" under rule {rule.name!r}" if rule else ""
    if not candidates:
        return f"no backend meets the constraints{via}"
    best = candidates[0]
    if best.probe:
        return (f"{best.backend} tried first{via}: it never ran this shape, its guess of "
                f"{best.predicted_latency_ms:.0f} ms is unmeasured, and it is idle; "
                f"{len(candidates) - 1} fallback candidate(s)")
    return (
        f"{best.backend} ranks first by {objective.value}{via}: "
        f"predicted {best.predicted_latency_ms:.0f} ms, ${best.predicted_cost_usd:.6f}"
        f" among {len(candidates)} candidate(s)"
        + ("; only it serves this in time: it goes ahead of the pool's flexible work" if best.preempts else "")
    )
