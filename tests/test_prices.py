"""Prices as providers charge them: a price list by size, quality and model predicts a request's cost; the
provider's reported usage settles it; predicted and settled sit side by side in the audit, /admin/stats (with a
warning when they drift apart) and the metrics."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest
import respx

from backends.protocol import GenerationResult
from policies.costs import predicted_cost_usd, settled_cost_usd
from policies.schema import BackendPolicy, Policy
from policies.types import RouteRequest
from tests.fakes import ScriptedBackend
from tests.test_admin import ADMIN, admin, wait_audited

GEMINI = BackendPolicy.model_validate({
    "quality": 0.95, "price_per_image_usd": 0.134,
    "prices": [{"max_megapixels": 4.2, "usd_per_image": 0.134}, {"usd_per_image": 0.24}],
    "billed": {"unit": "token", "usd": 0.00012}})


def api_view():
    return SimpleNamespace(pool=None)  # an API: no pool model (all the cost functions read)


def test_the_first_matching_line_prices_a_request_and_the_flat_price_is_the_fallback():
    reve = BackendPolicy.model_validate({
        "quality": 0.8, "price_per_image_usd": 0.024,
        "prices": [{"model": ["reve-remix"], "usd_per_image": 0.04},
                   {"quality": ["hd", "high"], "max_megapixels": 1.1, "usd_per_image": 0.03}]})
    assert reve.price_per_image(1.05, None, None) == 0.024
    assert reve.price_per_image(1.05, "hd", None) == 0.03
    assert reve.price_per_image(2.0, "hd", None) == 0.024  # too big for that line
    assert reve.price_per_image(2.0, "hd", "reve-remix") == 0.04
    assert GEMINI.price_per_image(2048 * 2048 / 1e6, None, None) == 0.134  # 2K
    assert GEMINI.price_per_image(4096 * 4096 / 1e6, None, None) == 0.24  # 4K


def test_prediction_uses_the_price_list_and_settlement_the_reported_usage():
    four_k = RouteRequest(width=4096, height=4096, n=2)
    assert predicted_cost_usd(api_view(), GEMINI, four_k, 30, Policy().cost_accounting) == pytest.approx(0.48)
    settle = lambda **kw: settled_cost_usd(api_view(), GEMINI, Policy().cost_accounting, 2, None, 0.48, **kw)  # noqa: E731
    assert settle(billed_units=4000, per_image_usd=0.24) == pytest.approx(0.48)  # 2 x 2000 tokens at $120/1M
    assert settle(billed_units=2240, per_image_usd=0.24) == pytest.approx(0.2688)  # what Google said it billed
    assert settle(billed_units=None, per_image_usd=0.24) == pytest.approx(0.48)  # no report: the list


def test_an_invalid_price_list_is_refused_with_its_path():
    from policies.schema import Policy as P

    with pytest.raises(ValueError) as err:
        P.model_validate({"backends": {"reve": {"quality": 0.8, "prices": [{"usd_per_image": -1}]}}})
    assert "backends.reve.prices.0.usd_per_image" in str(err.value)
    with pytest.raises(ValueError):
        P.model_validate({"backends": {"g": {"quality": 0.9, "billed": {"unit": "pixel", "usd": 1}}}})


@respx.mock
async def test_gemini_bills_its_image_tokens_not_the_text_around_them():
    from backends.protocol import GenerationJob
    from tests.test_providers import B64, make, route, soon
    from tests.test_providers import GEMINI as GEMINI_CONFIG

    route(respx, "gemini").respond(200, json={
        "candidates": [{"content": {"parts": [{"text": "here"}, {"inlineData": {"mimeType": "image/png",
                                                                               "data": B64}}]}}],
        "usageMetadata": {"candidatesTokenCount": 1130,
                          "candidatesTokensDetails": [{"modality": "TEXT", "tokenCount": 10},
                                                      {"modality": "IMAGE", "tokenCount": 1120}]}})
    result = await make(GEMINI_CONFIG).generate(GenerationJob(id="j", prompt="p", width=1024, height=1024), soon())
    assert result.billed_units == 1120


class BilledBackend(ScriptedBackend):
    """An API that reports the usage it billed, as Gemini does in usageMetadata."""

    def __init__(self, *args, billed: float, **kw):
        super().__init__(*args, **kw)
        self.billed = billed

    async def generate(self, job, deadline) -> GenerationResult:
        import dataclasses

        return dataclasses.replace(await super().generate(job, deadline), billed_units=self.billed)


@pytest.fixture
def drifting(settings, shipped_policy, serve, monkeypatch):
    """Gemini priced at $0.134 by the list, but it reports 2000 image tokens ($0.24) for each image."""
    monkeypatch.setenv("IMAGEGW_ADMIN_KEY", ADMIN)
    policy = shipped_policy.model_copy(update={"backends": {**shipped_policy.backends, "gemini": GEMINI}})
    return serve(settings, policy, {"gemini": BilledBackend("gemini", models=("gemini-3-pro-image-preview",),
                                                              billed=2000)})


def test_predicted_and_settled_cost_are_audited_counted_and_a_drift_is_warned_of(drifting):
    answers = [httpx.post(drifting.base_url + "/v1/images/generations", timeout=30,
                          json={"prompt": f"p{i}", "size": "1024x1024", "model": "gemini"}) for i in range(3)]
    assert all(a.status_code == 200 for a in answers)
    assert answers[0].headers["x-gateway-cost-usd"] == "0.240000"  # settled from the reported tokens
    wait_audited(drifting, 3)
    record = admin(drifting, "GET", f"/admin/audit/{answers[0].headers['x-gateway-decision-id']}").json()
    assert record["cost_predicted_usd"] == pytest.approx(0.134) and record["cost_usd"] == pytest.approx(0.24)
    assert record["billed_units"] == 2000
    row = next(r for r in admin(drifting, "GET", "/admin/stats").json()["backends"] if r["backend"] == "gemini")
    assert row["cost_predicted_usd"] == pytest.approx(0.402) and row["cost_usd"] == pytest.approx(0.72)
    assert row["cost_drift"] == pytest.approx(0.72 / 0.402 - 1) and "price list" in row["warning"]
    metrics = httpx.get(drifting.base_url + "/metrics").text
    assert 'imagegw_cost_predicted_usd_total{backend="gemini"} 0.402' in metrics
    assert json.dumps(record).count("sk-") == 0
