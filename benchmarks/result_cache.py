"""What the result cache and single flight buy (issue 18, item 4): one workload, the gateway with the cache on and
off, side by side in one run.

    python benchmarks/result_cache.py                       # 3 min per side at 4/s, the issue-13 fault mix
    python benchmarks/result_cache.py --minutes 1 --faults none --repeat 0.5 --fanout 0.05
    python benchmarks/result_cache.py --replicas 2          # two replicas on one Redis: a folder each, or one shared

Each side runs real processes, as benchmarks/soak.py does: `imagegw sandbox` (the four providers' wire formats,
with faults drawn per request) and one `imagegw serve`, on a fresh data folder. The workload is the same seeded
Poisson stream for both sides:

- `--repeat` of the requests re-ask an earlier (prompt, seed) of their tenant, drawn by popularity (Zipf over a
  catalogue of `--catalogue` prompts): the re-renders, retries and shared templates product apps send;
- `--fanout` of them arrive as a group of 3 identical requests at once (a client retrying before its first
  answer, or one page asking three times): single flight makes them once;
- `--unseeded` of them carry no seed (they ask for a new image, so they are never served from the cache);
- two tenants ask from the same catalogue: one tenant's images are never served to the other (the default).

Prints, per side: answers with images and within SLA, provider calls, spend (the gateway's books) and what the
answers billed, the cost saved as audited and as `/metrics` counts it, requests served from the cache (hit) and
made once for several (shared), latency of hits against generations, audit records against requests; then the
checks: every cached answer carries the image bytes its maker (named by `x-gateway-cache-source`) answered,
no image crossed tenants, and no unseeded request was served from the cache.

With `--replicas 2`, each side runs two gateways on one Redis behind a random load balancer (each request goes to
either), and there are three sides: the cache off, on with a folder per replica, and on with one folder both
share (`cache.shared_dir`: entries made by either, and one generation per key across both).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import random
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import soak  # noqa: E402  (the sandbox and gateway as processes)

SLAS_MS = (15_000, 30_000, 60_000)
TENANTS = ("app-a", "app-b")


@dataclasses.dataclass(frozen=True)
class Ask:
    """One request of the workload: when (seconds from start), who, and what."""

    t: float
    tenant: str
    prompt: str
    seed: int | None
    sla_ms: int
    n: int

    @property
    def key(self) -> tuple:
        return (self.tenant, self.prompt, self.seed, self.n, self.sla_ms)


def workload(args) -> list[Ask]:
    """The seeded stream both sides get: fresh asks, repeats by popularity, fan-out groups, unseeded asks."""
    rng = random.Random(args.seed)
    weights = [1 / (rank + 1) ** args.zipf for rank in range(args.catalogue)]
    seen: dict[str, list[Ask]] = {t: [] for t in TENANTS}
    asks, t, fresh = [], 0.0, 0
    while t < args.minutes * 60:
        t += rng.expovariate(args.rate)
        tenant = rng.choice(TENANTS)
        if seen[tenant] and rng.random() < args.repeat:
            popular = rng.choices(range(args.catalogue), weights=weights)[0]
            earlier = seen[tenant][popular % len(seen[tenant])]
            ask = dataclasses.replace(earlier, t=t)
        else:
            fresh += 1
            unseeded = rng.random() < args.unseeded
            ask = Ask(t, tenant, f"catalogue item {fresh % args.catalogue} for {tenant}", None if unseeded else fresh,
                      rng.choice(SLAS_MS), 2 if rng.random() < 0.1 else 1)
            if ask.seed is not None:
                seen[tenant].append(ask)
            if rng.random() < 0.5:  # the other tenant asks the very same (isolation keeps them apart)
                other = TENANTS[1 - TENANTS.index(tenant)]
                twin = dataclasses.replace(ask, tenant=other, t=t + rng.uniform(0, 5))
                asks.append(twin)
                if twin.seed is not None:
                    seen[other].append(twin)
        asks.append(ask)
        if rng.random() < args.fanout:
            asks += [dataclasses.replace(ask, t=ask.t + rng.uniform(0, 0.2)) for _ in range(2)]
    return sorted(asks, key=lambda a: a.t)


class CacheFleet(soak.Fleet):
    """soak's fleet with the cache on or off, and one app key per tenant."""

    def __init__(self, args, work: Path, cache: bool, shared: bool = False):
        super().__init__(args, work)
        self.cache, self.shared = cache, shared
        if args.replicas > 1:
            self.redis = soak.Redis(work)  # soak's fleet runs two replicas on it
        self.tenant_keys = {t: f"igw-{t}-" + secrets.token_hex(12) for t in TENANTS}

    def faults_file(self) -> Path:
        if self.args.faults == "none":
            path = self.work / "faults.yaml"
            profile = {p: {"latency_p50_ms": 800, "latency_p95_ms": 3000} for p in soak.PROVIDERS}
            path.write_text(yaml.safe_dump({"seed": self.args.seed, **profile}))
            return path
        return super().faults_file()

    def config_dir(self) -> Path:
        config = super().config_dir()
        gateway = yaml.safe_load((config / "gateway.yaml").read_text())
        gateway["cache"] = {**(gateway.get("cache") or {}), "enabled": self.cache}
        if self.shared:
            gateway["cache"].update(dir=str(self.work / "shared-cache"), shared_dir=True)
        gateway["auth"]["keys"] = [{"key_sha256": hashlib.sha256(key.encode()).hexdigest(), "tenant": tenant,
                                    "role": "app"} for tenant, key in self.tenant_keys.items()]
        (config / "gateway.yaml").write_text(yaml.safe_dump(gateway))
        return config


