"""Fuzz the gateway's OpenAPI document against the running server (schemathesis, every check).

    .venv/bin/python benchmarks/fuzz_api.py [--max-examples 150] [--seed 1]

Starts `imagegw serve` with the four providers on the sandbox (fast, no faults) and the local pool off,
then runs `schemathesis run <server>/openapi.json -c all` (less use_after_free: DELETE cancels a job, which
stays readable as cancelled) with an admin key, so every route (app and
admin) is generated for: positive and negative data, status codes, content types, headers, Allow. The
statuses the gateway gives by design (503 no_candidate, 422 for an unsafe policy) are listed, with why,
in benchmarks/schemathesis.toml. Needs schemathesis (installed into .venv on first use).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "fuzz-admin-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-examples", type=int, default=150, help="examples per operation and phase")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    st = ROOT / ".venv/bin/schemathesis"
    if not st.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "schemathesis"], check=True)
    work = Path(tempfile.mkdtemp(prefix="imagegw-fuzz-"))
    port = free_port()
    config = work / "config"
    config.mkdir()
    shutil.copy(ROOT / "config" / "policy.yaml", config / "policy.yaml")
    gateway = yaml.safe_load((ROOT / "config" / "gateway.yaml").read_text())
    gateway.update(server={**gateway["server"], "port": port, "log_level": "warning"}, data_dir=str(work / "data"),
                   local={"enabled": False}, policy_reload_interval_s=0,
                   sandbox={"mode": "on", "config_file": str(work / "faults.yaml")})
    gateway["backends"]["bria"]["options"] = {"poll_initial_s": 0.02, "poll_max_s": 0.05}
    (config / "gateway.yaml").write_text(yaml.safe_dump(gateway))
    (work / "faults.yaml").write_text(yaml.safe_dump(
        {p: {"latency_p50_ms": 5, "latency_p95_ms": 20} for p in ("seedream", "gemini", "reve", "bria")}))
    env = {**os.environ, "IMAGEGW_ADMIN_KEY": ADMIN}
    for key in ("ARK_API_KEY", "GEMINI_API_KEY", "REVE_API_KEY", "BRIA_API_TOKEN"):
        env.pop(key, None)
    server = subprocess.Popen([str(ROOT / ".venv/bin/imagegw"), "serve", "--config", str(config)], env=env,
                              stdout=open(work / "gateway.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        command = [str(st), "--config-file", str(ROOT / "benchmarks" / "schemathesis.toml"), "run",
                   base + "/openapi.json", "-c", "all", "--exclude-checks", "use_after_free",
                   "-H", f"Authorization: Bearer {ADMIN}",
                   "--max-examples", str(args.max_examples), "--seed", str(args.seed),
                   "-w", "1",  # hypothesis parses lambdas with ast, which CPython 3.11 does not do safely in threads
                   "--exclude-path", "/admin/policy/simulate",  # minutes per case: fuzzed elsewhere (tests)
                   "--exclude-path", "/admin/plan"]
        print("command:", " ".join(command).replace(ADMIN, "<admin key>"), flush=True)
        rc = subprocess.run(command).returncode
        tracebacks = (work / "gateway.log").read_text(errors="replace").count("Traceback")
        print(f"\ngateway tracebacks during the run: {tracebacks}")
        return rc or (1 if tracebacks else 0)
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
