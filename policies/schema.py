"""The routing policy as data: what ops edit, validated with a path for every error."""

from __future__ import annotations

import hashlib
from enum import StrEnum
from functools import cached_property
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .budgets import BudgetPolicy
from .index import PolicyIndex

__all__ = [
    "BackendPolicy",
    "CostAccounting",
    "Defaults",
    "Dispatch",
    "LatencyPrior",
    "Match",
    "Objective",
    "Policy",
    "Rule",
    "Tier",
]

Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]


class _Strict(BaseModel):
    # Unknown keys are typos in ops' files: refuse them rather than ignore them.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Objective(StrEnum):
    MIN_COST = "min_cost"  # cheapest that meets the SLA
    MIN_LATENCY = "min_latency"  # fastest within the cost ceiling
    MAX_QUALITY = "max_quality"  # best quality that meets SLA and ceiling


class CostAccounting(StrEnum):
    AMORTIZED = "amortized"  # GPU $/h x GPU-seconds per image at the occupancy we get
    MARGINAL = "marginal"  # reserved GPUs cost ~0 per extra image while there is headroom


class Tier(_Strict):
    min_quality: float = Field(0.0, ge=0.0, le=1.0, description="Lowest backend quality score allowed.")
    sla_ms: int | None = Field(None, gt=0, description="Default latency SLA for this tier.")
    max_cost_usd: float | None = Field(None, ge=0.0, description="Default cost ceiling per request.")
    local_max_ms: int | None = Field(
        None, gt=0, description="Longest predicted local-pool completion this tier accepts, below its SLA: keeps "
        "the pool's queue short enough for tighter tiers, sending this tier's overflow to the APIs first.")
    on_no_candidate: Literal["reject", "best_effort"] = Field(
        "reject", description="When no backend is predicted to meet the SLA: reject (503 no_candidate), or "
        "best_effort: serve on the one predicted to finish first, marked x-gateway-sla: at_risk and audited so "
        "(the simulator counts it as a miss when it is late).")
    steps: int | None = Field(None, ge=1, le=200, description="Denoising steps a pool image of this tier gets when "
                              "the request names none (the pool's own default otherwise): pool time is linear in "
                              "steps, so drafts at 20 cost two thirds of 30.")
    max_steps: int | None = Field(None, ge=1, le=200, description="Most steps a pool image of this tier takes: a "
                                  "request asking more gets this many (the audit records the steps used).")

    @model_validator(mode="after")
    def _steps_within_max(self) -> Tier:
        if self.steps is not None and self.max_steps is not None and self.steps > self.max_steps:
            raise ValueError(f"steps ({self.steps}) must be <= max_steps ({self.max_steps})")
        return self

    def pool_steps(self, requested: int | None, default: int) -> int:
        """The steps the pool runs for a request of this tier."""
        steps = requested or self.steps or default
        return min(steps, self.max_steps) if self.max_steps is not None else steps


class LatencyPrior(_Strict):
    p50_ms: float = Field(gt=0)
    p95_ms: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> LatencyPrior:
        if self.p95_ms < self.p50_ms:
            raise ValueError("p95_ms must be >= p50_ms")
        return self


class PriceRow(_Strict):
    """One line of a backend's price list; the first line that matches a request prices its images."""

    max_megapixels: float | None = Field(None, gt=0, description="Images up to this size (width x height / 1e6).")
    quality: list[str] | None = Field(None, min_length=1, description="Only requests asking one of these qualities "
                                      "(OpenAI's quality: low, medium, high, standard, hd, auto).")
    model: list[str] | None = Field(None, min_length=1, description="Only requests naming one of these provider "
                                    "models (\"model\": \"backend/model\").")
    usd_per_image: float = Field(ge=0.0)


class BilledUnit(_Strict):
    """What the provider reports it billed (its usage in the answer) and what one unit costs: a request is then
    settled from that report instead of the price list (the price list still predicts it)."""

    unit: Literal["image", "token", "credit"] = Field(description="What the provider counts: Seedream "
                                                      "usage.generated_images, Gemini's image output tokens, "
                                                      "Reve credits_used.")
    usd: float = Field(ge=0.0, description="The price of one unit (Gemini 3 Pro image tokens: 0.00012).")


