"""Ops surface: API keys, policy admin with versions and rollback, file reload, audit query and stats."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import yaml

from gateway.auth import hash_key
from gateway.settings import ApiKeySettings
from policies.types import BackendKind
from tests.conftest import ROOT
from tests.fakes import ScriptedBackend

ADMIN = "test-admin-key"


@pytest.fixture
def gateway(settings, shipped_policy, serve, monkeypatch, tmp_path):
    monkeypatch.setenv("IMAGEGW_ADMIN_KEY", ADMIN)
    config = tmp_path / "config"
    config.mkdir()
    (config / "policy.yaml").write_text((ROOT / "config" / "policy.yaml").read_text())
    settings.config_dir = config
    settings.policy_reload_interval_s = 0.05
    backends = {"local": ScriptedBackend("local", kind=BackendKind.LOCAL, models=("tiny",)),
                "reve": ScriptedBackend("reve", models=("reve-create",))}
    return serve(settings, shipped_policy, backends)


def admin(server, method, path, **kw):
    return httpx.request(method, server.base_url + path, headers={"authorization": f"Bearer {ADMIN}"}, **kw)


def wait_audited(server, n: int, timeout: float = 10.0) -> None:
    """Until the audit log holds n records (it is written off the request path)."""
    deadline = time.monotonic() + timeout
    while len(admin(server, "GET", "/admin/audit", params={"limit": 1000}).json()["data"]) < n:
        assert time.monotonic() < deadline, f"fewer than {n} audit records after {timeout} s"
        time.sleep(0.02)


def generate(server, key=None, **body):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.base_url + "/v1/images/generations", headers=headers,
                      json={"prompt": "x", "size": "256x256", **body})


def test_admin_routes_need_an_admin_key_while_app_requests_may_be_anonymous(gateway):
    assert generate(gateway).status_code == 200  # quick start: no app keys configured
    assert httpx.get(gateway.base_url + "/admin/policy").status_code == 401
    wrong = httpx.get(gateway.base_url + "/admin/policy", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert admin(gateway, "GET", "/admin/policy").status_code == 200


def test_app_keys_map_to_tenants_and_cannot_reach_admin(settings, shipped_policy, serve, monkeypatch):
    monkeypatch.setenv("IMAGEGW_ADMIN_KEY", ADMIN)
    settings.auth.keys = [ApiKeySettings(key_sha256=hash_key("acme-key"), tenant="acme")]
    server = serve(settings, shipped_policy, {"local": ScriptedBackend("local", kind=BackendKind.LOCAL)})
    assert generate(server).status_code == 401  # app keys exist: anonymous is off
    ok = generate(server, key="acme-key")
    assert ok.status_code == 200
    forbidden = httpx.get(server.base_url + "/admin/policy", headers={"authorization": "Bearer acme-key"})
    assert forbidden.status_code == 403
    wait_audited(server, 2)
    record = admin(server, "GET", f"/admin/audit/{ok.headers['x-gateway-decision-id']}").json()
    assert record["tenant"] == "acme"
    page = admin(server, "GET", "/admin/audit", params={"outcome": "error"}).json()["data"]
    assert any(r["status"] == 401 for r in page)  # refused requests are audited too
    assert "acme-key" not in json.dumps(page)


def test_policy_validate_reports_errors_with_paths_and_warnings(gateway):
    bad = admin(gateway, "POST", "/admin/policy/validate", content="objective: cheapest\ntiers: {x: {min_quality: 3}}")
    assert bad.json()["valid"] is False
    assert any(e.startswith("objective") for e in bad.json()["errors"])
    policy = admin(gateway, "GET", "/admin/policy").json()["policy"]
    policy["rules"] = [{"name": "all", "match": {}}, {"name": "never", "match": {"tiers": ["premium"]}}]
    warned = admin(gateway, "POST", "/admin/policy/validate", content=json.dumps(policy)).json()
    assert warned["valid"] is True
    assert "rules[1] ('never') is unreachable" in "\n".join(warned["warnings"])
    policy["tiers"]["ultra"] = {"min_quality": 0.99}  # nothing can serve it: refused, with its path
    refused = admin(gateway, "POST", "/admin/policy/validate", content=json.dumps(policy)).json()
    assert refused["valid"] is False and any(e.startswith("tiers.ultra") for e in refused["errors"])


@pytest.mark.parametrize("body", ["", "{}", "null", "\n"])
def test_an_empty_policy_is_refused_and_the_running_one_stays(gateway, body):
    before = admin(gateway, "GET", "/admin/policy").json()["version"]
    r = admin(gateway, "PUT", "/admin/policy", content=body)
    assert r.status_code == 422 and "empty" in " ".join(r.json()["error"]["errors"])
    assert admin(gateway, "GET", "/admin/policy").json()["version"] == before
    assert generate(gateway).status_code == 200


def test_a_policy_leaving_a_tier_with_no_backend_is_refused_with_the_path(gateway):
    policy = admin(gateway, "GET", "/admin/policy").json()["policy"]
    policy["tiers"]["premium"]["min_quality"] = 0.999
    r = admin(gateway, "PUT", "/admin/policy", content=json.dumps(policy))
    assert r.status_code == 422 and any(e.startswith("tiers.premium") for e in r.json()["error"]["errors"])


@pytest.mark.parametrize("cursor", ["null", "abc", "1.5", "~", "1~ZZ"])
def test_a_malformed_audit_cursor_is_a_400_naming_it(gateway, cursor):
    r = admin(gateway, "GET", "/admin/audit", params={"cursor": cursor})
    assert r.status_code == 400 and r.json()["error"]["param"] == "cursor"


def test_replace_history_diff_and_rollback(gateway):
    v1 = admin(gateway, "GET", "/admin/policy").json()
    first = generate(gateway).headers
    assert first["x-gateway-policy-version"] == "1" and first["x-gateway-policy-fingerprint"] == v1["fingerprint"]
    changed = {**v1["policy"], "objective": "min_latency"}
    put = admin(gateway, "PUT", "/admin/policy", content=yaml.safe_dump(changed), params={"note": "faster"})
    assert put.status_code == 200 and put.json()["version"] == 2
    served = generate(gateway).headers
    assert served["x-gateway-policy-version"] == "2"
    assert served["x-gateway-policy-fingerprint"] == put.json()["fingerprint"]
    refused = admin(gateway, "PUT", "/admin/policy", content="objective: [")
    assert refused.status_code == 422 and refused.json()["error"]["errors"]
    assert admin(gateway, "GET", "/admin/policy").json()["version"] == 2  # the running policy stays
    history = admin(gateway, "GET", "/admin/policy/history").json()
    assert [v["version"] for v in history["versions"]] == [2, 1] and history["versions"][0]["author"] == "ops"
    diff = admin(gateway, "GET", "/admin/policy/diff", params={"from_": 1, "to": 2}).json()["diff"]
    assert "-objective: min_cost" in diff and "+objective: min_latency" in diff
    back = admin(gateway, "POST", "/admin/policy/rollback/1").json()
    assert back["version"] == 3 and back["fingerprint"] == v1["fingerprint"]
    assert admin(gateway, "POST", "/admin/policy/rollback/99").status_code == 404


def test_editing_the_policy_file_reloads_it_and_a_bad_edit_is_refused(gateway, settings):
    path = settings.config_dir / "policy.yaml"
    data = yaml.safe_load(path.read_text())
    data["objective"] = "min_latency"
    path.write_text(yaml.safe_dump(data))
    current = _poll(lambda: admin(gateway, "GET", "/admin/policy").json(), lambda c: c["version"] == 2)
    assert current["policy"]["objective"] == "min_latency"
    path.write_text("objective: [broken")
    current = _poll(lambda: admin(gateway, "GET", "/admin/policy").json(), lambda c: c["file_reload_error"])
    assert current["version"] == 2 and "not valid YAML" in current["file_reload_error"]


def _poll(read, ready, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if ready(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_audit_query_filters_pages_exports_and_stats(gateway):
    for i in range(7):
        generate(gateway, seed=i)
    generate(gateway, model="reve")
    wait_audited(gateway, 8)
    first = admin(gateway, "GET", "/admin/audit", params={"limit": 3, "backend": "local"}).json()
    assert len(first["data"]) == 3 and first["next_cursor"]
    rest = admin(gateway, "GET", "/admin/audit", params={"limit": 10, "backend": "local",
                                                          "cursor": first["next_cursor"]}).json()
    ids = [r["id"] for r in first["data"] + rest["data"]]
    assert len(ids) == 7 == len(set(ids)) and rest["next_cursor"] is None
    missed = admin(gateway, "GET", "/admin/audit", params={"sla_missed": "true"}).json()["data"]
    assert missed == []  # everything met its SLA
    version = first["data"][0]["policy_version"]
    assert version == 1 and first["data"][0]["policy_fingerprint"]  # one identity: the history's integer
    assert len(admin(gateway, "GET", "/admin/audit", params={"policy_version": version}).json()["data"]) == 8
    assert admin(gateway, "GET", "/admin/audit", params={"policy_version": 2}).json()["data"] == []
    lines = admin(gateway, "GET", "/admin/audit/export").text.strip().splitlines()
    assert len(lines) == 8 and all(json.loads(line)["id"] for line in lines)
    stats = {s["backend"]: s for s in admin(gateway, "GET", "/admin/stats").json()["backends"]}
    assert stats["local"]["requests"] == 7 and stats["reve"]["cost_per_image_usd"] == pytest.approx(0.024)
    assert stats["local"]["sla_attainment"] == 1.0 and stats["local"]["latency_ms"]["p95"] is not None


def _restart(settings, serve, server):
    server.stop()
    backends = {"local": ScriptedBackend("local", kind=BackendKind.LOCAL, models=("tiny",)),
                "reve": ScriptedBackend("reve", models=("reve-create",))}
    from gateway.config import load_policy

    return serve(settings, load_policy(settings), backends)


def test_an_api_change_survives_a_restart_and_an_untouched_file_never_replaces_it(gateway, settings, serve):
    v1 = admin(gateway, "GET", "/admin/policy").json()
    changed = {**v1["policy"], "objective": "min_latency"}
    assert admin(gateway, "PUT", "/admin/policy", content=json.dumps(changed), params={"note": "n"}).status_code == 200
    again = _restart(settings, serve, gateway)
    now = admin(again, "GET", "/admin/policy").json()
    assert now["version"] == 2 and now["policy"]["objective"] == "min_latency"
    history = admin(again, "GET", "/admin/policy/history").json()["versions"]
    assert [(v["version"], v["author"]) for v in history] == [(2, "ops"), (1, "startup")]
    assert generate(again).headers["x-gateway-policy-version"] == "2"


def test_a_file_edited_while_the_gateway_was_stopped_becomes_a_new_version_at_start(gateway, settings, serve):
    path = settings.config_dir / "policy.yaml"
    gateway.stop()
    text = path.read_text().replace("objective: min_cost", "objective: max_quality")
    assert "max_quality" in text
    path.write_text(text)
    again = _restart(settings, serve, gateway)
    now = admin(again, "GET", "/admin/policy").json()
    assert now["version"] == 2 and now["policy"]["objective"] == "max_quality" and now["author"] == "file"
    third = _restart(settings, serve, again)  # unchanged since: the history goes on as it was
    assert admin(third, "GET", "/admin/policy").json()["version"] == 2


def test_spend_without_redis_reports_this_replicas_books(gateway):
    for _ in range(2):
        assert generate(gateway, model="reve", size="1024x1024").status_code == 200
    spend = admin(gateway, "GET", "/admin/spend").json()
    assert spend["shared"] is False
    assert spend["data"] == [{"tenant": "anonymous", "day_usd": pytest.approx(0.048), "month_usd": pytest.approx(0.048),
                              "daily_limit_usd": None, "monthly_limit_usd": None}]


@pytest.mark.parametrize("params, param", [({"since": "yesterday"}, "since"), ({"limit": "many"}, "limit"),
                                           ({"sla_missed": "perhaps"}, "sla_missed")])
def test_a_query_value_that_does_not_parse_is_a_400_naming_it(gateway, params, param):
    r = admin(gateway, "GET", "/admin/audit", params=params)
    assert r.status_code == 400 and r.json()["error"]["param"] == param and param in r.json()["error"]["message"]


def test_a_diff_names_the_version_it_does_not_have(gateway):
    r = admin(gateway, "GET", "/admin/policy/diff", params={"from_": 1, "to": 9})
    assert r.status_code == 404 and r.json()["error"]["param"] == "to"


def test_a_body_over_the_limit_is_a_413_saying_the_limit(gateway):
    r = httpx.post(gateway.base_url + "/v1/images/generations", content=b"x" * 2_000_000)
    assert r.status_code == 413 and "1048576 byte limit" in r.json()["error"]["message"]
