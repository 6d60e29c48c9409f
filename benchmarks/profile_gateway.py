"""Profile imagegw under one load of benchmarks/gateway_overhead.py with py-spy, and say where the time goes.

Starts the same minimal upstream and the same imagegw process as gateway_overhead.py, warms it, measures
its idle CPU, then records it with py-spy (sampling, no instrumentation) while the load runs, and prints
CPU per request plus the samples grouped by where they land (the event loop, uvicorn, Litestar, our
modules, the audit thread). py-spy is installed into a scratch folder, never into the project:

    .venv/bin/python benchmarks/profile_gateway.py --load c=16 --seconds 8 [--image-kb 1500] [--raw out.txt]
    .venv/bin/python benchmarks/profile_gateway.py --load r=20 --seconds 15
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gateway_overhead as bench  # noqa: E402

PY_SPY_DIR = Path("/tmp/imagegw-py-spy")


def py_spy() -> Path:
    exe = PY_SPY_DIR / "bin" / "py-spy"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(PY_SPY_DIR), "py-spy"],
                       check=True)
    return exe


def group(frame: str, stack: str) -> str:
    """The part of the process a sample's innermost frame belongs to."""
    if "audit.py" in stack and "Thread" in stack:
        return "audit writer thread"
    for marker, name in (("(uvicorn/", "uvicorn"), ("(litestar/", "litestar"), ("(asyncio/", "event loop"),
                         ("runners", "event loop"), ("(pydantic", "pydantic"), ("(prometheus", "prometheus"),
                         ("(httpx", "httpx"), ("(policies/", "policies (decide)")):
        if marker in frame:
            return name
    for package in ("gateway/", "backends/"):
        if f"({package}" in frame:
            return package + frame.split(f"({package}")[1].split(":")[0]
    return "other: " + frame.split("(")[-1].split(":")[0]


def summarize(raw: Path, top: int) -> None:
    groups, leaves, total = collections.Counter(), collections.Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frame = stack.split(";")[-1]
        groups[group(frame, stack)] += n
        leaves[frame] += n
    print(f"\n{total} samples; by part of the process:")
    for name, n in groups.most_common(top):
        print(f"  {n / total * 100:5.1f}%  {name}")
    print("innermost frames:")
    for name, n in leaves.most_common(top):
        print(f"  {n / total * 100:5.1f}%  {name}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", default="c=16", help="c=N (closed loop) or r=N (fixed rate), as gateway_overhead.py")
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument("--image-kb", type=int, default=0)
    p.add_argument("--rate-hz", type=int, default=1000, help="py-spy samples per second")
    p.add_argument("--raw", help="keep py-spy's collapsed stacks here")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--redis-url", help="imagegw shares state through this Redis (as replicas do)")
    args = p.parse_args()
    exe = py_spy()
    port = bench.free_port()
    upstream = subprocess.Popen([sys.executable, bench.__file__, "--upstream", str(port), "--delay-ms", "0",
                                 "--image-kb", str(args.image_kb)])
    bench.wait_up(f"http://127.0.0.1:{port}/")
    with tempfile.TemporaryDirectory() as tmp:
        gateway, gw_port = bench.start_imagegw(port, Path(tmp), redis_url=args.redis_url)
        url = f"http://127.0.0.1:{gw_port}/v1/images/generations"
        raw = Path(args.raw or Path(tmp) / "stacks.txt")
        try:
            bench.measure("imagegw", url, gateway.pid, args.load, 2.0)  # warm connections and caches
            before = bench.cpu_seconds(gateway.pid)
            time.sleep(3)
            idle_ms = (bench.cpu_seconds(gateway.pid) - before) / 3 * 1000
            spy = subprocess.Popen([str(exe), "record", "-p", str(gateway.pid), "-r", str(args.rate_hz), "-f", "raw",
                                    "-o", str(raw), "-d", str(int(args.seconds) + 1), "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            row = bench.measure("imagegw", url, gateway.pid, args.load, args.seconds)
            spy.wait()
        finally:
            gateway.terminate()
            upstream.terminate()
        image = f"a {args.image_kb} KB image" if args.image_kb else "a 1-pixel image"
        print(f"imagegw, load {args.load}, {image}: {row['req_per_s']:.0f} req/s, "
              f"{row['cpu_ms_per_request']:.2f} ms CPU per request, p50 {row['p50_ms']:.1f} ms; "
              f"idle {idle_ms:.1f} ms CPU per second")
        summarize(raw, args.top)
    print(f"\ncommand: .venv/bin/python benchmarks/profile_gateway.py --load {args.load} --seconds {args.seconds:g} "
          f"--image-kb {args.image_kb}" + (f" --redis-url {args.redis_url}" if args.redis_url else ""))


if __name__ == "__main__":
    main()
