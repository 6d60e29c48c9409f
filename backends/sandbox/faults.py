"""How each emulated provider misbehaves: latency distribution and fault rates, as data."""

from __future__ import annotations

import math
import random

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["FaultProfile", "SandboxConfig", "Verdict", "draw"]


class FaultProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latency_p50_ms: float = Field(400, ge=0)
    latency_p95_ms: float = Field(1500, ge=0)
    error_rate: float = Field(0.0, ge=0, le=1, description="500/503 answers")
    rate_limit_rate: float = Field(0.0, ge=0, le=1, description="429 answers with Retry-After")
    hang_rate: float = Field(0.0, ge=0, le=1, description="never answer (until hang_s)")
    malformed_rate: float = Field(0.0, ge=0, le=1, description="200 with truncated JSON")
    content_violation_rate: float = Field(0.0, ge=0, le=1)
    job_error_rate: float = Field(0.0, ge=0, le=1, description="async jobs (Bria) accepted, then ending in ERROR")
    retry_after_s: float = Field(1.0, ge=0)
    hang_s: float = Field(600.0, ge=0)


class SandboxConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    seedream: FaultProfile = FaultProfile(latency_p50_ms=900, latency_p95_ms=2500)
    gemini: FaultProfile = FaultProfile(latency_p50_ms=1500, latency_p95_ms=4000)
    reve: FaultProfile = FaultProfile(latency_p50_ms=700, latency_p95_ms=2000)
    bria: FaultProfile = FaultProfile(latency_p50_ms=1200, latency_p95_ms=3000)

    def profile(self, provider: str) -> FaultProfile:
        return getattr(self, provider)


class Verdict(BaseModel):
    """What the sandbox will do with one request."""

    latency_s: float
    fault: str | None = None  # error | rate_limit | hang | malformed | content_violation | job_error


def draw(profile: FaultProfile, rng: random.Random) -> Verdict:
    """Lognormal latency fitted to p50/p95, then at most one fault by its rate."""
    p50 = max(profile.latency_p50_ms, 1e-3)
    sigma = math.log(max(profile.latency_p95_ms, p50) / p50) / 1.645
    latency = rng.lognormvariate(math.log(p50), sigma) / 1000 if profile.latency_p50_ms > 0 else 0.0
    roll = rng.random()
    for fault, rate in (("error", profile.error_rate), ("rate_limit", profile.rate_limit_rate),
                        ("hang", profile.hang_rate), ("malformed", profile.malformed_rate),
                        ("content_violation", profile.content_violation_rate), ("job_error", profile.job_error_rate)):
        if roll < rate:
            return Verdict(latency_s=latency, fault=fault)
        roll -= rate
    return Verdict(latency_s=latency)