class BackendPolicy(_Strict):
    enabled: bool = True
    quality: float = Field(ge=0.0, le=1.0, description="Quality score, compared with tiers' min_quality.")
    quality_by_steps: dict[int, float] = Field(
        default_factory=dict, description="The local pool's quality by denoising steps ({20: 0.6, 30: 0.7, 40: "
        "0.75}: the score of the highest line at or under the steps run, the lowest line's under them all; empty: "
        "`quality` at any steps).")
    price_per_image_usd: float | None = Field(
        None, ge=0.0, description="API list price per image (a request no `prices` line matches); null for the "
        "local pool (cost model)."
    )
    prices: list[PriceRow] = Field(default_factory=list, description="Price list by size, quality and model: "
                                   "the first matching line prices a request.")
    billed: BilledUnit | None = Field(None, description="Settle from the provider's reported usage.")
    latency_prior: LatencyPrior | None = Field(
        None, description="Latency assumed until enough outcomes are observed."
    )

    @field_validator("quality_by_steps")
    @classmethod
    def _scores(cls, value: dict[int, float]) -> dict[int, float]:
        for steps, score in value.items():
            if steps < 1 or not 0.0 <= score <= 1.0:
                raise ValueError(f"{steps}: steps must be >= 1 and the score within 0-1 (got {score})")
        return dict(sorted(value.items()))

    @property
    def best_quality(self) -> float:
        """The highest score it reaches at any steps (what a tier's minimum is first checked against)."""
        return max([self.quality, *self.quality_by_steps.values()])

    def quality_at(self, steps: int) -> float:
        if not self.quality_by_steps:
            return self.quality
        score = next(iter(self.quality_by_steps.values()))
        for at, value in self.quality_by_steps.items():
            if at <= steps:
                score = value
        return score

    def price_per_image(self, megapixels: float, quality: str | None, model: str | None) -> float:
        """The list price of one image of this request (0 when the backend has none: the local pool)."""
        for row in self.prices:
            if row.max_megapixels is not None and megapixels > row.max_megapixels + 1e-9:
                continue
            if row.quality is not None and quality not in row.quality:
                continue
            if row.model is not None and model not in row.model:
                continue
            return row.usd_per_image
        return self.price_per_image_usd or 0.0


class Defaults(_Strict):
    tier: Name = "standard"
    sla_ms: int = Field(60_000, gt=0)
    max_cost_usd: float | None = Field(None, ge=0.0)


class Dispatch(_Strict):
    """How a decision is carried out: retries, fallback on refusals, hedging."""

    max_attempts_per_backend: int = Field(2, ge=1, le=5, description="Tries of one backend on retryable errors.")
    backoff_initial_ms: int = Field(200, ge=0)
    backoff_max_ms: int = Field(4000, ge=0)
    fallback_on_content_refusal: bool = Field(
        False, description="May another backend try a prompt one provider's content policy refused?")
    hedge: bool = Field(False, description="Start the next candidate if the first is late (rules may override).")
    hedge_pressed_pool: bool = Field(
        True, description="Hedge a request placed on a pool that work only the pool can serve is pressing (its "
        "reserved share at least policies.reservation.PRESSED_SHARE) even where `hedge` is off: if the "
        "pool runs late, an API races it and a win withdraws the queued job, handing its room back to that work. "
        "It pays there and only there (docs/benchmarks.md, hedging).")
    last_candidate_attempts: int = Field(
        4, ge=1, le=10, description="Tries of the last candidate left (nowhere else to go) on retryable errors, "
        "within the deadline.")
    attempt_budget: bool = Field(
        True, description="An API attempt may take at most what leaves the next candidate its predicted latency "
        "before the deadline (a hung provider cannot use the whole SLA).")
    hedge_at_p99: bool = Field(
        True, description="An API call with no answer by its predicted p99 starts the next candidate too (the same "
        "backend again when it is the last), if the cost ceiling pays for both; the first answer wins, the loser "
        "is cancelled and audited.")


class Match(_Strict):
    """All given conditions must hold; an empty match matches every request."""

    tenants: list[str] | None = None
    tiers: list[str] | None = None
    tags_any: list[str] | None = None
    min_megapixels: float | None = Field(None, ge=0)
    max_megapixels: float | None = Field(None, ge=0)


