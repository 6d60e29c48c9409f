"""Whether an async job waits for idle pool capacity: a pure function of the job's slack, the pool's state and
the quickest way the job could still be served (from `decide()`'s candidates)."""

from __future__ import annotations

from .schema import JobsPolicy
from .types import Decision

__all__ = ["hold_for_s"]


def hold_for_s(slack_s: float, pool_idle: bool | None, decision: Decision, rule: JobsPolicy) -> float:
    """Seconds to hold the job before deciding again; 0 runs it now.

    Runs now when holding is off, when there is no pool (None) or it is idle, when nothing can serve the job
    (it fails now rather than later), or when after one more wait the quickest candidate would no longer have
    its predicted time plus the margin left."""
    if not rule.hold_for_idle_pool or pool_idle is None or pool_idle or not decision.candidates:
        return 0.0
    quickest_s = min(c.predicted_latency_ms for c in decision.candidates) / 1000
    if slack_s - rule.recheck_s < quickest_s + rule.margin_s:
        return 0.0
    return rule.recheck_s
