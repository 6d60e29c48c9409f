"""Google Gemini image models: POST {base}/v1beta/models/{model}:generateContent.

Wire format per shared/providers.md §2: `x-goog-api-key` header; size mapped to
the nearest `imageConfig.aspectRatio` and, for 3 Pro, an `imageSize` tier by the
long edge; images only as base64 `inlineData` (thought images skipped); a 200
without an image (blockReason, a SAFETY-like finishReason, text only) is a content
refusal; 429 RESOURCE_EXHAUSTED carries `RetryInfo.retryDelay`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from policies.types import SizeSupport

from ..protocol import GenerationJob
from ._http import (
    b64_image,
    decode_keeping_literals,
    error_for_status,
    error_json,
    is_string,
    parse_json,
    retry_after_seconds,
)
from .base import ApiBackend, Piece
from .sizes import nearest_aspect_ratio

__all__ = ["GeminiBackend"]

ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
_CONTENT_FINISH = {"SAFETY", "PROHIBITED_CONTENT", "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "BLOCKLIST",
                   "SPII", "RECITATION", "IMAGE_RECITATION"}


def image_size_tier(width: int, height: int) -> str:
    edge = max(width, height)
    return "1K" if edge <= 1024 else "2K" if edge <= 2048 else "4K"


class GeminiBackend(ApiBackend):
    sizes = SizeSupport(min_side=64, max_side=4096)

    def auth_headers(self) -> dict[str, str]:
        return {"x-goog-api-key": self.config.api_key.get_secret_value()}

    def build_body(self, job: GenerationJob) -> dict:
        image_config = {"aspectRatio": nearest_aspect_ratio(job.width, job.height, ASPECT_RATIOS)}
        if "pro" in self.config.model:  # imageSize is 3 Pro only
            image_config["imageSize"] = image_size_tier(job.width, job.height)
        generation = {"responseModalities": ["IMAGE"], "imageConfig": image_config}
        if job.seed is not None and self.config.options.get("send_seed", True):
            generation["seed"] = job.seed % 2_147_483_648
        return {"contents": [{"role": "user", "parts": [{"text": job.prompt}]}], "generationConfig": generation}

    async def create(self, job: GenerationJob, index: int, deadline: float) -> Piece:
        version = self.config.options.get("api_version", "v1beta")
        url = f"/{version}/models/{self.config.model}:generateContent"
        response = await self.call("POST", url, deadline, json=self.build_body(job),
                                   headers=self.auth_headers())
        if response.status_code != 200:
            raise _error(response)
        payload = _parse_keeping_images(response)
        if not isinstance(payload, dict):
            raise error_for_status(502, "Gemini answered 200 with a non-object body")
        data, mime = _first_image(payload)
        return Piece(image=b64_image(data, "Gemini", mime),
                     request_id=payload.get("responseId"), billed_units=_image_tokens(payload.get("usageMetadata")),
                     model=payload.get("modelVersion"))


def _image_tokens(usage) -> float | None:
    """The image output tokens Google bills at the image rate: candidatesTokensDetails' IMAGE entry, else all
    candidate tokens (an answer without the breakdown). None when the answer says nothing."""
    if not isinstance(usage, dict):
        return None
    for detail in usage.get("candidatesTokensDetails") or ():
        if isinstance(detail, dict) and detail.get("modality") == "IMAGE" and \
                isinstance(detail.get("tokenCount"), int | float):
            return float(detail["tokenCount"])
    total = usage.get("candidatesTokenCount")
    return float(total) if isinstance(total, int | float) else None


_NULL = msgspec.Raw(b"null")


class _Inline(msgspec.Struct):
    mimeType: Any = None
    data: msgspec.Raw = _NULL  # Raw takes no union with None: a missing or null value is the literal null


class _Part(msgspec.Struct):
    inlineData: _Inline | None = None
    thought: Any = None


class _Content(msgspec.Struct):
    parts: list[_Part] | None = None


class _Candidate(msgspec.Struct):
    content: _Content | None = None
    finishReason: Any = None


class _Answer(msgspec.Struct):
    """What this module reads of generateContent's answer, with each inline image's base64 left raw."""

    candidates: list[_Candidate] | None = None
    promptFeedback: Any = None
    usageMetadata: Any = None
    responseId: Any = None
    modelVersion: Any = None


_ANSWER = msgspec.json.Decoder(_Answer)


def _parse_keeping_images(response) -> Any:
    """The answer as parse_json gives it (the fields this module reads), each `inlineData.data` kept as the
    provider's string literal (msgspec.Raw: one scan, embedded unchanged in b64_json answers). Bodies with
    escapes or of another shape take parse_json."""
    answer = decode_keeping_literals(response, _ANSWER)
    if answer is None:
        return parse_json(response)

    def inline(i: _Inline | None) -> dict | None:
        if i is None:
            return None
        data = i.data if is_string(i.data) else msgspec.json.decode(i.data)
        return {"mimeType": i.mimeType, "data": data}

    return {
        "promptFeedback": answer.promptFeedback, "usageMetadata": answer.usageMetadata,
        "responseId": answer.responseId, "modelVersion": answer.modelVersion,
        "candidates": None if answer.candidates is None else [
            {"finishReason": c.finishReason,
             "content": None if c.content is None else {"parts": None if c.content.parts is None else [
                 {"thought": p.thought, "inlineData": inline(p.inlineData)} for p in c.content.parts]}}
            for c in answer.candidates],
    }


def _first_image(payload: dict) -> tuple[str, str]:
    """The first non-thought image part, or a content refusal saying why there is none."""
    feedback = payload.get("promptFeedback") or {}
    if feedback.get("blockReason"):
        raise error_for_status(400, f"Gemini blocked the prompt: {feedback['blockReason']}", content=True,
                               code=feedback["blockReason"])
    candidates = payload.get("candidates") or []
    finish = None
    for candidate in candidates if isinstance(candidates, list) else []:
        finish = candidate.get("finishReason") or finish
        for part in ((candidate.get("content") or {}).get("parts") or []):
            inline = part.get("inlineData") or {}
            if part.get("thought") or not str(inline.get("mimeType", "")).startswith("image/"):
                continue
            if inline.get("data"):
                return inline["data"], inline["mimeType"]
    if finish in _CONTENT_FINISH:
        raise error_for_status(400, f"Gemini returned no image: finishReason {finish}", content=True, code=finish)
    if finish is None and not candidates:
        raise error_for_status(502, "Gemini answered 200 with no candidates")
    raise error_for_status(422, f"Gemini returned no image (finishReason {finish})", code=finish, content=True)


def _error(response) -> Exception:
    err = error_json(response).get("error") or {}
    if not isinstance(err, dict):
        err = {"message": str(err)}
    delay = None
    for detail in err.get("details") or []:
        if isinstance(detail, dict) and "retryDelay" in detail:
            delay = retry_after_seconds(str(detail["retryDelay"]))
    delay = delay if delay is not None else retry_after_seconds(response.headers.get("retry-after"))
    message = f"Gemini HTTP {response.status_code} {err.get('status', '')}: {err.get('message') or ''}".strip()
    return error_for_status(response.status_code, message, code=err.get("status"), retry_after_s=delay)
