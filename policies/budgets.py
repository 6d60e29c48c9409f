"""Per-tenant spend limits as policy data, and what to do at the limit (pure)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["BudgetPolicy", "OnLimit", "TenantBudget"]


class OnLimit(StrEnum):
    REJECT = "reject"  # 429 with a clear message
    LOCAL_ONLY = "local_only"  # serve from the local pool only (near-zero marginal cost)
    DOWNGRADE_TIER = "downgrade_tier"  # re-route at a cheaper tier


class TenantBudget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    daily_usd: float | None = Field(None, ge=0)
    monthly_usd: float | None = Field(None, ge=0)


class BudgetPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default: TenantBudget | None = Field(None, description="Applies to tenants without their own entry.")
    tenants: dict[str, TenantBudget] = Field(default_factory=dict)
    on_limit: OnLimit = OnLimit.REJECT
    downgrade_to: str | None = Field(None, description="Tier used by downgrade_tier.")

    def for_tenant(self, tenant: str) -> TenantBudget | None:
        return self.tenants.get(tenant, self.default)
