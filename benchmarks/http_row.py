"""The gateway in front of the engine: `imagegw serve` started fresh on the same GPU with the same engine settings,
timed to ready and to every shape warm, then batch-1 latency and throughput at N clients through HTTP (OpenAI's
images API, model "local", b64_json PNG), for `local_pool.py --http` to print beside the engine's own rows."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_ADMIN_KEY = "pool-http-bench-admin"  # the benchmark's own gateway, to read its audit records


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(client, predicate, timeout: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if predicate(client):
                return time.monotonic()
        except Exception:  # not listening yet
            pass
        time.sleep(0.25)
    return None


def _local_detail(client) -> str:
    for backend in client.get("/v1/backends").json()["data"]:
        if backend["name"] == "local":
            return backend.get("detail", "")
    return ""


def http_rows(model: str, size: int, steps: int, batches: list[int], backend: str, artifacts: Path | None,
              clients: int, seconds: float, timeout: float = 900.0, compiled: bool = True) -> list[dict]:
    import httpx

    port, data = _free_port(), Path(tempfile.mkdtemp(prefix="pool_http-"))
    env = dict(os.environ, IMAGEGW_SERVER__PORT=str(port), IMAGEGW_DATA_DIR=str(data), IMAGEGW_LOCAL__PRESET=model,
               IMAGEGW_LOCAL__COMPILE_BACKEND=backend, IMAGEGW_LOCAL__MAX_BATCH=str(max(batches)),
               IMAGEGW_LOCAL__WARM_SHAPES=json.dumps([{"width": size, "height": size, "steps": steps,
                                                       "batch_sizes": batches}]), PYTHONUNBUFFERED="1",
               IMAGEGW_ADMIN_KEY=_ADMIN_KEY)
    if not compiled:
        env["IMAGEGW_LOCAL__COMPILE"] = "false"
    if artifacts is not None:
        env["IMAGEGW_LOCAL__ARTIFACTS"] = str(Path(artifacts).resolve())
    log = open(data / "serve.log", "w")  # noqa: SIM115 - held by the server process until the finally below
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(ROOT / "config")],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            ready = _wait(client, lambda c: c.get("/readyz").status_code == 200 and
                          "worker(s) ready" in _local_detail(c), timeout)
            warm = _wait(client, lambda c: "left to warm" not in _local_detail(c), timeout)
            row = {"variant": f"through HTTP ({backend if compiled else 'eager'})",
                   "serve_to_ready_s": round(ready - started, 1) if ready else None,
                   "serve_to_all_warm_s": round(warm - started, 1) if warm else None}
            print(f"  gateway: ready {row['serve_to_ready_s']}s, every shape warm {row['serve_to_all_warm_s']}s",
                  flush=True)
            body = {"model": "local", "prompt": "a lighthouse at dusk", "size": f"{size}x{size}",
                    "response_format": "b64_json", "sla_ms": 600_000}

            ids: list[str] = []

            def one(i: int, **extra) -> float:
                t = time.perf_counter()
                r = client.post("/v1/images/generations", json={**body, "prompt": f"{body['prompt']} {i}", **extra})
                if r.status_code != 200:
                    raise RuntimeError(f"{r.status_code}: {r.text[:300]}")
                ids.append(r.headers.get("x-gateway-decision-id", ""))
                return time.perf_counter() - t

            one(-1)
            lat = [one(i) for i in range(5)]
            row |= {"batch": 1, "latency_s": statistics.median(lat), "runs": lat}
            print(f"  batch 1 through HTTP: {row['latency_s']:.3f}s (median of 5)", flush=True)
            row |= _breakdown(client, ids[-5:], lat)
            jpeg = [one(100 + i, output_format="jpeg") for i in range(5)]
            row["latency_jpeg_s"] = statistics.median(jpeg)
            print(f"  where it went: {json.dumps({k: v for k, v in row.items() if k.startswith('b1_')})}; "
                  f"as JPEG {row['latency_jpeg_s']:.3f}s", flush=True)
            row |= _throughput(f"http://127.0.0.1:{port}", body, clients, seconds)
            print(f"  {clients} clients: {row['images_per_s']:.3f} images/s over {row['seconds']:.0f}s, "
                  f"{row['errors']} errors", flush=True)
            return [row]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        print(f"  (gateway log: {data / 'serve.log'})", flush=True)


def _breakdown(client, ids: list[str], latencies: list[float]) -> dict:
    """Batch 1's latency split by the audit records: the worker's batch (engine + encode: gpu_seconds), the rest of
    the server's time (routing, queue, dispatch, response), and what is left to HTTP and JSON on the client."""
    time.sleep(1.5)  # audit records are written within a second
    worker, server = [], []
    for decision_id in ids:
        try:
            record = client.get(f"/admin/audit/{decision_id}",
                                headers={"authorization": f"Bearer {_ADMIN_KEY}"}).json()
            worker.append(record["gpu_seconds"] * 1000)
            server.append(record["latency_ms"])
        except Exception:  # an older gateway, or a record not there: no breakdown
            return {}
    client_ms = statistics.median(latencies) * 1000
    return {"b1_worker_ms": round(statistics.median(worker), 1),
            "b1_server_rest_ms": round(statistics.median([s - w for s, w in zip(server, worker, strict=True)]), 1),
            "b1_http_json_ms": round(client_ms - statistics.median(server), 1)}


def _throughput(url: str, body: dict, clients: int, seconds: float) -> dict:
    import httpx

    done, errors, stop = [], [], time.monotonic() + seconds

    def loop(k: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as c:
            i = 0
            while time.monotonic() < stop:
                r = c.post("/v1/images/generations", json={**body, "prompt": f"client {k} image {i}"})
                (done if r.status_code == 200 else errors).append(time.monotonic())
                i += 1

    began = time.monotonic()
    threads = [threading.Thread(target=loop, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    return {"clients": clients, "images_per_s": len(done) / elapsed, "seconds": elapsed, "errors": len(errors)}
