"""A provider that delivers another size than asked is said so, and the policy may fit it to the asked size."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image

from backends.protocol import GeneratedImage, GenerationResult
from gateway.audit import open_reader
from policies.schema import Policy
from tests.fakes import ScriptedBackend, png


class OtherSize(ScriptedBackend):
    """Delivers 1000x1000 whatever was asked (as Reve does for 1024x1024)."""

    async def generate(self, job, deadline):
        self.calls.append(job)
        return GenerationResult(images=tuple(GeneratedImage(png(1000, 1000)) for _ in range(job.n)),
                                model="m1", width=1000, height=1000)


def _policy(mode: str) -> Policy:
    return Policy.model_validate({"defaults": {"tier": "standard", "sla_ms": 10_000},
                                  "tiers": {"standard": {"min_quality": 0.0}},
                                  "backends": {"reve": {"quality": 0.8, "price_per_image_usd": 0.02,
                                                        "latency_prior": {"p50_ms": 10, "p95_ms": 50}}},
                                  "images": {"exact_size": mode}})


@pytest.mark.parametrize("mode, delivered", [("off", (1000, 1000)), ("resize", (1024, 1024)),
                                             ("crop", (1024, 1024))])
def test_the_size_delivered_is_said_and_fitted_as_the_policy_says(mode, delivered, settings, serve):
    settings.local.enabled = False
    server = serve(settings, _policy(mode), {"reve": OtherSize("reve")})
    r = httpx.post(server.base_url + "/v1/images/generations", json={"prompt": "p", "size": "1024x1024"})
    assert r.status_code == 200
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    assert image.size == delivered and image.format == "PNG"
    assert r.headers["x-gateway-size"] == r.json()["size"] == f"{delivered[0]}x{delivered[1]}"
    server.stop()
    record = open_reader(settings).recent(1)[0]
    assert record["size_delivered"] == f"{delivered[0]}x{delivered[1]}"
    assert record.get("size_made") == (None if mode == "off" else "1000x1000")
