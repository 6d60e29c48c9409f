"""One request's audit record, collected as the request goes (decision, attempts, outcome) and built once."""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING

from policies.schema import Policy
from policies.types import Decision

from .dispatch import Attempt, DispatchOutcome
from .errors import GatewayError
from .schemas import GenerationRequest

if TYPE_CHECKING:
    from .service import RequestContext

__all__ = ["AuditDraft"]


class AuditDraft:
    """Collects one request's audit record as it goes; `finish()` returns the final dict."""

    def __init__(self, ctx: RequestContext, entry):
        self.ctx = ctx
        self.policy_version = entry.version
        self.policy_fingerprint = entry.policy.fingerprint
        self.decision: Decision | None = None
        self.attempts: list[Attempt] = []
        self.request: dict | None = None  # stays None when the body did not parse
        self.result: dict = {"outcome": "error", "status": 500, "backend": None, "cost_usd": 0.0}

    def describe(self, req: GenerationRequest, policy: Policy) -> None:
        self.request = {
            "prompt_sha256": hashlib.sha256(req.prompt.encode()).hexdigest(),
            "prompt_chars": len(req.prompt),
            **({"prompt": req.prompt} if policy.record_prompt_text else {}),
            "n": req.n, "size": req.size, "quality": req.quality, "model": req.model,
            "response_format": req.response_format, "tier": req.tier, "sla_ms": req.sla_ms,
            "max_cost_usd": req.max_cost_usd, "steps": req.steps, "seed": req.seed,
            "tags": req.tags, "user": req.user,
        }

    def succeed(self, outcome: DispatchOutcome, cost: float, size: str) -> None:
        made = f"{outcome.result.width}x{outcome.result.height}"
        self.result = {
            "outcome": "ok", "status": 200, "backend": outcome.candidate.backend,
            "size_delivered": size, **({"size_made": made} if made != size else {}),
            "model": outcome.result.model, "cost_usd": cost, "images": len(outcome.result.images),
            "cost_predicted_usd": outcome.candidate.predicted_cost_usd,
            "provider_request_id": outcome.result.provider_request_id,
            "billed_units": outcome.result.billed_units,
            "gpu_seconds": outcome.result.gpu_seconds,
            "hedge_cost_usd": outcome.hedge_cost_usd,
            "batch_size": outcome.result.extra.get("batch_size"),
            "steps": outcome.candidate.steps,  # what ran: a tier's steps or max_steps may differ from the ask
            "sandbox": bool(outcome.result.extra.get("sandbox")),
        }

    def replay(self, original_id: str | None) -> None:
        """An Idempotency-Key retry answered with the first answer: nothing ran, nothing was charged."""
        self.result = {"outcome": "replayed", "status": 200, "backend": None, "cost_usd": 0.0,
                       "replay_of": original_id}

    def cached(self, found, kind: str) -> None:
        """Served images an identical request got (`hit`: the result cache; `shared`: made once for requests in
        flight together): no backend ran, nothing is charged, the cost of making them again is saved."""
        self.result = {"outcome": "cached", "status": 200, "backend": "cache", "cost_usd": 0.0, "cache": kind,
                       "cost_saved_usd": found.cost_usd, "cached_from": found.made_by, "made_by_backend": found.backend,
                       "images": len(found.images), "size_delivered": found.size}

    def fail(self, exc: GatewayError) -> None:
        self.fail_with(exc.code or exc.type, exc.status, exc.message)

    def fail_with(self, code: str, status: int, message: str) -> None:
        self.result = {"outcome": "error", "status": status, "backend": None, "cost_usd": 0.0,
                       "error": {"code": code, "message": message}}

    def finish(self, ended: float | None = None) -> dict:
        latency_ms = ((time.monotonic() if ended is None else ended) - self.ctx.received_mono) * 1000
        d = self.decision
        sla_ms = d.sla_ms if d else None
        return {
            "id": self.ctx.id, "ts": self.ctx.received_wall, "tenant": self.ctx.tenant,
            "policy_version": self.policy_version, "policy_fingerprint": self.policy_fingerprint,
            "request": self.request,
            "decision": _decision_record(d) if d else None,
            "attempts": [a.as_record() for a in self.attempts],
            "latency_ms": round(latency_ms, 2),
            "sla_met": (self.result["outcome"] in ("ok", "cached") and latency_ms <= sla_ms) if sla_ms else None,
            **self.result,
        }


def _decision_record(d: Decision) -> dict:
    return {
        "tier": d.tier, "sla_ms": d.sla_ms, "max_cost_usd": d.max_cost_usd,
        "objective": d.objective, "rule": d.rule, "reason": d.reason, **({"at_risk": True} if d.at_risk else {}),
        "chosen": d.chosen.backend if d.chosen else None,
        "candidates": [
            {"backend": c.backend, "model": c.model, "predicted_latency_ms": round(c.predicted_latency_ms, 1),
             "predicted_cost_usd": c.predicted_cost_usd, "quality": c.quality, "steps": c.steps,
             **({"start_within_ms": round(c.start_within_ms, 1)} if c.start_within_ms is not None else {}),
             **({"probe": True} if c.probe else {}), **({"preempts": True} if c.preempts else {})}
            for c in d.candidates
        ],
        "rejected": [{"backend": r.backend, "reason": r.reason.value, "detail": r.detail}
                     for r in d.rejected],
    }
