"""Config is data: validated with every error's path, overridable from the environment."""

from __future__ import annotations

import json

import pytest

from gateway.cli import main
from gateway.config import ConfigError, load_settings, parse_policy
from tests.conftest import ROOT


def test_shipped_config_and_policy_load(settings, shipped_policy):
    assert settings.local.preset == "tiny"
    assert {"local", "seedream", "gemini", "reve", "bria"} <= set(shipped_policy.backends)


def test_environment_overrides_nested_settings(monkeypatch):
    monkeypatch.setenv("IMAGEGW_SERVER__PORT", "9123")
    monkeypatch.setenv("IMAGEGW_LOCAL__PRESET", "sd15")
    monkeypatch.setenv("IMAGEGW_BACKENDS__REVE__KIND", "reve")
    monkeypatch.setenv("IMAGEGW_BACKENDS__REVE__BASE_URL", "http://127.0.0.1:9/reve")
    s = load_settings(ROOT / "config")
    assert s.server.port == 9123 and s.server.host == "127.0.0.1"  # the rest of the file stays
    assert s.local.preset == "sd15"
    assert s.backends["reve"].base_url == "http://127.0.0.1:9/reve"


def test_bad_gateway_file_reports_every_error_with_its_path(tmp_path):
    (tmp_path / "gateway.yaml").write_text("server:\n  port: -1\n  hots: x\nlocal:\n  preset: huge\n")
    with pytest.raises(ConfigError) as err:
        load_settings(tmp_path)
    text = "\n".join(err.value.errors)
    assert "server.port" in text and "server.hots" in text and "local.preset" in text


def test_bad_policy_reports_every_error_with_its_path():
    bad = {
        "objective": "cheapest",
        "tiers": {"standard": {"min_quality": 2}},
        "backends": {"a": {"quality": 0.5, "pricee": 1}},
        "rules": [{"name": "r", "deny": ["ghost"]}],
    }
    with pytest.raises(ConfigError) as err:
        parse_policy(bad)
    text = "\n".join(err.value.errors)
    for path in ("objective", "tiers.standard.min_quality", "backends.a.pricee"):
        assert path in text, text


def test_policy_references_must_resolve():
    with pytest.raises(ConfigError) as err:
        parse_policy({"backends": {"a": {"quality": 0.5}}, "rules": [
            {"name": "r", "deny": ["ghost"], "match": {"tiers": ["gold"]}}]})
    assert "rules[0].deny: unknown backend 'ghost'" in str(err.value)
    assert "rules[0].match.tiers: unknown tier 'gold'" in str(err.value)


def test_serve_refuses_to_start_on_a_bad_file(tmp_path, capsys):
    (tmp_path / "gateway.yaml").write_text("server: {port: nope}\n")
    assert main(["serve", "--config", str(tmp_path)]) == 2
    assert "server.port" in capsys.readouterr().err


def test_policy_schema_is_exported_as_json_schema(capsys):
    assert main(["policy", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "Policy" and "rules" in schema["properties"]


def test_policy_validate_command(capsys, tmp_path):
    assert main(["policy", "validate", str(ROOT / "config" / "policy.yaml")]) == 0
    assert "valid" in capsys.readouterr().out
    bad = tmp_path / "p.yaml"
    bad.write_text("objective: fastest\n")
    assert main(["policy", "validate", str(bad)]) == 2
    assert "objective" in capsys.readouterr().err


def test_secrets_come_only_from_named_environment_variables(monkeypatch):
    monkeypatch.setenv("IMAGEGW_BACKENDS__REVE__KIND", "reve")
    monkeypatch.setenv("IMAGEGW_BACKENDS__REVE__BASE_URL", "http://x")
    monkeypatch.setenv("IMAGEGW_BACKENDS__REVE__API_KEY_ENV", "MY_REVE_KEY")
    monkeypatch.setenv("MY_REVE_KEY", "sk-secret")
    provider = load_settings(ROOT / "config").backends["reve"]
    assert provider.api_key().get_secret_value() == "sk-secret"
    assert "sk-secret" not in repr(provider.api_key()) and "sk-secret" not in provider.model_dump_json()


def test_warm_shapes_default_to_the_presets_native_size_batch_one_on_the_cpu_and_all_batch_sizes_compiled():
    from gateway.registry import _warm_shapes
    from gateway.settings import Settings

    local = Settings().local
    assert [(w.width, w.steps, w.batch) for w in _warm_shapes(local, compiled=False)] == [(256, 4, 1)]
    sdxl = local.model_copy(update={"preset": "sdxl", "max_batch": 4})
    assert [(w.width, w.steps, w.batch) for w in _warm_shapes(sdxl, compiled=True)] == \
        [(1024, 30, 1), (1024, 30, 2), (1024, 30, 4)]
