"""Soak and fault test: the gateway in front of faulty providers (the sandbox), at a fixed rate, for minutes.

    python benchmarks/soak.py --minutes 10 --rate 5                 # the issue-13 fault mix, one replica
    python benchmarks/soak.py --minutes 3 --rate 5 --redis-chaos    # two replicas; their Redis stopped mid-run
    python benchmarks/soak.py --minutes 2 --local --kill-worker     # a pool worker killed mid-batch
    python benchmarks/soak.py --minutes 2 --redis-chaos --shared-cache   # and every request claims a fleet lease
    python benchmarks/soak.py --faults my_faults.yaml               # another fault mix (SandboxConfig YAML)

Everything runs as real processes on this machine: `imagegw sandbox` (the four providers' wire formats,
faults drawn per request), one or two `imagegw serve` replicas, and (with --redis-chaos) a redis-server of
its own on a free port, stopped at a third of the run and restarted empty at two thirds. Requests arrive as
a Poisson process, half `model: auto` and half forced to one provider, SLAs 15/30/60 s.

Prints: answered with images (auto and forced apart), within SLA and 1.5x SLA, audit records vs requests,
spend (the store's books) vs what the answers billed, the share of time each backend was ejected or paced,
provider keys found anywhere a client or operator can read, and each gateway's memory at start and end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROVIDERS = ("seedream", "gemini", "reve", "bria")
PREFIX = {"seedream": "/seedream/api/v3", "gemini": "/gemini", "reve": "/reve", "bria": "/bria"}
KIND_KEY = {"seedream": "ARK_API_KEY", "gemini": "GEMINI_API_KEY", "reve": "REVE_API_KEY", "bria": "BRIA_API_TOKEN"}
SLAS_MS = (15_000, 30_000, 60_000)

# The mix measured against in issue 13: ~20% of calls fail, in every way providers fail.
DEFAULT_FAULTS = {"latency_p50_ms": 800, "latency_p95_ms": 3000, "error_rate": 0.06, "rate_limit_rate": 0.04,
                  "retry_after_s": 1.0, "malformed_rate": 0.04, "hang_rate": 0.02, "hang_s": 600,
                  "content_violation_rate": 0.02}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 180.0, ok=lambda r: r.status_code < 500) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ok(httpx.get(url, timeout=2)):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Redis:
    def __init__(self, folder: Path):
        self.port, self.folder = free_port(), folder

    def start(self) -> None:
        subprocess.run(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--daemonize", "yes", "--dir", str(self.folder)], check=True)
        for _ in range(100):
            if subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True).stdout.strip() \
                    == b"PONG":
                return
            time.sleep(0.05)

    def stop(self) -> None:
        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown", "nosave"], capture_output=True)


class Fleet:
    """The sandbox, the gateway replicas and (optionally) their Redis, as processes."""

    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.keys = {p: f"sk-soak-{p}-{secrets.token_hex(12)}" for p in PROVIDERS}
        self.admin_key = "soak-admin-" + secrets.token_hex(8)
        self.sandbox_port = free_port()
        self.redis = Redis(work) if args.redis_chaos else None
        self.replicas: list[tuple[subprocess.Popen, str, Path]] = []
        self.sandbox: subprocess.Popen | None = None

    def faults_file(self) -> Path:
        if self.args.faults:
            return Path(self.args.faults)
        profile = {p: dict(DEFAULT_FAULTS) for p in PROVIDERS}
        profile["bria"]["job_error_rate"] = 0.03
        path = self.work / "faults.yaml"
        path.write_text(yaml.safe_dump({"seed": self.args.seed, **profile}))
        return path

    def config_dir(self) -> Path:
        config = self.work / "config"
        config.mkdir()
        policy = yaml.safe_load((ROOT / "config" / "policy.yaml").read_text())
        for name in PROVIDERS:  # what an operator would set after measuring these providers (the emulators')
            policy["backends"][name]["latency_prior"] = {"p50_ms": 1000, "p95_ms": 6000 if name == "bria" else 4000}
        (config / "policy.yaml").write_text(yaml.safe_dump(policy))
        sandbox = f"http://127.0.0.1:{self.sandbox_port}"
        gateway = yaml.safe_load((ROOT / "config" / "gateway.yaml").read_text())
        for name, backend in gateway["backends"].items():
            backend["base_url"] = sandbox + PREFIX[name]
            backend["timeout_s"] = 20
            if name == "bria":
                backend["options"] = {"poll_initial_s": 0.5, "poll_max_s": 2.0}
                backend["requests_per_minute"] = self.args.bria_rpm
        gateway["sandbox"] = {"mode": "off"}
        gateway["local"]["enabled"] = bool(self.args.local)
        if self.args.local:
            gateway["local"]["workers"] = "process"
            gateway["local"]["warm_shapes"] = [{"width": 256, "height": 256, "steps": 4, "batch_sizes": [1]}]
        gateway["policy_reload_interval_s"] = 0
        if self.args.shared_cache:  # every request is seeded: each one claims a fleet lease
            gateway["cache"] = {**(gateway.get("cache") or {}), "dir": str(self.work / "shared-cache"),
                                "shared_dir": True}
        (config / "gateway.yaml").write_text(yaml.safe_dump(gateway))
        return config

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.sandbox = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "sandbox", "--faults", str(self.faults_file()),
             "--port", str(self.sandbox_port)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_http(f"http://127.0.0.1:{self.sandbox_port}/_sandbox/config")
        if self.redis:
            self.redis.start()
        config = self.config_dir()
        for i in range(2 if self.redis else 1):
            port, data = free_port(), self.work / f"data-{i}"
            env_i = {**env, **{KIND_KEY[p]: k for p, k in self.keys.items()}, "IMAGEGW_ADMIN_KEY": self.admin_key,
                     "IMAGEGW_SERVER__PORT": str(port), "IMAGEGW_DATA_DIR": str(data),
                     "IMAGEGW_SERVER__LOG_LEVEL": "info"}
            if self.redis:
                env_i["IMAGEGW_REDIS_URL"] = f"redis://127.0.0.1:{self.redis.port}/0"
            log = open(self.work / f"gateway-{i}.log", "wb")  # noqa: SIM115 (kept open for the process)
            proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
                                    cwd=ROOT, env=env_i, stdout=log, stderr=subprocess.STDOUT)
            self.replicas.append((proc, f"http://127.0.0.1:{port}", data))
        for _, base, _ in self.replicas:
            wait_http(base + "/readyz", ok=lambda r: r.status_code == 200 and not r.json()["warming"])

    def stop(self) -> None:
        for proc, _, _ in self.replicas:
            proc.send_signal(signal.SIGTERM)
        for proc, _, _ in self.replicas:
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.sandbox:
            self.sandbox.kill()  # its hung calls would hold a graceful stop for minutes
            self.sandbox.wait(timeout=10)
        if self.redis:
            self.redis.stop()


async def drive(fleet: Fleet, args, results: list[dict]) -> None:
    rng = random.Random(args.seed)
    bases = [base for _, base, _ in fleet.replicas]
    end = time.monotonic() + args.minutes * 60
    forced = (*PROVIDERS, "local") if args.local else PROVIDERS
    tasks = []
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(limits=limits) as client:
        async def one(i: int) -> None:
            model = "auto" if rng.random() < 0.5 else rng.choice(forced)
            sla = rng.choice(SLAS_MS)
            body = {"prompt": f"soak {i}", "size": "1024x1024", "n": 2 if rng.random() < 0.1 else 1,
                    "model": model, "sla_ms": sla, "seed": i}
            started = time.monotonic()
            row = {"model": model, "sla_ms": sla}
            try:
                r = await client.post(bases[i % len(bases)] + "/v1/images/generations", json=body,
                                      timeout=sla / 1000 * 1.5 + 10)
                row.update(status=r.status_code, body=r.text[:4000] if r.status_code != 200 else "",
                           backend=r.headers.get("x-gateway-backend"),
                           cost=float(r.headers.get("x-gateway-cost-usd") or 0),
                           images=len(r.json().get("data", [])) if r.status_code == 200 else 0,
                           code=(r.json().get("error") or {}).get("code") if r.status_code != 200 else None)
            except Exception as exc:  # a hang past the client's patience or a dropped connection: counted
                row.update(status=0, code=type(exc).__name__, body="", cost=0.0, images=0)
            row["latency_ms"] = (time.monotonic() - started) * 1000
            results.append(row)

        i = 0
        while time.monotonic() < end:
            tasks.append(asyncio.create_task(one(i)))
            i += 1
            await asyncio.sleep(rng.expovariate(args.rate))
        await asyncio.gather(*tasks)


async def watch(fleet: Fleet, seen: dict[str, Counter], stop: asyncio.Event, rss: list[list[float]]) -> None:
    async with httpx.AsyncClient() as client:
        started = time.monotonic()
        while not stop.is_set():
            if time.monotonic() - started >= 60 * len(rss[0]):  # each gateway's memory once a minute
                for i, (proc, _, _) in enumerate(fleet.replicas):
                    rss[i].append(rss_mb(proc.pid))
            for _, base, _ in fleet.replicas:
                try:
                    for b in (await client.get(base + "/v1/backends", timeout=2)).json()["data"]:
                        e = b.get("ejection") or {}
                        seen[b["name"]]["samples"] += 1
                        seen[b["name"]]["ejected"] += e.get("state") == "ejected"
                        seen[b["name"]]["recovering"] += e.get("state") == "recovering"
                        seen[b["name"]]["paced"] += bool((e.get("pacing") or {}).get("paced"))
                except Exception:
                    pass
            await asyncio.sleep(1.0)


async def chaos(fleet: Fleet, args) -> None:
    if fleet.redis:
        await asyncio.sleep(args.minutes * 60 / 3)
        print(f"[chaos] {time.strftime('%X')} Redis stopped", flush=True)
        fleet.redis.stop()
        await asyncio.sleep(args.minutes * 60 / 3)
        fleet.redis.start()
        print(f"[chaos] {time.strftime('%X')} Redis restarted (empty)", flush=True)
    if args.kill_worker:
        await asyncio.sleep(args.minutes * 60 / 2)
        for proc, _, _ in fleet.replicas:
            children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            for pid in children:
                print(f"[chaos] {time.strftime('%X')} killing pool worker {pid}", flush=True)
                os.kill(int(pid), signal.SIGKILL)


def audit_rows(data: Path) -> list[tuple]:
    path = data / "audit.sqlite3"
    if not path.exists():
        return []
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT outcome, cost_usd, record FROM audit").fetchall()


def report(args, fleet: Fleet, results: list[dict], seen: dict, memory: dict, spend_books: float,
           audits: list[tuple]) -> bool:
    """Prints the report; True when something a client can never be owed happened (a 500, a traceback)."""
    def share(rows, pred):
        return f"{sum(1 for r in rows if pred(r)) / len(rows):.2%}" if rows else "-"

    refused = [r for r in results if r.get("code") == "content_policy_violation"]
    counted = [r for r in results if r.get("code") != "content_policy_violation"]
    auto = [r for r in counted if r["model"] == "auto"]
    forced = [r for r in counted if r["model"] != "auto"]
    ok = lambda r: r["status"] == 200  # noqa: E731
    in_sla = lambda r: r["status"] == 200 and r["latency_ms"] <= r["sla_ms"]  # noqa: E731
    in_15 = lambda r: r["status"] == 200 and r["latency_ms"] <= r["sla_ms"] * 1.5  # noqa: E731
    billed = sum(r["cost"] for r in results if r["status"] == 200)
    audit_cost = sum(c or 0 for _, c, _ in audits)
    texts = [r.get("body", "") for r in results] + [rec for _, _, rec in audits]
    for i in range(len(fleet.replicas)):
        texts.append((fleet.work / f"gateway-{i}.log").read_text(errors="replace"))
    leaks = sum(text.count(key) for text in texts for key in fleet.keys.values())
    tracebacks = [t[t.index("Traceback"):][:3000] for t in texts[-len(fleet.replicas):] if "Traceback" in t]
    print(f"\n# soak: {len(results)} requests over {args.minutes} min at {args.rate}/s, "
          f"{len(fleet.replicas)} replica(s){' + Redis chaos' if fleet.redis else ''}"
          f"{' + worker kill' if args.kill_worker else ''}")
    print(f"command: python benchmarks/soak.py {' '.join(sys.argv[1:])}")
    print(f"{'':28} {'n':>6} {'images':>8} {'in SLA':>8} {'1.5x SLA':>9}")
    for label, rows in (("model: auto", auto), ("forced backend", forced), ("all", counted)):
        print(f"{label:28} {len(rows):>6} {share(rows, ok):>8} {share(rows, in_sla):>8} {share(rows, in_15):>9}")
    for p in sorted({r["model"] for r in forced}):
        rows = [r for r in forced if r["model"] == p]
        print(f"{'  forced ' + p:28} {len(rows):>6} {share(rows, ok):>8} {share(rows, in_sla):>8} "
              f"{share(rows, in_15):>9}")
    print(f"content refusals answered 400 content_policy_violation (left out above): {len(refused)}")
    errors = Counter(f"{r['status']} {r.get('code')}" for r in counted if r["status"] != 200)
    print(f"errors: {dict(errors.most_common())}")
    for kind in errors:  # the first of each kind, as the client read it: what, for which request
        first = next(r for r in counted if f"{r['status']} {r.get('code')}" == kind)
        try:
            message = (json.loads(first["body"]).get("error") or {}).get("message", "")
        except ValueError:
            message = first["body"]
        print(f"  {kind} (model {first['model']}, sla {first['sla_ms']} ms): {message[:300]}")
    print(f"audit records: {len(audits)} for {len(results)} requests")
    first = f"; the first:\n{tracebacks[0]}" if tracebacks else ""
    print(f"gateway logs with a traceback: {len(tracebacks)}{first}")
    attempts = [a for _, _, rec in audits for a in json.loads(rec).get("attempts") or []]
    invalid = sum(1 for a in attempts if a.get("error_class") == "BackendRequestRejected")
    print(f"provider calls: {sum(1 for a in attempts if a['outcome'] not in ('skipped', 'paced'))} attempts "
          f"({sum(1 for a in attempts if a['outcome'] == 'paced')} held back by pacing), "
          f"{invalid} refused by a provider as invalid")
    print(f"spend: books ${spend_books:.6f}  audit ${audit_cost:.6f}  answers billed ${billed:.6f}  "
          f"(books - billed: ${spend_books - billed:+.6f})")
    for name, c in sorted(seen.items()):
        n = max(1, c["samples"])
        print(f"  {name:9} ejected {c['ejected'] / n:6.1%}  recovering {c['recovering'] / n:6.1%}  "
              f"paced {c['paced'] / n:6.1%}")
    print(f"provider keys found in bodies, audit and logs: {leaks}")
    for i, (start, end) in memory.items():
        print(f"gateway {i} RSS: {start:.0f} MB at start, {end:.0f} MB at end ({(end - start) / start:+.1%})")
    return bool(tracebacks) or any(r["status"] >= 500 and r.get("code") == "internal_error" for r in results)


async def books(fleet: Fleet) -> float:
    """Today's spend as the gateway's store keeps it (shared across replicas through Redis)."""
    totals = []
    async with httpx.AsyncClient() as client:
        for _, base, _ in fleet.replicas:
            r = await client.get(base + "/admin/spend", headers={"authorization": f"Bearer {fleet.admin_key}"})
            totals.append(sum(row["day_usd"] for row in r.json()["data"]))
    return max(totals) if fleet.redis else sum(totals)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="how long to drive load (minutes)")
    ap.add_argument("--rate", type=float, default=5.0, help="requests per second (Poisson arrivals)")
    ap.add_argument("--faults", help="a SandboxConfig YAML (default: the issue-13 mix, ~20%% faults)")
    ap.add_argument("--redis-chaos", action="store_true", help="two replicas on a Redis stopped and restarted")
    ap.add_argument("--kill-worker", action="store_true", help="SIGKILL the pool's worker processes mid-run")
    ap.add_argument("--shared-cache", action="store_true",
                    help="the replicas share one result-cache folder and single flight (cache.shared_dir)")
    ap.add_argument("--local", action="store_true", help="also run the local pool (tiny preset, CPU)")
    ap.add_argument("--bria-rpm", type=float, default=1000,
                    help="Bria's requests-per-minute limit (1000: its enterprise tier; 60: pay-as-you-go)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, audit) and print it")
    args = ap.parse_args()
    if args.kill_worker:
        args.local = True
    work = Path(tempfile.mkdtemp(prefix="imagegw-soak-"))
    fleet = Fleet(args, work)
    fleet.start()
    memory = {i: [rss_mb(p.pid), 0.0] for i, (p, _, _) in enumerate(fleet.replicas)}
    results: list[dict] = []
    seen: dict[str, Counter] = defaultdict(Counter)
    rss: list[list[float]] = [[] for _ in fleet.replicas]

    async def run() -> float:
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(fleet, seen, stop, rss))
        chaos_task = asyncio.create_task(chaos(fleet, args))
        await drive(fleet, args, results)
        stop.set()
        await watcher
        chaos_task.cancel()
        await asyncio.sleep(2.5)  # a sync tick or two: every replica's spend written back
        return await books(fleet)

    try:
        spend = asyncio.run(run())
        for i, (p, _, _) in enumerate(fleet.replicas):
            memory[i][1] = rss_mb(p.pid)
    finally:
        fleet.stop()
    audits = [row for _, _, data in fleet.replicas for row in audit_rows(data)]
    broken = report(args, fleet, results, seen, memory, spend, audits)
    for i, series in enumerate(rss):
        print(f"gateway {i} RSS once a minute (MB): {' '.join(f'{x:.0f}' for x in series)}")
    (work / "results.json").write_text(json.dumps(results))
    if args.keep or broken:  # a failure worth reading the gateway's log for is never thrown away
        print(f"work folder: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
