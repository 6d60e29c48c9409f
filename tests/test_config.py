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
    assert "rules[0].match.tiers: unknown tier 'gold'" in str(err.value)


def test_a_rule_naming_a_backend_the_policy_does_not_list_is_a_warning_and_applies_to_the_rest():
    from policies.lint import policy_warnings

    policy = parse_policy({"backends": {"a": {"quality": 0.5}}, "rules": [{"name": "r", "deny": ["local"]}]})
    assert any("rules[0].deny: backend 'local' is not in the policy's backends" in w for w in policy_warnings(policy))


def _cli(*argv: str) -> tuple[int, str, str]:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "gateway.cli", *argv], capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout, done.stderr


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
    for argv, says in ((["policy", "validate", str(tmp_path / "missing.yaml")], "missing.yaml: No such file"),
                       (["serve", "--config", str(tmp_path / "nowhere")], "no such config folder"),
                       (["audit", "tail", "--config", str(tmp_path / "nowhere")], "no such config folder")):
        code, _, err = _cli(*argv)
        assert code == 2 and says in err and "Traceback" not in err, (argv, err)
    code, _, err = _cli("policy", "simulate", "x.yaml", "--synthetic", "nope")
    assert code == 2 and "invalid choice: 'nope'" in err and "Traceback" not in err


def test_policy_validate_prints_warnings_and_strict_makes_them_errors(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("backends: {a: {quality: 0.5}}\ntiers: {standard: {min_quality: 0.9}}\n")
    code, out, err = _cli("policy", "validate", str(path))
    assert code == 0 and "valid" in out and "warning: tiers.standard" in err
    code, _, err = _cli("policy", "validate", "--strict", str(path))
    assert code == 2 and "refused under --strict" in err


def test_a_second_serve_on_a_busy_port_fails_before_printing_a_banner_or_a_key(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = _cli("serve", "--port", str(port))
    assert code == 2 and "cannot listen on 127.0.0.1:" in err
    assert "admin key" not in out + err and "listening" not in out


def test_a_relative_data_dir_is_relative_to_the_config_folder(tmp_path, monkeypatch):
    from gateway.config import load_settings

    monkeypatch.delenv("IMAGEGW_DATA_DIR", raising=False)
    config = tmp_path / "conf"
    config.mkdir()
    (config / "gateway.yaml").write_text("data_dir: ../state\n")
    monkeypatch.chdir("/")
    assert load_settings(config).data_dir == (tmp_path / "state").resolve()


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


def test_the_shipped_policies_are_valid_with_no_warnings():
    from policies.lint import policy_warnings
    from tests.conftest import ROOT

    for path in (ROOT / "config" / "policy.yaml", ROOT / "config" / "examples" / "candidate.yaml"):
        assert policy_warnings(parse_policy(path.read_text(), str(path))) == [], path


def test_healthcheck_exits_0_when_the_gateway_is_ready_and_1_when_nothing_answers(settings, shipped_policy,
                                                                                   serve, tmp_path):
    import json

    from policies.types import BackendKind
    from tests.fakes import ScriptedBackend

    server = serve(settings, shipped_policy, {"local": ScriptedBackend("local", kind=BackendKind.LOCAL,
                                                                      models=("tiny",))})
    config = tmp_path / "hc"
    config.mkdir()
    (config / "gateway.yaml").write_text(json.dumps({"server": {"port": server.port}}))
    assert _cli("healthcheck", "--config", str(config))[0] == 0
    server.stop()
    assert _cli("healthcheck", "--config", str(config))[0] == 1


def test_policy_simulate_takes_the_audit_export_as_it_comes_and_refuses_garbage_in_one_line(tmp_path):
    import json

    from tests.conftest import ROOT

    records = [{"id": f"r{i}", "ts": 1_764_000_000 + i, "tenant": "acme", "status": 200,
                "request": {"size": "1024x1024", "n": 1, "tier": "standard", "sla_ms": 30000, "steps": None}}
               for i in range(20)]
    export = tmp_path / "export.jsonl"
    export.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    policy = str(ROOT / "config" / "policy.yaml")
    code, out, err = _cli("policy", "simulate", policy, "--trace", str(export))
    assert code == 0 and "requests" in out, err
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("this is not json\n")
    code, _, err = _cli("policy", "simulate", policy, "--trace", str(garbage))
    assert code == 2 and "line 1 is not JSON" in err and "Traceback" not in err


def test_the_gateway_caps_glibc_malloc_arenas_only_when_told_to():
    # Threads that free image buffers each keep them in an arena of their own (docs/benchmarks.md: 200 pool
    # images, RSS 194 MB at glibc's default against 148 MB at 2); off by default until its effect on the pool's
    # encoding threads is measured. Run in a child: the cap is process-wide.
    import platform
    import subprocess
    import sys

    from gateway.settings import ServerSettings

    assert ServerSettings().malloc_arena_max == 0
    probe = "from gateway.cli import limit_malloc_arenas as cap; print(cap(2), cap(0))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    glibc = platform.libc_ver()[0] == "glibc"
    assert out.stdout.split() == [str(glibc), "False"]