class Rule(_Strict):
    name: Name
    match: Match = Match()
    allow: list[str] | None = Field(None, description="Only these backends may serve.")
    deny: list[str] | None = Field(None, description="These backends may not serve.")
    objective: Objective | None = None
    sla_ms: int | None = Field(None, gt=0)
    max_cost_usd: float | None = Field(None, ge=0.0)
    hedge: bool | None = None


class JobsPolicy(_Strict):
    """Async jobs (`POST /v1/images/jobs`), whose SLAs may be hours: hold them for idle pool capacity."""

    hold_for_idle_pool: bool = Field(
        True, description="While the pool is busy, a job whose deadline allows waits (in the job store, not in the "
        "pool's queue, so it never delays interactive work) and is decided again later; it runs as soon as the "
        "pool is idle, or when waiting longer would leave only just enough time for the quickest backend.")
    recheck_s: float = Field(60.0, gt=0, le=3600, description="How long a held job waits before it is decided again.")
    margin_s: float = Field(120.0, ge=0, description="Time kept in hand beyond the quickest backend's prediction "
                            "when deciding whether a job may wait another recheck_s.")


class ImagesPolicy(_Strict):
    """What is done to images before they are delivered."""

    exact_size: Literal["off", "resize", "crop"] = Field(
        "off", description="A provider delivered another size than asked: off (deliver it, and say so), resize "
        "(scale to the asked size) or crop (scale to cover, crop the centre).")

    @field_validator("exact_size", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        return "off" if value is False else value  # YAML reads a bare `off` as false


class Policy(_Strict):
    """Tiers, defaults, objective and ordered rules (first match wins)."""

    objective: Objective = Objective.MIN_COST
    latency_quantile: str = Field("p95", pattern="^(p50|p95)$")
    cost_accounting: CostAccounting = CostAccounting.AMORTIZED
    record_prompt_text: bool = Field(False, description="Store prompt text in the audit log (else a hash).")
    live_latency_min_samples: int = Field(
        20, ge=1, description="Successes observed before a backend's latency comes from outcomes, not its prior.")
    cost_drift_warn: float = Field(
        0.1, gt=0, description="/admin/stats warns when a backend's settled cost differs from its predicted cost by "
        "more than this share (a price list out of date).")
    reserve_pool: bool = Field(
        True, description="Keep pool capacity for requests only the pool can serve (their SLA is tighter than "
        "every other backend's prediction), from their recent arrivals: no pool batch runs longer than they can "
        "wait, and a request with other candidates is predicted on the pool without the share of it they take "
        "(trunk reservation; policies/reservation.py, docs/benchmarks.md).")
    defaults: Defaults = Defaults()
    dispatch: Dispatch = Dispatch()
    budgets: BudgetPolicy = BudgetPolicy()
    images: ImagesPolicy = ImagesPolicy()
    jobs: JobsPolicy = JobsPolicy()
    tiers: dict[Name, Tier] = Field(default_factory=lambda: {"standard": Tier()})
    backends: dict[Name, BackendPolicy] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references_resolve(self) -> Policy:
        errors: list[str] = []
        if self.defaults.tier not in self.tiers:
            errors.append(f"defaults.tier: unknown tier {self.defaults.tier!r}")
        names = [rule.name for rule in self.rules]
        for i, rule in enumerate(self.rules):
            if names.count(rule.name) > 1:
                errors.append(f"rules[{i}].name: duplicate rule name {rule.name!r}")
            # A rule may name a backend this policy does not list (the local pool switched off, say): that is a
            # warning (policies.lint), and the rule applies to the rest.
            for tier in rule.match.tiers or ():
                if tier not in self.tiers:
                    errors.append(f"rules[{i}].match.tiers: unknown tier {tier!r}")
        if self.budgets.on_limit == "downgrade_tier" and self.budgets.downgrade_to not in self.tiers:
            errors.append(f"budgets.downgrade_to: unknown tier {self.budgets.downgrade_to!r}")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    @cached_property
    def index(self) -> PolicyIndex:
        """This policy compiled for decide()'s hot path (rules as sets, memoized eligibility)."""
        return PolicyIndex(self)

    @cached_property
    def fingerprint(self) -> str:
        """A short content hash: the version label of this exact policy."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]