async def drive(bases: list[str], asks: list[Ask], keys: dict[str, str], seed: int) -> list[dict]:
    rows: list[dict] = []
    balance = random.Random(seed)
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(limits=limits) as client:
        async def one(i: int, ask: Ask) -> None:
            body = {"prompt": ask.prompt, "size": "1024x1024", "n": ask.n, "model": "auto", "sla_ms": ask.sla_ms,
                    "response_format": "b64_json", **({"seed": ask.seed} if ask.seed is not None else {})}
            row = {"i": i, "key": ask.key, "tenant": ask.tenant, "seeded": ask.seed is not None, "sla_ms": ask.sla_ms}
            started, base = time.monotonic(), balance.choice(bases)
            try:
                r = await client.post(base + "/v1/images/generations", json=body, timeout=ask.sla_ms / 1000 * 1.5 + 10,
                                      headers={"authorization": f"Bearer {keys[ask.tenant]}"})
                data = r.json().get("data", []) if r.status_code == 200 else []
                row.update(status=r.status_code, cache=r.headers.get("x-gateway-cache"),
                           id=r.headers.get("x-gateway-decision-id"),
                           source=r.headers.get("x-gateway-cache-source"),
                           cost=float(r.headers.get("x-gateway-cost-usd") or 0),
                           images=[hashlib.sha256((d.get("b64_json") or "").encode()).hexdigest() for d in data],
                           code=None if r.status_code == 200 else (r.json().get("error") or {}).get("code"))
            except Exception as exc:  # counted, never dropped
                row.update(status=0, cache=None, source=None, cost=0.0, images=[], code=type(exc).__name__)
            row["latency_ms"] = (time.monotonic() - started) * 1000
            rows.append(row)

        start, tasks = time.monotonic(), []
        for i, ask in enumerate(asks):
            await asyncio.sleep(max(0.0, start + ask.t - time.monotonic()))
            tasks.append(asyncio.create_task(one(i, ask)))
        await asyncio.gather(*tasks)
    return sorted(rows, key=lambda r: r["i"])


async def saved_metric(bases: list[str]) -> float:
    total = 0.0
    async with httpx.AsyncClient() as client:
        for base in bases:
            text = (await client.get(base + "/metrics")).text
            total += sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                         if line.startswith("imagegw_result_cache_saved_usd_total"))
    return total


def run_side(args, asks: list[Ask], cache: bool, shared: bool = False) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"imagegw-cache-{'on' if cache else 'off'}-"))
    fleet = CacheFleet(args, work, cache, shared)
    fleet.start()
    bases = [base for _, base, _ in fleet.replicas]
    try:
        rows = asyncio.run(drive(bases, asks, fleet.tenant_keys, args.seed))
        time.sleep(1.0)  # the audit's last flush
        spend = asyncio.run(soak.books(fleet))
        saved = asyncio.run(saved_metric(bases))
    finally:
        fleet.stop()
    audits = [row for _, _, data in fleet.replicas for row in soak.audit_rows(data)]
    shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows, "audits": audits, "spend": spend, "saved_metric": saved}


def _pct(values: list[float], q: float) -> str:
    values = sorted(values)
    return f"{values[min(len(values) - 1, int(q * len(values)))] / 1000:.2f}" if values else "-"


