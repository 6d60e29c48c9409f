"""Deterministic placeholder PNGs: colour from prompt and seed, at the requested size."""

from __future__ import annotations

import hashlib
import io
from functools import lru_cache

__all__ = ["placeholder_png"]


@lru_cache(maxsize=2048)
def _render(width: int, height: int, rgb: tuple[int, int, int], label: str) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), rgb)
    ImageDraw.Draw(img).text((8, 8), label, fill=(255 - rgb[0], 255 - rgb[1], 255 - rgb[2]))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def placeholder_png(provider: str, prompt: str, seed: int | None, width: int, height: int) -> bytes:
    # 8 levels a channel (512 colours): rendered once each and cached, so the emulators stay cheap under load
    # tests (a fresh 1024x1024 PNG costs ~10 ms) while a prompt and seed still map to one colour.
    digest = hashlib.sha256(f"{prompt}\x00{seed}".encode()).digest()
    rgb = tuple(b // 32 * 32 + 16 for b in digest[:3])
    return _render(width, height, rgb, f"SANDBOX {provider}")
