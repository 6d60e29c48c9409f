"""Bad input gets a 4xx in OpenAI's error shape naming the field; never a 500."""

from __future__ import annotations

import json

import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from policies.types import BackendKind
from tests.fakes import ScriptedBackend


@pytest.fixture
def client(settings, shipped_policy):
    backends = {"local": ScriptedBackend("local", kind=BackendKind.LOCAL, models=("tiny",))}
    with TestClient(create_app(settings, shipped_policy, backends)) as c:
        yield c


BAD = [
    ("n=0", {"prompt": "x", "n": 0}, "n"),
    ("n=11", {"prompt": "x", "n": 11}, "n"),
    ("n as a string", {"prompt": "x", "n": "2"}, "n"),
    ("n as a float", {"prompt": "x", "n": 1.5}, "n"),
    ("n as a bool", {"prompt": "x", "n": True}, "n"),
    ("size not WxH", {"prompt": "x", "size": "abc"}, "size"),
    ("size too small", {"prompt": "x", "size": "8x8"}, "size"),
    ("size as a number", {"prompt": "x", "size": 1024}, "size"),
    ("missing prompt", {"n": 1}, "prompt"),
    ("empty prompt", {"prompt": ""}, "prompt"),
    ("prompt not a string", {"prompt": ["a"]}, "prompt"),
    ("100 KB prompt", {"prompt": "x" * 100_000}, "prompt"),
    ("unknown model", {"prompt": "x", "model": "dall-e-9"}, "model"),
    ("unknown model of a known backend", {"prompt": "x", "model": "local/nope"}, "model"),
    ("bad response_format", {"prompt": "x", "response_format": "jpeg"}, "response_format"),
    ("unknown tier", {"prompt": "x", "tier": "platinum"}, "tier"),
    ("negative sla", {"prompt": "x", "sla_ms": -5}, "sla_ms"),
    ("negative cost ceiling", {"prompt": "x", "max_cost_usd": -1}, "max_cost_usd"),
    ("seed out of range", {"prompt": "x", "seed": -1}, "seed"),
    ("steps too many", {"prompt": "x", "steps": 10_000}, "steps"),
    ("tags not strings", {"prompt": "x", "tags": [1]}, "tags"),
    ("streaming asked for", {"prompt": "x", "stream": True}, "stream"),
    ("quality unknown", {"prompt": "x", "quality": "ultra"}, "quality"),
]


@pytest.mark.parametrize(("body", "param"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_field_gets_400_naming_it(client, body, param):
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"
    assert param in err["message"]


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1, 2]", b'"a string"', b"{", b"null"])
def test_body_that_is_not_a_json_object_gets_400(client, raw):
    r = client.post("/v1/images/generations", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_json"


def test_oversized_body_gets_413_in_openai_shape(client):
    r = client.post("/v1/images/generations", content=json.dumps({"prompt": "x" * 2_000_000}))
    assert r.status_code == 413
    assert set(r.json()["error"]) >= {"message", "type", "param", "code"}


def test_unknown_route_is_404_in_openai_shape(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404
    assert r.json()["error"]["message"] == "GET /v1/nothing: no such path; the API is described at GET /openapi.json"


def test_a_method_a_route_does_not_take_is_405_naming_those_it_does(client):
    r = client.get("/v1/images/generations")
    assert r.status_code == 405
    assert r.json()["error"]["message"] == "GET is not allowed on /v1/images/generations; allowed: POST, OPTIONS"


def test_every_openai_images_field_is_accepted(client):
    r = client.post("/v1/images/generations", json={
        "prompt": "x", "size": "256x256", "style": "vivid", "output_compression": 50, "background": "opaque",
        "moderation": "auto", "stream": False, "partial_images": 0, "quality": "high", "user": "u1",
        "output_format": "png", "response_format": "b64_json", "n": 1, "model": "auto"})
    assert r.status_code == 200, r.text


def test_an_unknown_field_is_a_400_naming_it_so_a_typo_never_drops_a_constraint(client):
    r = client.post("/v1/images/generations", json={"prompt": "x", "size": "256x256", "max_cost": 0.0})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "max_cost" and err["code"] == "unknown_parameter" and "max_cost_usd" in err["message"]


def test_no_candidate_is_503_listing_every_rejected_backend(client):
    r = client.post("/v1/images/generations", json={"prompt": "x", "size": "4096x4096"})
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == "no_candidate"
    rejected = {x["backend"]: x["reason"] for x in err["rejected"]}
    assert rejected["local"] == "rule_deny"  # big images go to APIs by the shipped policy
    assert rejected["seedream"] == "unconfigured"
    assert "rule_deny" in err["message"]


def test_models_lists_auto_backends_and_their_models(client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["auto", "local", "local/tiny"]


def test_openapi_describes_the_generation_body(client):
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/images/generations"]["post"]["requestBody"]["content"]["application/json"]
    assert "prompt" in body["schema"]["properties"]


def test_openai_model_names_route_automatically(client):
    r = client.post("/v1/images/generations", json={"prompt": "x", "size": "256x256", "model": "dall-e-3"})
    assert r.status_code == 200 and r.headers["x-gateway-backend"] == "local"


def test_the_openapi_document_says_what_the_server_does(client):
    doc = client.get("/openapi.json").json()
    gen = doc["paths"]["/v1/images/generations"]["post"]
    assert {"400", "401", "413", "429", "502", "503", "504"} <= set(gen["responses"])
    assert gen["responses"]["503"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert {"x-should-retry", "retry-after"} <= set(gen["responses"]["503"]["headers"])
    assert "x-gateway-backend" in gen["responses"]["200"]["headers"]
    props = gen["requestBody"]["content"]["application/json"]["schema"]["properties"]
    steps = next(s for s in props["steps"]["anyOf"] if s.get("type") == "integer")
    assert steps["maximum"] == 150  # the server's limit (limits.max_steps), not the model's 500
    assert "standard" in next(s for s in props["tier"]["anyOf"] if "enum" in s)["enum"]
    export = doc["paths"]["/admin/audit/export"]["get"]["responses"]["200"]["content"]
    assert list(export) == ["application/x-ndjson"]
    limit = next(p for p in doc["paths"]["/admin/audit"]["get"]["parameters"] if p["name"] == "limit")
    assert (limit["schema"]["minimum"], limit["schema"]["maximum"]) == (1, 1000)
    assert set(doc["paths"]["/admin/policy"]) >= {"get", "put"}
    assert client.options("/admin/policy").status_code in (204, 401)


def test_an_integral_float_is_an_integer_as_json_schema_says(client):
    assert client.post("/v1/images/generations", json={"prompt": "x", "size": "256x256", "n": 1.0}).status_code == 200
    assert client.post("/v1/images/generations", json={"prompt": "x", "size": "256x256", "n": 1.5}).status_code == 400


def test_the_docs_page_needs_nothing_from_the_network(client):
    import re

    page = client.get("/schema")
    assert page.status_code == 200
    assert not re.findall(r"https?://", page.text)  # no CDN: scripts, styles and icon are served here
    for url in re.findall(r'(?:src|href)=["\'](/[^"\']+)', page.text):
        assert client.get(url).status_code == 200, url
