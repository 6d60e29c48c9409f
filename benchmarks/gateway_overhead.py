"""Gateway overhead: direct to a minimal OpenAI-compatible upstream, and through imagegw, side by side.

Each target runs as its own process on loopback; the load comes from this process
(closed loop at concurrency 16 and 64, fixed rate at 20 and 100 req/s, each bounded
in time). Reported per target: max req/s, CPU seconds per request (the target
process's own CPU time, from /proc), added p50/p99 latency against direct, errors.

    .venv/bin/python benchmarks/gateway_overhead.py [--seconds 8] [--delay-ms 0]

With --peers DIR, LiteLLM's proxy (litellm[proxy] 1.108.7, two deployments behind one
model) and Portkey's gateway (@portkey-ai/gateway 1.15.2, a load-balance config over two
targets) run beside them; --install-peers installs both into DIR (a scratch folder, never
into the project's dependencies):

    .venv/bin/python benchmarks/gateway_overhead.py --install-peers /tmp/peers --peers /tmp/peers
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PNG_1PX = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8cfc0"
    "00000301010018dd8db00000000049454e44ae426082")).decode()


# --- the upstream: a raw ASGI app, as cheap as a server can be -----------------------------

def noise_png(kilobytes: int) -> str:
    """Base64 of a real PNG of random pixels, about `kilobytes` long (noise does not compress)."""
    import io
    import random

    from PIL import Image

    side = max(1, int((kilobytes * 1024 / 3) ** 0.5))
    image = Image.frombytes("RGB", (side, side), random.Random(0).randbytes(side * side * 3))
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode()


def upstream_app(delay_s: float, image_kb: int = 0):
    image = noise_png(image_kb) if image_kb else PNG_1PX
    body = json.dumps({"created": 0, "data": [{"b64_json": image}]}).encode()

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        if delay_s:
            await asyncio.sleep(delay_s)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


def serve_upstream(port: int, delay_ms: float, image_kb: int = 0) -> None:
    import uvicorn

    uvicorn.run(upstream_app(delay_ms / 1000, image_kb), host="127.0.0.1", port=port, log_level="error",
                access_log=False, loop="uvloop", http="httptools")


# --- helpers --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def wait_up(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def start_imagegw(upstream_port: int, tmp: Path, server: dict | None = None,
                  redis_url: str | None = None, transport: str = "fast",
                  audit: dict | None = None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    config = tmp / "config"
    config.mkdir()
    backends = {f"up{i}": {"kind": "openai", "base_url": f"http://127.0.0.1:{upstream_port}/v1",
                           "api_key_env": "BENCH_UPSTREAM_KEY", "model": "bench", "transport": transport}
                for i in (1, 2)}
    (config / "gateway.yaml").write_text(json.dumps({
        "server": {"host": "127.0.0.1", "port": port, "log_level": "warning", **(server or {})},
        "data_dir": str(tmp / "data"),
        "local": {"enabled": False}, "backends": backends, "sandbox": {"mode": "off"},
        **({"redis_url": redis_url, "redis_namespace": f"bench{os.getpid()}{port}"} if redis_url else {}),
        **({"audit": audit} if audit else {}),
        "policy_reload_interval_s": 0}))
    (config / "policy.yaml").write_text(json.dumps({
        "defaults": {"tier": "standard", "sla_ms": 30000}, "tiers": {"standard": {"min_quality": 0.5}},
        "backends": {n: {"quality": 0.8, "price_per_image_usd": 0.01, "latency_prior": {"p50_ms": 50, "p95_ms": 300}}
                     for n in backends}}))
    env = {**os.environ, "BENCH_UPSTREAM_KEY": "k", "IMAGEGW_ADMIN_KEY": "bench-admin"}
    proc = subprocess.Popen([str(ROOT / ".venv/bin/imagegw"), "serve", "--config", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_up(f"http://127.0.0.1:{port}/healthz")
    return proc, port


def install_peers(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    venv = folder / "litellm-venv"
    if not (venv / "bin" / "litellm").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin/pip"), "install", "-q", "litellm[proxy]==1.108.7"], check=True)
    portkey = folder / "portkey"
    if not (portkey / "node_modules/@portkey-ai/gateway").exists():
        portkey.mkdir(exist_ok=True)
        subprocess.run(["npm", "init", "-y"], cwd=portkey, check=True, capture_output=True)
        subprocess.run(["npm", "install", "@portkey-ai/gateway@1.15.2"], cwd=portkey, check=True)


def start_litellm(folder: Path, upstream_port: int, tmp: Path) -> tuple[subprocess.Popen, int, dict]:
    port = free_port()
    deployment = {"model": "openai/bench", "api_base": f"http://127.0.0.1:{upstream_port}/v1", "api_key": "k"}
    (tmp / "litellm.yaml").write_text(json.dumps({
        "model_list": [{"model_name": "bench", "litellm_params": deployment}] * 2,
        "litellm_settings": {"drop_params": True}}))
    key = "sk-bench-master-key-0123456789"
    proc = subprocess.Popen([str(folder / "litellm-venv/bin/litellm"), "--config", str(tmp / "litellm.yaml"),
                             "--port", str(port)], env={**os.environ, "LITELLM_MASTER_KEY": key},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_up(f"http://127.0.0.1:{port}/health/liveliness", timeout=120)
    return proc, port, {"authorization": f"Bearer {key}"}


def start_portkey(folder: Path, upstream_port: int) -> tuple[subprocess.Popen, int, dict]:
    port = free_port()
    target = {"provider": "openai", "api_key": "k", "custom_host": f"http://127.0.0.1:{upstream_port}/v1"}
    config = {"strategy": {"mode": "loadbalance"}, "targets": [target, target]}
    proc = subprocess.Popen(["node", str(folder / "portkey/node_modules/@portkey-ai/gateway/build/start-server.js"),
                             f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_up(f"http://127.0.0.1:{port}/", timeout=60)
    return proc, port, {"x-portkey-config": json.dumps(config)}


# --- load -----------------------------------------------------------------------------------

BODY = {"prompt": "a red fox in snow", "size": "1024x1024", "response_format": "b64_json", "model": "bench"}


class HttpxClient:
    """httpx.AsyncClient as the load generator (what the first tables used)."""

    def __init__(self, url: str, headers: dict):
        self.url = url
        self.client = httpx.AsyncClient(limits=httpx.Limits(max_connections=256, max_keepalive_connections=256),
                                        timeout=30, headers=headers)

    async def post(self) -> bool:
        return (await self.client.post(self.url, json=BODY)).status_code == 200

    async def aclose(self) -> None:
        await self.client.aclose()


# httpx costs more CPU per request than the gateways under test; on a 2-core machine that caps every
# target's req/s at the generator's. This one (prebuilt requests on kept-alive sockets, parsed by
# httptools) spends a small fraction of that, so req/s shows the target.
class RawClient:
    def __init__(self, url: str, headers: dict):
        u = httpx.URL(url)
        self.host, self.port = u.host, u.port
        body = json.dumps(BODY).encode()
        lines = [f"POST {u.raw_path.decode()} HTTP/1.1", f"host: {u.host}:{u.port}", "content-type: application/json",
                 f"content-length: {len(body)}"] + [f"{k}: {v}" for k, v in headers.items()]
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        self.idle: list = []

    async def post(self) -> bool:
        from backends.maas.transport import _Connection  # the gateway's own lean HTTP/1.1 exchange

        conn = self.idle.pop() if self.idle else None
        if conn is None or not conn.usable:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            conn = _Connection(reader, writer)
        reply, keep = await conn.exchange(self.request, b"", 64 * 1024 * 1024)
        if keep:
            self.idle.append(conn)
        else:
            conn.close()
        return reply.status == 200

    async def aclose(self) -> None:
        for conn in self.idle:
            conn.close()


class Tally:
    def __init__(self):
        self.latencies: list[float] = []
        self.errors = 0

    async def timed(self, post) -> None:
        t = time.perf_counter()
        try:
            ok = await post()
        except (OSError, httpx.HTTPError):
            ok = False
        if ok:
            self.latencies.append(time.perf_counter() - t)
        else:
            self.errors += 1


async def closed_loop(client, concurrency: int, seconds: float) -> Tally:
    tally, stop = Tally(), time.perf_counter() + seconds

    async def worker():
        while time.perf_counter() < stop:
            await tally.timed(client.post)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tally


async def fixed_rate(client, rate: float, seconds: float) -> Tally:
    tally, tasks, start = Tally(), [], time.perf_counter()
    for i in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        tasks.append(asyncio.create_task(tally.timed(client.post)))
    await asyncio.gather(*tasks)
    return tally


async def run_load(load: str, url: str, seconds: float, headers: dict, loadgen: str) -> Tally:
    kind, value = load.split("=")
    client = RawClient(url, headers) if loadgen == "raw" else HttpxClient(url, headers)
    try:
        if kind == "c":
            return await closed_loop(client, int(value), seconds)
        return await fixed_rate(client, float(value), seconds)
    finally:
        await client.aclose()


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


def measure(name: str, url: str, pid: int, load: str, seconds: float, headers: dict | None = None,
            loadgen: str = "raw") -> dict:
    before, started = cpu_seconds(pid), time.perf_counter()
    tally = _run(run_load(load, url, seconds, headers or {}, loadgen))
    elapsed, cpu = time.perf_counter() - started, cpu_seconds(pid) - before
    n = len(tally.latencies)
    return {"target": name, "load": load, "requests": n, "errors": tally.errors, "req_per_s": n / elapsed,
            "rss_mb": rss_mb(pid), "cpu_ms_per_request": cpu / max(n, 1) * 1000,
            "p50_ms": pct(tally.latencies, 0.5), "p99_ms": pct(tally.latencies, 0.99)}


def _run(coro):
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument("--delay-ms", type=float, default=0)
    p.add_argument("--image-kb", type=int, default=0, help="upstream answers with a real PNG of about this size "
                   "(base64 in b64_json); 0: a 1-pixel PNG")
    p.add_argument("--loads", default="c=16,c=64,r=20,r=100")
    p.add_argument("--peers", help="folder with LiteLLM and Portkey installed (see --install-peers)")
    p.add_argument("--install-peers", help="install LiteLLM and Portkey into this scratch folder first")
    p.add_argument("--servers", default="", help="also imagegw with these event loop/HTTP parser pairs, "
                   "e.g. asyncio/h11,uvloop/h11,asyncio/httptools")
    p.add_argument("--redis-url", help="imagegw shares state through this Redis (as replicas do)")
    p.add_argument("--audit-postgres", metavar="DSN", help="also imagegw with audit.backend postgres on this DSN")
    p.add_argument("--transports", default="", help="also imagegw with these provider transports, side by side "
                   "with the default (fast), e.g. aiohttp,httpx")
    p.add_argument("--loadgen", choices=["raw", "httpx"], default="raw",
                   help="raw: prebuilt requests on kept-alive sockets (cheap); httpx: an httpx.AsyncClient")
    args = p.parse_args()
    if args.install_peers:
        install_peers(Path(args.install_peers))
    up_port = free_port()
    upstream = subprocess.Popen([sys.executable, __file__, "--upstream", str(up_port), "--delay-ms",
                                 str(args.delay_ms), "--image-kb", str(args.image_kb)])
    wait_up(f"http://127.0.0.1:{up_port}/")
    with tempfile.TemporaryDirectory() as tmp:
        gateway, gw_port = start_imagegw(up_port, Path(tmp), redis_url=args.redis_url)
        procs = [gateway, upstream]
        path = "/v1/images/generations"
        targets = [("direct", f"http://127.0.0.1:{up_port}{path}", upstream.pid, {}),
                   ("imagegw", f"http://127.0.0.1:{gw_port}{path}", gateway.pid, {})]
        for variant in args.servers.split(",") if args.servers else []:  # e.g. asyncio/h11: the choice measured
            loop, http = variant.split("/")
            (Path(tmp) / variant.replace("/", "-")).mkdir()
            proc, variant_port = start_imagegw(up_port, Path(tmp) / variant.replace("/", "-"),
                                               {"loop": loop, "http": http}, args.redis_url)
            procs.append(proc)
            targets.append((f"imagegw {variant}", f"http://127.0.0.1:{variant_port}{path}", proc.pid, {}))
        for transport in args.transports.split(",") if args.transports else []:
            (Path(tmp) / f"t-{transport}").mkdir()
            proc, t_port = start_imagegw(up_port, Path(tmp) / f"t-{transport}", redis_url=args.redis_url,
                                         transport=transport)
            procs.append(proc)
            targets.append((f"imagegw transport={transport}", f"http://127.0.0.1:{t_port}{path}", proc.pid, {}))
        if args.audit_postgres:  # the same gateway writing its audit to Postgres: the request path's CPU beside SQLite
            (Path(tmp) / "pg").mkdir()
            proc, pg_port = start_imagegw(up_port, Path(tmp) / "pg", redis_url=args.redis_url,
                                          audit={"backend": "postgres", "dsn": args.audit_postgres})
            procs.append(proc)
            targets.append(("imagegw audit=postgres", f"http://127.0.0.1:{pg_port}{path}", proc.pid, {}))
        rows = []
        try:
            if args.peers:
                litellm, ll_port, ll_headers = start_litellm(Path(args.peers), up_port, Path(tmp))
                portkey, pk_port, pk_headers = start_portkey(Path(args.peers), up_port)
                procs += [litellm, portkey]
                targets += [("litellm", f"http://127.0.0.1:{ll_port}{path}", litellm.pid, ll_headers),
                            ("portkey", f"http://127.0.0.1:{pk_port}{path}", portkey.pid, pk_headers)]
            for load in args.loads.split(","):
                for name, url, pid, headers in targets:
                    measure(name, url, pid, load, 1.0, headers, args.loadgen)  # warm connections and caches
                    rows.append(measure(name, url, pid, load, args.seconds, headers, args.loadgen))
        finally:
            for proc in procs:
                proc.terminate()
    direct = {r["load"]: r for r in rows if r["target"] == "direct"}
    image = f"a {args.image_kb} KB PNG" if args.image_kb else "a 1-pixel PNG"
    print(f"\nupstream delay {args.delay_ms:.0f} ms, answering {image} as b64_json; {args.seconds:.0f} s per load; "
          f"load generator ({args.loadgen}) in this process on the same {os.cpu_count()}-core machine")
    print("| target | load | req/s | CPU ms/request | p50 ms | p99 ms | added p50 ms | added p99 ms | errors "
          "| RSS MB after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        d = direct[r["load"]]
        print(f"| {r['target']} | {r['load']} | {r['req_per_s']:.0f} | {r['cpu_ms_per_request']:.2f} "
              f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['p50_ms'] - d['p50_ms']:+.1f} "
              f"| {r['p99_ms'] - d['p99_ms']:+.1f} | {r['errors']} | {r['rss_mb']:.0f} |")
    print(f"\ncommand: .venv/bin/python benchmarks/gateway_overhead.py --seconds {args.seconds:.0f} "
          f"--delay-ms {args.delay_ms:.0f} --image-kb {args.image_kb} --loads {args.loads} --loadgen {args.loadgen}"
          + (f" --peers {args.peers}" if args.peers else "") + (f" --servers {args.servers}" if args.servers else "")
          + (f" --redis-url {args.redis_url}" if args.redis_url else "")
          + (" --audit-postgres DSN" if args.audit_postgres else "")
          + (f" --transports {args.transports}" if args.transports else ""))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--upstream":
        serve_upstream(int(sys.argv[2]), float(sys.argv[4]) if len(sys.argv) > 4 else 0.0,
                       int(sys.argv[6]) if len(sys.argv) > 6 else 0)
    else:
        main()
