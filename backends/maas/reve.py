"""Reve image create: POST {base}/v1/image/create.

Wire format per shared/providers.md §3: Bearer auth; `Accept: application/json`
(base64 PNG in `image`); size mapped to the nearest `aspect_ratio` (no pixel
control: the real size is read from the image); `content_violation: true` (or
the `x-reve-content-violation` header) means no usable image; credits from
`credits_used`. The SDK sets no timeout; ours comes from config and the deadline.
"""

from __future__ import annotations

from policies.types import SizeSupport

from ..protocol import GenerationJob
from ._http import b64_image, error_for_status, error_json, parse_json_keeping, retry_after_seconds
from .base import ApiBackend, Piece
from .sizes import nearest_aspect_ratio

__all__ = ["ReveBackend"]

ASPECT_RATIOS = ("16:9", "3:2", "4:3", "1:1", "3:4", "2:3", "9:16")


class ReveBackend(ApiBackend):
    sizes = SizeSupport(min_side=64, max_side=4096)

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.config.api_key.get_secret_value()}", "Accept": "application/json"}

    def build_body(self, job: GenerationJob) -> dict:
        body = {"prompt": job.prompt, "aspect_ratio": nearest_aspect_ratio(job.width, job.height, ASPECT_RATIOS),
                "version": self.config.options.get("version", "latest")}
        if scaling := self.config.options.get("test_time_scaling"):
            body["test_time_scaling"] = int(scaling)
        return body

    async def create(self, job: GenerationJob, index: int, deadline: float) -> Piece:
        response = await self.call("POST", "/v1/image/create", deadline, json=self.build_body(job),
                                   headers=self.auth_headers())
        if response.status_code != 200:
            raise _error(response)
        payload = parse_json_keeping(response, "image")  # the base64 stays the provider's literal
        if not isinstance(payload, dict):
            raise error_for_status(502, "Reve answered 200 with a non-object body")
        violation = payload.get("content_violation") or response.headers.get("x-reve-content-violation") == "true"
        if violation:
            raise error_for_status(400, "Reve flagged a content violation", content=True, code="content_violation")
        if not payload.get("image"):
            raise error_for_status(502, "Reve answered 200 without an image")
        return Piece(image=b64_image(payload["image"], "Reve"),
                     request_id=payload.get("request_id") or response.headers.get("x-reve-request-id"),
                     billed_units=payload.get("credits_used"), model=payload.get("version"))


def _error(response) -> Exception:
    body = error_json(response)
    message = body.get("message") or body.get("error") or response.reason_phrase
    code = body.get("error_code")
    return error_for_status(response.status_code, f"Reve HTTP {response.status_code}: {message}", code=code,
                            retry_after_s=retry_after_seconds(response.headers.get("retry-after")),
                            content=code in ("CONTENT_VIOLATION", "content_violation"))
