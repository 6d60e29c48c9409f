"""The queue's own cost: batches through Redis Streams with tiny payloads and a worker that does no work, so
what is measured is the hand-off (XADD, XREADGROUP, claim renewals, result hash, reply, XACK/XDEL, HGETALL).

    .venv/bin/python benchmarks/fleet_stream.py [--batches 2000] [--workers 4] [--in-flight 32]

Prints batches/s, the Redis commands per batch (from INFO's total_commands_processed, so the gateway's and the
workers' together, heartbeats and reclaim polls included), and the median and p99 hand-off latency.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis  # noqa: E402

from backends.local.stream import FleetKeys, RemoteFleet, StreamConsumer  # noqa: E402
from backends.local.workers import BatchOutput, BatchRequest  # noqa: E402


class NullWorker:
    def __init__(self, i: int):
        self.name, self.state, self.detail, self.busy = f"null-{i}", "ready", "ready", False
        self.warmed, self.pending_warm, self.warm_timings = [], [], {}

    async def start(self):
        pass

    async def run(self, req):
        return BatchOutput([b"x" * 64 for _ in req.seeds], 0.0)


class NoPool:
    def add_worker(self, worker):
        pass

    def refresh_fleet(self):
        pass


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=2000)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--in-flight", type=int, default=32)
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = p.parse_args()
    keys = FleetKeys(f"bench{uuid.uuid4().hex[:8]}")
    client = aioredis.Redis.from_url(args.redis, socket_timeout=10)
    fleet = RemoteFleet(client, keys, NoPool(), max_batch_s=60)
    await fleet.start()
    consumers = [StreamConsumer(aioredis.Redis.from_url(args.redis, socket_timeout=10), keys, NullWorker(i),
                                worker_id=f"w{i}") for i in range(args.workers)]
    running = [asyncio.create_task(c.run()) for c in consumers]
    await asyncio.sleep(0.5)
    latencies: list[float] = []
    gate = asyncio.Semaphore(args.in_flight)

    async def one(i: int) -> None:
        async with gate:
            started = time.perf_counter()
            await fleet.submit(BatchRequest([f"p{i}"], [i], 64, 64, 1))
            latencies.append(time.perf_counter() - started)

    before = (await client.info("stats"))["total_commands_processed"]
    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(args.batches)))
    seconds = time.perf_counter() - started
    commands = (await client.info("stats"))["total_commands_processed"] - before
    for c in consumers:
        c.stop()
    await asyncio.gather(*running, return_exceptions=True)
    await fleet.close()
    async for key in client.scan_iter(match=f"imagegw:{keys.namespace}:*"):
        await client.delete(key)
    latencies.sort()
    print(f"\n$ python benchmarks/fleet_stream.py --batches {args.batches} --workers {args.workers} "
          f"--in-flight {args.in_flight}")
    print("| batches/s | Redis commands per batch | hand-off p50 ms | p99 ms |\n|---|---|---|---|")
    print(f"| {args.batches / seconds:,.0f} | {commands / args.batches:.1f} | "
          f"{statistics.median(latencies) * 1000:.2f} | {latencies[int(0.99 * (len(latencies) - 1))] * 1000:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
