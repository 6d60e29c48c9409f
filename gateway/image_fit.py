"""Images to the size that was asked when a provider delivered another (Reve's 1000x1000 for 1024x1024,
Gemini's 2512x1680 for 1536x1024): `images.exact_size` in the policy, run off the event loop.

    off     deliver as made; x-gateway-size and the audit record say what size that is
    resize  scale to the asked size (the aspect ratio may change slightly)
    crop    scale to cover the asked size, then crop the centre (the aspect ratio is kept)
"""

from __future__ import annotations

import io

from backends.protocol import GeneratedImage

__all__ = ["fit_images"]

_FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}


def _fit(image: GeneratedImage, width: int, height: int, mode: str, output_format: str) -> GeneratedImage:
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(image.content())) as img:
        img.load()
        if img.size == (width, height):
            return image
        if mode == "crop":
            fitted = ImageOps.fit(img, (width, height), method=Image.Resampling.LANCZOS)
        else:
            fitted = img.resize((width, height), Image.Resampling.LANCZOS)
    pil_format, media_type = _FORMATS.get(output_format, _FORMATS["png"])
    if pil_format == "JPEG" and fitted.mode not in ("RGB", "L"):
        fitted = fitted.convert("RGB")
    buf = io.BytesIO()
    fitted.save(buf, format=pil_format, **({"compress_level": 1} if pil_format == "PNG" else {"quality": 92}))
    return GeneratedImage(data=buf.getvalue(), media_type=media_type)


def fit_images(images: tuple[GeneratedImage, ...], width: int, height: int, mode: str,
               output_format: str) -> tuple[GeneratedImage, ...]:
    """Each image at exactly width x height (blocking: call it in a worker thread)."""
    return tuple(_fit(image, width, height, mode, output_format) for image in images)