def summarise(side: dict) -> dict:
    rows, audits = side["rows"], side["audits"]
    records = [json.loads(rec) for _, _, rec in audits]
    attempts = [a for rec in records for a in rec.get("attempts") or []]
    served = [r for r in rows if r["status"] == 200]
    hits = [r for r in served if r["cache"] == "hit"]
    shared = [r for r in served if r["cache"] == "shared"]
    made = [r for r in served if not r["cache"]]
    return {
        "requests": len(rows), "with images": f"{len(served) / len(rows):.2%}",
        "within SLA": f"{sum(r['latency_ms'] <= r['sla_ms'] for r in served) / len(rows):.2%}",
        "errors": dict(Counter(f"{r['status']} {r['code']}" for r in rows if r["status"] != 200).most_common()),
        "provider calls": sum(1 for a in attempts if a.get("outcome") not in ("skipped", "paced")),
        "spend (books) $": f"{side['spend']:.4f}", "answers billed $": f"{sum(r['cost'] for r in served):.4f}",
        "saved, audited $": f"{sum(rec.get('cost_saved_usd') or 0 for rec in records):.4f}",
        "saved, /metrics $": f"{side['saved_metric']:.4f}",
        "served from cache (hit)": len(hits), "made once for several (shared)": len(shared),
        "latency p50 s: hit / shared / made": f"{_pct([r['latency_ms'] for r in hits], .5)} / "
                                              f"{_pct([r['latency_ms'] for r in shared], .5)} / "
                                              f"{_pct([r['latency_ms'] for r in made], .5)}",
        "audit records": len(audits),
    }


def checks(side: dict) -> list[str]:
    """Problems found (empty: none): a cached answer differs from the images its maker answered (the request
    `x-gateway-cache-source` names), was made for another tenant (the audit names who made it), or was served to
    a request without a seed."""
    tenant_of = {rec["id"]: rec.get("tenant") for rec in (json.loads(r) for _, _, r in side["audits"])}
    made = {r["id"]: r["images"] for r in side["rows"] if r["status"] == 200 and not r["cache"]}
    problems = []
    for r in side["rows"]:
        if r["status"] != 200 or not r["cache"]:
            continue
        if not r["seeded"]:
            problems.append(f"request {r['i']}: unseeded, yet served from the cache ({r['cache']})")
        if r["images"] != made.get(r["source"], r["images"]):
            problems.append(f"request {r['i']}: cached images differ from those its maker answered")
        if tenant_of.get(r["source"]) != r["tenant"]:
            problems.append(f"request {r['i']} ({r['tenant']}): images made for {tenant_of.get(r['source'])!r}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0, help="how long each side runs (minutes)")
    ap.add_argument("--rate", type=float, default=4.0, help="fresh-or-repeat asks per second (Poisson)")
    ap.add_argument("--repeat", type=float, default=0.3, help="share of asks that repeat an earlier seeded one")
    ap.add_argument("--fanout", type=float, default=0.03, help="share of asks sent three times at once")
    ap.add_argument("--unseeded", type=float, default=0.2, help="share of fresh asks without a seed")
    ap.add_argument("--catalogue", type=int, default=200, help="distinct prompts per tenant")
    ap.add_argument("--zipf", type=float, default=1.0, help="popularity skew of repeats")
    ap.add_argument("--faults", default=None, help="a SandboxConfig YAML, or none (default: the issue-13 mix)")
    ap.add_argument("--replicas", type=int, choices=(1, 2), default=1, help="gateways per side (2: on one Redis)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    args.redis_chaos = args.local = args.kill_worker = args.shared_cache = False  # CacheFleet sets its own cache
    args.bria_rpm = 1000
    asks = workload(args)
    on = "cache on, a folder each" if args.replicas > 1 else "cache on"
    sides = {"cache off": run_side(args, asks, cache=False), on: run_side(args, asks, cache=True)}
    if args.replicas > 1:
        sides["cache on, one shared folder"] = run_side(args, asks, cache=True, shared=True)
    summaries = {name: summarise(side) for name, side in sides.items()}
    print(f"\n# result cache: {len(asks)} requests over {args.minutes} min per side, {args.replicas} replica(s) "
          f"({sum(a.seed is None for a in asks)} unseeded), faults: {args.faults or 'issue-13 mix (~20%)'}")
    print(f"command: python benchmarks/result_cache.py {' '.join(sys.argv[1:])}")
    print(f"| | {' | '.join(summaries)} |\n|---|{'---|' * len(summaries)}")
    for field in summaries["cache off"]:
        print(f"| {field} | {' | '.join(str(s[field]) for s in summaries.values())} |")
    off = float(summaries["cache off"]["spend (books) $"])
    for name in list(summaries)[1:]:
        on = float(summaries[name]["spend (books) $"])
        print(f"spend, {name}: {on / off - 1:+.1%} ({off:.4f} -> {on:.4f} USD)" if off else "")
    problems = [f"{name}: {p}" for name in list(sides)[1:] for p in checks(sides[name])]
    print(f"checks (a cached answer has its maker's bytes, tenants apart, unseeded never cached): "
          f"{'all hold' if not problems else f'{len(problems)} problem(s)'}")
    for problem in problems[:20]:
        print("  " + problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
