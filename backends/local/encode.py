"""A batch's images from the device to file bytes, off the GPU's critical path as far as the format allows.

JPEG is encoded on the GPU (nvJPEG through torchvision) when the images are on a CUDA device and torchvision is
there: one batched call, and only the compressed bytes cross to the host. PNG, WebP and JPEG without nvJPEG are
encoded on a shared thread pool: PNG striped across threads (`png.encode_png`), the others one image a thread
(Pillow's encoders release the GIL). A worker hands back host pixels and takes its next batch while the pool
encodes them (`workers.encoded`), so encoding is off the GPU's cycle (SD1.5 on an H200: 8 PNGs one by one took
0.28 s, a quarter of the cycle, when the worker encoded before it took the next batch).
"""

from __future__ import annotations

import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor

from .png import encode_png

__all__ = ["encode_batch", "encode_pil", "encode_pixels", "encodes_on_device"]

log = logging.getLogger(__name__)

JPEG_QUALITY = 90
_pool: ThreadPoolExecutor | None = None


def _threads() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="encode")
    return _pool


def encode_pil(image, output_format: str = "png") -> bytes:
    """One PIL image -> file bytes (Pillow; the reference the faster paths are tested against)."""
    buf = io.BytesIO()
    if output_format == "png":
        image.save(buf, format="PNG", compress_level=1)
    elif output_format == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buf, format=output_format.upper())
    return buf.getvalue()


def _gpu_jpeg(images) -> list[bytes] | None:
    try:
        from torchvision.io import encode_jpeg
    except ImportError:
        return None
    try:
        return [bytes(t.cpu().numpy()) for t in encode_jpeg(list(images.contiguous()), quality=JPEG_QUALITY)]
    except (RuntimeError, TypeError) as exc:  # a torchvision without nvJPEG: the CPU path below
        log.info("GPU JPEG encoding unavailable (%s); encoding on the CPU", exc)
        return None


def encode_batch(images, output_format: str = "png") -> list[bytes]:
    """(B, 3, H, W) uint8 tensor (any device) -> one file's bytes per image, in order."""
    if encodes_on_device(images, output_format):
        encoded = _gpu_jpeg(images)
        if encoded is not None:
            return encoded
    return encode_pixels(images.permute(0, 2, 3, 1).cpu().numpy(), output_format)


def encodes_on_device(images, output_format: str) -> bool:
    """JPEG of CUDA images: nvJPEG, a few ms a batch, only the compressed bytes cross to the host."""
    return output_format == "jpeg" and images.device.type == "cuda"


def encode_pixels(pixels, output_format: str = "png") -> list[bytes]:
    """(B, H, W, 3) uint8 numpy array on the host -> one file's bytes per image, in order."""
    pool = _threads()
    if output_format == "png":
        return [encode_png(p, pool) for p in pixels]
    from PIL import Image

    pils = [Image.fromarray(p) for p in pixels]
    if len(pils) == 1:
        return [encode_pil(pils[0], output_format)]
    return list(pool.map(encode_pil, pils, [output_format] * len(pils)))
