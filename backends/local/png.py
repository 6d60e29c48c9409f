"""PNG encoding of one image on several threads: the deflate stream is cut into stripes of rows, each compressed
on its own thread (zlib releases the GIL) and ended with a full flush, so the pieces join into one valid zlib
stream (the approach of pigz). Pillow encodes a 1024x1024 PNG on one core in ~0.23 s at level 1, a quarter of an
SDXL image's GPU time at batch 1; striped over 8 threads it takes a fraction of that, with the same pixels.

Each row is filtered with Up (the byte above), vectorised in numpy: close to what PNG encoders pick for
photographic images at fast levels, and cheap. No library encodes one PNG on several cores, so this is ours.
"""

from __future__ import annotations

import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

__all__ = ["encode_png"]

_MIN_STRIPE_BYTES = 256 * 1024  # below this a thread costs more than it saves


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def _filtered(pixels):
    """Rows prefixed by filter type 2 (Up): each byte minus the one above it, modulo 256."""
    import numpy as np

    height = pixels.shape[0]
    rows = pixels.reshape(height, -1)
    up = np.empty_like(rows)
    up[0] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=up[1:])
    out = np.empty((height, rows.shape[1] + 1), dtype=np.uint8)
    out[:, 0] = 2
    out[:, 1:] = up
    return out


def _deflate(data: memoryview, last: bool, level: int) -> bytes:
    raw = zlib.compressobj(level, zlib.DEFLATED, -15)  # raw deflate: the zlib header and checksum are ours
    return raw.compress(data) + raw.flush(zlib.Z_FINISH if last else zlib.Z_FULL_FLUSH)


def encode_png(pixels, pool: ThreadPoolExecutor | None = None, level: int = 1) -> bytes:
    """(height, width, 3 or 4) uint8 array -> PNG bytes, compressed in stripes on `pool`'s threads."""
    height, width, channels = pixels.shape
    color = {3: 2, 4: 6}[channels]
    body = memoryview(_filtered(pixels).reshape(-1))
    stripes = max(1, min(getattr(pool, "_max_workers", 1), len(body) // _MIN_STRIPE_BYTES)) if pool else 1
    row = width * channels + 1
    rows_per = -(-height // stripes)
    bounds = [(i * rows_per, min(height, (i + 1) * rows_per)) for i in range(stripes)]
    parts = [body[start * row: end * row] for start, end in bounds if end > start]
    lasts = [i == len(parts) - 1 for i in range(len(parts))]
    if pool is not None and len(parts) > 1:
        pieces = list(pool.map(_deflate, parts, lasts, [level] * len(parts)))
    else:
        pieces = [_deflate(p, last, level) for p, last in zip(parts, lasts, strict=True)]
    stream = b"\x78\x01" + b"".join(pieces) + struct.pack(">I", zlib.adler32(body))
    header = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")
