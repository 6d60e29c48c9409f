"""The ops console in a real browser (Debian's Chromium, driven by Playwright) against a running gateway with the
sandbox providers and the tiny pool: sign in, read the fleet, open a decision, edit, simulate, apply and roll back
a policy, with the admin API checked at each step. Screenshots land in .artifacts/console/ (not committed)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = ROOT / ".artifacts" / "console"
ADMIN = "console-admin-key"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="Debian's chromium is not installed (scripts/test installs it)")


@pytest.fixture
def gateway(settings, shipped_policy, serve, monkeypatch):
    monkeypatch.setenv("IMAGEGW_ADMIN_KEY", ADMIN)
    settings.sandbox.mode = "on"  # Seedream, Gemini, Reve and Bria served by the built-in emulators
    server = serve(settings, shipped_policy)
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        for i in range(6):  # some traffic for the audit, the stats and the charts
            body = {"prompt": f"a fox {i}", "size": "256x256"} | ({"model": "local"} if i % 2 else {})
            assert c.post("/v1/images/generations", json=body).status_code == 200
    return server


def _admin(server, path: str) -> dict:
    return httpx.get(server.base_url + path, headers={"authorization": f"Bearer {ADMIN}"}, timeout=10).json()


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1366, "height": 900})
        tab = context.new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda exc: errors.append(str(exc)))
        yield tab
        browser.close()
        assert not errors, errors  # no JavaScript error on any page


def test_an_operator_signs_in_reads_the_fleet_and_a_decision_then_changes_and_rolls_back_the_policy(gateway, page):
    import time

    from playwright.sync_api import expect

    page.goto(gateway.base_url + "/ui/")
    page.get_by_label("Admin key").fill("wrong")
    page.keyboard.press("Enter")
    expect(page.get_by_role("alert")).to_contain_text("refused")
    page.get_by_label("Admin key").fill(ADMIN)
    page.keyboard.press("Enter")  # the keyboard alone gets in
    expect(page.get_by_role("heading", name="Backends (5)")).to_be_visible()
    assert ADMIN not in page.url  # the key never goes in the address bar
    rows = page.locator("#backends-title + table tbody tr")
    expect(rows).to_have_count(5)
    assert sorted(rows.locator("strong").all_inner_texts()) == ["bria", "gemini", "local", "reve", "seedream"]
    expect(page.get_by_text("Last hour, by backend")).to_be_visible()
    expect(page.get_by_text("GPU use: 0 of 1 worker(s) busy")).to_be_visible()
    expect(page.get_by_role("img", name="Requests/s by backend")).to_be_visible()
    page.screenshot(path=SHOTS / "overview.png", full_page=True)

    page.get_by_role("link", name="Decisions").click()
    first = page.locator("tbody a").first
    expect(first).to_be_visible()
    first.click()
    story = page.locator("#story")
    expect(story).to_contain_text("was served by")
    decision_id = page.get_by_role("heading", name="Decision").inner_text().split()[-1]
    record = _admin(gateway, f"/admin/audit/{decision_id}")
    expect(story).to_contain_text(record["backend"])  # the page says what the audit says
    expect(page.get_by_role("heading", name="Candidates, best first")).to_be_visible()
    page.screenshot(path=SHOTS / "decision.png", full_page=True)

    page.get_by_role("link", name="Spend").click()
    expect(page.get_by_role("heading", name="Spend")).to_be_visible()
    page.screenshot(path=SHOTS / "spend.png", full_page=True)

    page.get_by_role("link", name="Policy").click()
    editor = page.get_by_label("Policy (YAML)")
    expect(editor).to_be_visible()
    original = editor.input_value()
    before = _admin(gateway, "/admin/policy")
    editor.fill(original.replace("latency_quantile: p95", "latency_quantile: p77"))
    status = page.locator("#policy-status")
    expect(status).to_contain_text("Invalid")
    expect(status.locator("code.path").first).to_contain_text("latency_quantile")
    expect(page.locator("#apply")).to_be_disabled()
    assert _admin(gateway, "/admin/policy")["version"] == before["version"]  # nothing applied
    page.screenshot(path=SHOTS / "policy-invalid.png", full_page=True)

    editor.fill(original.replace("latency_quantile: p95", "latency_quantile: p50"))
    expect(status).to_contain_text("Valid")
    expect(page.locator("#policy-diff")).to_contain_text("+ latency_quantile: p50")
    page.get_by_role("button", name="Simulate").click()  # on the last hour of audited traffic
    expect(page.locator("#sim-result")).to_contain_text("6 requests replayed under both", timeout=60_000)
    expect(page.locator("#sim-result")).to_contain_text("SLA attainment")
    page.get_by_label("Replay").select_option("synthetic")
    page.get_by_role("button", name="Simulate").click()
    expect(page.locator("#sim-result")).to_contain_text("Candidate", timeout=60_000)
    page.screenshot(path=SHOTS / "policy-simulated.png", full_page=True)

    page.get_by_label("Note").fill("p50 for drafts, from the console")
    page.get_by_role("button", name="Apply").click()
    expect(page.get_by_text(f"Running version {before['version'] + 1}")).to_be_visible()
    applied = _admin(gateway, "/admin/policy")
    assert applied["version"] == before["version"] + 1 and applied["policy"]["latency_quantile"] == "p50"
    assert applied["note"] == "p50 for drafts, from the console"

    page.get_by_role("button", name=f"Roll back to v{before['version']}").click()
    expect(page.get_by_text(f"Running version {before['version'] + 2}")).to_be_visible()
    rolled = _admin(gateway, "/admin/policy")
    assert rolled["fingerprint"] == before["fingerprint"] and rolled["policy"]["latency_quantile"] == "p95"
    page.screenshot(path=SHOTS / "policy-history.png", full_page=True)

    page.get_by_role("link", name="Overview").click()  # live: the page refreshes itself
    first_stamp = page.locator(".toolbar .muted").inner_text()
    time.sleep(5.5)
    assert page.locator(".toolbar .muted").inner_text() != first_stamp
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("Admin key")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    assert os.listdir(SHOTS)
