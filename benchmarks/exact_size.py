"""What `images.exact_size` costs per image (decode, Lanczos fit, PNG encode at level 1), on this machine.

    .venv/bin/python benchmarks/exact_size.py

The two mismatches seen from providers: Reve's 1000x1000 for 1024x1024, Gemini's 2512x1680 for 1536x1024.
Runs in a worker thread in the gateway, so it adds this much latency and CPU, not event-loop stall.
"""

from __future__ import annotations

import io
import random
import statistics
import time

from PIL import Image

from backends.protocol import GeneratedImage
from gateway.image_fit import fit_images


def photo_like(width: int, height: int) -> bytes:
    """A smooth gradient with noise: compresses like a picture, not like a flat colour."""
    rng = random.Random(0)
    small = Image.frombytes("RGB", (width // 16, height // 16), rng.randbytes(width // 16 * height // 16 * 3))
    img = small.resize((width, height), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def main() -> None:
    print("| made | asked | mode | ms per image (median of 5) |")
    print("|---|---|---|---|")
    for (mw, mh), (aw, ah) in (((1000, 1000), (1024, 1024)), ((2512, 1680), (1536, 1024))):
        image = GeneratedImage(photo_like(mw, mh))
        for mode in ("resize", "crop"):
            times = []
            for _ in range(5):
                started = time.perf_counter()
                fit_images((image,), aw, ah, mode, "png")
                times.append((time.perf_counter() - started) * 1000)
            print(f"| {mw}x{mh} | {aw}x{ah} | {mode} | {statistics.median(times):.0f} |")
    print("\ncommand: .venv/bin/python benchmarks/exact_size.py")


if __name__ == "__main__":
    main()
