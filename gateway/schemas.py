"""The HTTP request body of POST /v1/images/generations: OpenAI's fields plus the gateway's."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InvalidRequest

__all__ = ["GenerationRequest", "parse_generation_request", "parse_size"]

_SIZE = re.compile(r"^(\d{2,5})x(\d{2,5})$")
DEFAULT_SIZE = "1024x1024"


def parse_size(size: str) -> tuple[int, int]:
    m = _SIZE.match(size)
    if not m:
        raise ValueError("size must be 'WIDTHxHEIGHT' in pixels, each side 2 to 5 digits, e.g. '1024x1024'")
    return int(m.group(1)), int(m.group(2))


class GenerationRequest(BaseModel):
    """OpenAI images.generate body plus the gateway's fields. Every field of OpenAI's images API is accepted
    (some only for compatibility); an unknown field is a 400 naming it, since a typo (`max_cost` for
    `max_cost_usd`) would otherwise silently drop a constraint."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    prompt: Annotated[str, Field(min_length=1)]
    n: Annotated[int, Field(ge=1, le=10)] = 1
    size: str = DEFAULT_SIZE
    quality: Literal["auto", "standard", "hd", "low", "medium", "high"] | None = None
    response_format: Literal["url", "b64_json"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    model: Annotated[str, Field(min_length=1, max_length=200)] = "auto"
    user: Annotated[str, Field(max_length=256)] | None = None
    stream: bool = False
    # Accepted as OpenAI defines them; the backends we route to have no such controls (ignored).
    style: Literal["vivid", "natural"] | None = None
    background: Literal["transparent", "opaque", "auto"] | None = None
    moderation: Literal["low", "auto"] | None = None
    output_compression: Annotated[int, Field(ge=0, le=100)] | None = None
    partial_images: Annotated[int, Field(ge=0, le=3)] | None = None
    # Gateway extensions (the OpenAI SDK sends them through extra_body).
    tier: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    sla_ms: Annotated[int, Field(gt=0, le=86_400_000)] | None = None  # up to a day: async jobs
    max_cost_usd: Annotated[float, Field(ge=0)] | None = None
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = None
    steps: Annotated[int, Field(ge=1, le=500)] | None = None
    negative_prompt: Annotated[str, Field(max_length=32_000)] | None = None
    tags: Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=32)] | None = None

    @field_validator("n", "output_compression", "partial_images", "sla_ms", "seed", "steps", mode="before")
    @classmethod
    def _integral(cls, value):
        """JSON Schema counts 2.0 as an integer: so do we (1.5, "2" and true stay errors)."""
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    @field_validator("size")
    @classmethod
    def _size_shape(cls, value: str) -> str:
        if value == "auto":
            return DEFAULT_SIZE
        parse_size(value)
        return value

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, value: bool) -> bool:
        if value:
            raise ValueError("streaming is not supported; omit stream or send false")
        return value

    @property
    def width_height(self) -> tuple[int, int]:
        return parse_size(self.size)


def _unknown_field(name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(GenerationRequest.model_fields), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(GenerationRequest.model_fields)}"
    return f"unknown field{hint}"


_CODES = {"missing": "missing_required_parameter", "extra_forbidden": "unknown_parameter"}


def _first_error(exc: ValidationError) -> InvalidRequest:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    param = loc[0] if loc else None
    where = ".".join(loc) if loc else "body"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        message = "is required"
    elif err["type"] == "extra_forbidden":
        message = _unknown_field(loc[0] if loc else "")
    detail = f"{where}: {message}" if len(exc.errors()) == 1 else (
        f"{where}: {message} (and {len(exc.errors()) - 1} more: "
        + ", ".join(".".join(str(p) for p in e["loc"]) for e in exc.errors()[1:]) + ")"
    )
    return InvalidRequest(detail, param=param, code=_CODES.get(err["type"], "invalid_value"))


def parse_generation_request(body: bytes) -> GenerationRequest:
    """Validate a raw JSON body, or raise InvalidRequest naming the first bad field."""
    if not body.strip():
        raise InvalidRequest("request body is empty; expected a JSON object", code="invalid_json")
    try:
        return GenerationRequest.model_validate_json(body)
    except ValidationError as exc:
        if exc.errors()[0]["type"] in ("json_invalid", "model_type", "model_attributes_type"):
            raise InvalidRequest("request body must be a JSON object", code="invalid_json") from exc
        raise _first_error(exc) from exc
