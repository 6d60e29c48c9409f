"""The local pool behind the gateway: real requests over HTTP served in deadline-aware batches."""

from __future__ import annotations

import asyncio

import httpx

from gateway.audit import open_reader
from gateway.settings import WarmShapeSettings


def test_concurrent_requests_are_batched_and_the_snapshot_shows_the_pool(settings, shipped_policy, serve):
    settings.local.max_wait_ms = 80
    settings.local.max_batch = 4
    settings.local.warm_shapes = [WarmShapeSettings(width=64, height=64, steps=2)]
    server = serve(settings, shipped_policy)

    async def fire():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            return await asyncio.gather(*(
                client.post("/v1/images/generations",
                            json={"prompt": f"p{i}", "size": "64x64", "steps": 2, "seed": i})
                for i in range(12)))

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 and r.headers["x-gateway-backend"] == "local" for r in responses)
    local = next(b for b in httpx.get(server.base_url + "/v1/backends").json()["data"] if b["name"] == "local")
    assert local["pool"]["workers"] == 1 and local["pool"]["cost_per_image_usd"]["amortized"] > 0
    server.stop()
    records = open_reader(settings).recent(limit=50)
    sizes = [r["batch_size"] for r in records]
    assert len(records) == 12 and max(sizes) > 1 and max(sizes) <= 4
    assert all(r["gpu_seconds"] > 0 and r["cost_usd"] > 0 for r in records)
