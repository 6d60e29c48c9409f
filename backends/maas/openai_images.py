"""Any OpenAI-compatible images server (OpenAI itself, or a self-hosted one): POST {base}/images/generations.

One call returns all n images (`n` is sent as is, up to `max_n`); sizes are sent as
"WxH", or mapped to the nearest of `options.sizes` when the server only takes a list
(OpenAI's models do); `options.send_response_format: false` for models that always
answer base64 (gpt-image-1).
"""

from __future__ import annotations

import math

from ..protocol import GeneratedImage, GenerationJob, GenerationResult
from ._http import b64_image, error_for_status, error_json, parse_images_json, retry_after_seconds
from .base import ApiBackend

__all__ = ["OpenAIImagesBackend"]


def nearest_size(width: int, height: int, sizes: list[str]) -> str:
    def distance(size: str) -> float:
        w, h = (int(x) for x in size.split("x"))
        return abs(math.log(w / h) - math.log(width / height)) + abs(math.log(w * h / (width * height))) / 4

    return min(sizes, key=distance)


class OpenAIImagesBackend(ApiBackend):
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.config.api_key.get_secret_value()}"}

    def build_body(self, job: GenerationJob) -> dict:
        sizes = self.config.options.get("sizes")
        body = {"model": self.config.model, "prompt": job.prompt, "n": job.n,
                "size": nearest_size(job.width, job.height, sizes) if sizes else f"{job.width}x{job.height}"}
        if self.config.options.get("send_response_format", True):
            body["response_format"] = "url" if job.response_format == "url" else "b64_json"
        if job.quality and self.config.options.get("send_quality", False):
            body["quality"] = job.quality
        return body

    async def generate(self, job: GenerationJob, deadline: float) -> GenerationResult:
        from ..errors import BackendUnavailable

        if self.config.api_key is None:
            raise BackendUnavailable(f"{self.config.name} has no API key")
        response = await self.call("POST", "/images/generations", deadline, json=self.build_body(job),
                                   headers=self.auth_headers())
        if response.status_code != 200:
            err = error_json(response).get("error") or {}
            err = err if isinstance(err, dict) else {"message": str(err)}
            raise error_for_status(response.status_code, f"{self.config.name} HTTP {response.status_code}: "
                                   f"{err.get('message') or response.reason_phrase}", code=err.get("code"),
                                   retry_after_s=retry_after_seconds(response.headers.get("retry-after")),
                                   content=err.get("code") == "content_policy_violation")
        payload = parse_images_json(response)
        items = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(items, list) or len(items) != job.n:
            raise error_for_status(502, f"{self.config.name} returned {len(items or [])} images, expected {job.n}")
        images = []
        for item in items:
            if isinstance(item, dict) and item.get("b64_json"):
                images.append(b64_image(item["b64_json"], self.config.name))
            elif isinstance(item, dict) and item.get("url") and job.response_format == "b64_json":
                # asked for bytes, answered with a link: fetch it (bounded, from the upstream's own host)
                images.append(GeneratedImage(data=await self.fetch_image(item["url"], deadline), url=item["url"]))
            elif isinstance(item, dict) and item.get("url"):
                images.append(GeneratedImage(url=item["url"]))
            else:
                raise error_for_status(502, f"{self.config.name}: an item holds neither b64_json nor url")
        w, h = (int(x) for x in self.build_body(job)["size"].split("x"))
        return GenerationResult(images=tuple(images), model=self.config.model, width=w, height=h,
                                provider_request_id=response.headers.get("x-request-id"),
                                billed_units=float(job.n),
                                extra={"sandbox": True} if self.config.sandbox else {})
