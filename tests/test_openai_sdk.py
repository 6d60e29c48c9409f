"""The official openai SDK against a real running gateway with the tiny local diffusion pool."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from gateway.audit import open_reader


@pytest.fixture
def gateway(settings, shipped_policy, serve):
    return serve(settings, shipped_policy)  # real local backend: tiny preset on CPU


@pytest.fixture
def client(gateway):
    return openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="unused", max_retries=0)


def test_b64_json_returns_a_png_of_the_requested_size(client):
    result = client.images.generate(prompt="a red fox in snow", size="256x256", response_format="b64_json")
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.format == "PNG"
    assert image.size == (256, 256)


def test_url_returns_a_fetchable_png(client):
    result = client.images.generate(prompt="a lighthouse", size="256x256", response_format="url", n=2)
    assert len(result.data) == 2
    for item in result.data:
        r = httpx.get(item.url)
        assert r.status_code == 200
        assert r.headers["content-type"] == "image/png"
        assert r.headers["content-disposition"] == f'inline; filename="{item.url.rsplit("/", 1)[1]}"'
        assert Image.open(io.BytesIO(r.content)).size == (256, 256)
    assert result.data[0].url != result.data[1].url


def test_gateway_headers_are_readable_with_raw_response(client, gateway, settings):
    raw = client.images.with_raw_response.generate(
        prompt="a cat", size="256x256", extra_body={"tier": "draft", "seed": 7, "steps": 2})
    assert raw.headers["x-gateway-backend"] == "local"
    assert float(raw.headers["x-gateway-cost-usd"]) > 0
    assert raw.headers["x-gateway-policy-version"]
    decision_id = raw.headers["x-gateway-decision-id"]
    raw.parse()
    gateway.stop()  # a clean shutdown drains the audit log
    record = open_reader(settings).get(decision_id)
    assert record["backend"] == "local"
    assert record["decision"]["tier"] == "draft"
    assert record["decision"]["candidates"][0]["backend"] == "local"
    assert {r["backend"] for r in record["decision"]["rejected"]} >= {"seedream", "gemini", "reve", "bria"}
    assert record["attempts"][0]["outcome"] == "ok"
    assert record["sla_met"] is True
    assert "prompt" not in record["request"] and record["request"]["prompt_sha256"]


def test_sdk_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="x", n=11)
    assert bad.value.body["param"] == "n"
    with pytest.raises(openai.InternalServerError) as none:  # 503: nothing can serve a 4096 px image
        client.images.generate(prompt="x", size="4096x4096")
    assert none.value.status_code == 503


def test_an_openai_images_endpoint_the_gateway_does_not_serve_says_so_and_what_it_serves(client):
    png = io.BytesIO()
    Image.new("RGB", (64, 64)).save(png, format="PNG")
    with pytest.raises(openai.NotFoundError) as edit:
        client.images.edit(image=("in.png", png.getvalue(), "image/png"), prompt="add a hat")
    assert "image edits are not served" in edit.value.message and "/v1/images/generations" in edit.value.message
    with pytest.raises(openai.NotFoundError) as variation:
        client.images.create_variation(image=("in.png", png.getvalue(), "image/png"))
    assert "image variations are not served" in variation.value.message


def test_same_seed_same_image_and_another_seed_another(client):
    a = client.images.generate(prompt="seeded", size="256x256", extra_body={"seed": 42, "steps": 2})
    b = client.images.generate(prompt="seeded", size="256x256", extra_body={"seed": 42, "steps": 2})
    c = client.images.generate(prompt="seeded", size="256x256", extra_body={"seed": 43, "steps": 2})
    assert a.data[0].b64_json == b.data[0].b64_json
    assert a.data[0].b64_json != c.data[0].b64_json  # the seed is honoured, not ignored
