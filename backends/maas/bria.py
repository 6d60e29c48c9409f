"""Bria API v2 (FIBO): POST {base}/v2/image/generate, then poll GET {base}/v2/status/{request_id}.

Wire format per shared/providers.md §4: header `api_token` (no Bearer); size to
the nearest `aspect_ratio` plus `resolution` (4MP above ~1.5 MP); async by default:
202 with a request_id, polled with backoff until COMPLETED, ERROR or UNKNOWN, or
the deadline. The status URL is built from our configured base (not the absolute
`status_url`), as the SDK does. The image is always a URL (fetched for b64_json).
"""

from __future__ import annotations

import asyncio
import time

from policies.types import SizeSupport

from ..errors import BackendRateLimited, BackendTimeout
from ..protocol import GeneratedImage, GenerationJob
from ._http import error_for_status, error_json, parse_json, retry_after_seconds
from .base import ApiBackend, Piece
from .sizes import nearest_aspect_ratio

__all__ = ["BriaBackend"]

ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9")


class BriaBackend(ApiBackend):
    sizes = SizeSupport(min_side=64, max_side=4096)
    # Bria always answers with a link on its result storage, whose host it does not document: any host
    # (http/https only) unless options.image_hosts narrows it.
    default_image_hosts = ("*",)

    def auth_headers(self) -> dict[str, str]:
        return {"api_token": self.config.api_key.get_secret_value()}

    def build_body(self, job: GenerationJob) -> dict:
        body = {
            "prompt": job.prompt,
            "aspect_ratio": nearest_aspect_ratio(job.width, job.height, ASPECT_RATIOS),
            "resolution": "4MP" if job.width * job.height > 1_500_000 else "1MP",
            "sync": bool(self.config.options.get("sync", False)),
        }
        if self.config.model and self.config.model != "fibo":
            body["model_version"] = self.config.model
        if job.seed is not None:
            body["seed"] = job.seed
        if job.negative_prompt:
            body["negative_prompt"] = job.negative_prompt
        return body

    async def create(self, job: GenerationJob, index: int, deadline: float) -> Piece:
        response = await self.call("POST", "/v2/image/generate", deadline, json=self.build_body(job),
                                   headers=self.auth_headers())
        if response.status_code not in (200, 202):
            raise _error(response)
        payload = parse_json(response)
        if not isinstance(payload, dict):
            raise error_for_status(502, "Bria answered with a non-object body")
        request_id = payload.get("request_id")
        if response.status_code == 202 or payload.get("status") == "IN_PROGRESS":
            if not request_id:
                raise error_for_status(502, "Bria accepted the job without a request_id")
            payload = await self._poll(request_id, deadline)
        return _piece(payload, request_id)

    async def _poll(self, request_id: str, deadline: float) -> dict:
        interval = float(self.config.options.get("poll_initial_s", 0.5))
        ceiling = float(self.config.options.get("poll_max_s", 4.0))
        while True:
            wait = min(interval, deadline - time.monotonic())
            if wait <= 0:
                raise BackendTimeout(f"Bria job {request_id} still in progress at the deadline")
            await asyncio.sleep(wait)
            interval = min(ceiling, interval * 1.5)
            response = await self.call("GET", f"/v2/status/{request_id}", deadline,
                                       headers=self.auth_headers())
            if response.status_code == 429 or response.status_code >= 500:
                error = _error(response)
                if isinstance(error, BackendRateLimited) and error.retry_after_s:
                    interval = max(interval, error.retry_after_s)
                continue  # polling is idempotent: keep going until the deadline
            if response.status_code != 200:
                raise _error(response)
            payload = parse_json(response)
            status = payload.get("status") if isinstance(payload, dict) else None
            if status != "IN_PROGRESS":
                return payload


def _piece(payload: dict, request_id: str | None) -> Piece:
    status = payload.get("status", "COMPLETED")
    if status == "ERROR":
        err = payload.get("error") or {}
        err = err if isinstance(err, dict) else {"message": str(err)}
        code = int(err.get("code") or 500) if str(err.get("code") or "").isdigit() else 500
        raise error_for_status(code, f"Bria job failed: {err.get('message') or 'error'}", code=str(code),
                               content=code == 422)
    if status != "COMPLETED":
        raise error_for_status(502, f"Bria job ended with status {status}")
    result = payload.get("result") or {}
    url = result.get("image_url") if isinstance(result, dict) else None
    if not url:
        raise error_for_status(502, "Bria completed without result.image_url")
    return Piece(image=GeneratedImage(url=url, media_type="image/png"), request_id=request_id)


def _error(response) -> Exception:
    body = error_json(response)
    err = body.get("error") or {}
    err = err if isinstance(err, dict) else {"message": str(err)}
    message = f"Bria HTTP {response.status_code}: {err.get('message') or response.reason_phrase}"
    if err.get("details"):
        message += f" ({err['details']})"
    return error_for_status(response.status_code, message, code=str(err.get("code") or "") or None,
                            retry_after_s=retry_after_seconds(response.headers.get("retry-after")),
                            content=response.status_code == 422 and "moderation" in message.lower())
