"""ByteDance Seedream (BytePlus ModelArk / Volcengine Ark): POST {base}/images/generations.

Wire format per shared/providers.md §1: Bearer auth; `size` as "WxH" inside the
model's pixel bounds (else scaled into them, and the real size reported back);
`watermark: false` (it defaults to true); unset fields omitted, never null;
n as parallel calls; the image as `b64_json` or a 24 h `url`.
"""

from __future__ import annotations

from policies.types import SizeSupport

from ..protocol import GeneratedImage, GenerationJob
from ._http import b64_image, error_for_status, error_json, parse_images_json, retry_after_seconds
from .base import ApiBackend, Piece
from .sizes import scale_into_pixel_range

__all__ = ["SeedreamBackend"]

# Pixel bounds by model family (providers.md: 4.x 1024^2..4096^2; 5.0 lite 2560x1440..~3226^2).
_BOUNDS = {"seedream-5": (2560 * 1440, 10_407_076), "default": (1024 * 1024, 4096 * 4096)}


def pixel_bounds(model: str) -> tuple[int, int]:
    family = "seedream-5" if "seedream-5" in model or "5-0" in model else "default"
    return _BOUNDS[family]


class SeedreamBackend(ApiBackend):
    sizes = SizeSupport(min_side=64, max_side=4096)

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.config.api_key.get_secret_value()}"}

    def build_body(self, job: GenerationJob) -> tuple[dict, tuple[int, int]]:
        lo, hi = (self.config.options.get("min_pixels"), self.config.options.get("max_pixels"))
        default_lo, default_hi = pixel_bounds(self.config.model)
        width, height = scale_into_pixel_range(job.width, job.height, lo or default_lo, hi or default_hi)
        body = {
            "model": self.config.model,
            "prompt": job.prompt,
            "size": f"{width}x{height}",
            "response_format": "url" if job.response_format == "url" else "b64_json",
            "watermark": bool(self.config.options.get("watermark", False)),
            "sequential_image_generation": "disabled",
        }
        if job.seed is not None:
            body["seed"] = job.seed % 2_147_483_648
        if job.output_format == "png" and "seedream-5" in self.config.model:
            body["output_format"] = "png"  # only 5.0 lite takes output_format
        return body, (width, height)

    async def create(self, job: GenerationJob, index: int, deadline: float) -> Piece:
        body, (width, height) = self.build_body(job)
        response = await self.call("POST", "/images/generations", deadline, json=body,
                                   headers=self.auth_headers())
        request_id = response.headers.get("x-request-id")
        if response.status_code != 200:
            raise _error(response)
        payload = parse_images_json(response)
        items = payload.get("data") if isinstance(payload, dict) else None
        if not items or not isinstance(items, list) or not isinstance(items[0], dict):
            raise error_for_status(502, "Seedream answered 200 without data[]")
        item = items[0]
        if "error" in item:  # group mode can fail per image
            err = item["error"] or {}
            raise error_for_status(400, f"Seedream: {err.get('message', 'image failed')}", code=err.get("code"),
                                   content="Sensitive" in str(err.get("code", "")))
        media = "image/png" if body.get("output_format") == "png" else "image/jpeg"
        image = _image(item, media)
        usage = payload.get("usage") or {}
        w, h = _parse_size(item.get("size")) or (width, height)
        return Piece(image=image, width=w, height=h, request_id=request_id,
                     billed_units=usage.get("generated_images"), model=payload.get("model"))


def _image(item: dict, media_type: str) -> GeneratedImage:
    if item.get("b64_json"):
        return b64_image(item["b64_json"], "Seedream", media_type)
    if item.get("url"):
        return GeneratedImage(url=item["url"], media_type=media_type)
    raise error_for_status(502, "Seedream data[0] holds neither b64_json nor url")


def _parse_size(value) -> tuple[int, int] | None:
    try:
        w, h = str(value).lower().split("x")
        return int(w), int(h)
    except (ValueError, AttributeError):
        return None


def _error(response) -> Exception:
    err = error_json(response).get("error") or {}
    if not isinstance(err, dict):
        err = {"message": str(err)}
    code = str(err.get("code") or "") or None
    message = f"Seedream HTTP {response.status_code}: {err.get('message') or response.reason_phrase}"
    return error_for_status(
        response.status_code, message, code=code,
        retry_after_s=retry_after_seconds(response.headers.get("retry-after")),
        content=bool(code and "SensitiveContentDetected" in code),
    )
