"""Each provider backend speaks its provider's wire format and maps every failure into our error tree.

Provider HTTP is mocked with respx (a real httpx transport mock; no patching of our code).
"""

from __future__ import annotations

import base64
import json
import time

import httpx
import pytest
import respx
from pydantic import SecretStr

from backends.errors import (
    BackendAuthError,
    BackendError,
    BackendRateLimited,
    BackendRequestRejected,
    BackendTimeout,
    BackendTransientError,
    BackendUnavailable,
    ContentRefused,
)
from backends.maas import BriaBackend, GeminiBackend, ProviderConfig, ReveBackend, SeedreamBackend
from backends.protocol import GenerationJob
from policies.types import Health
from tests.fakes import png

PNG = png(16, 16)
B64 = base64.b64encode(PNG).decode()
JOB = GenerationJob(id="job1", prompt="a red fox in snow", width=1024, height=1024, seed=42)


def config(name, base, model, **options):
    # respx mocks httpx's own transport
    return ProviderConfig(name=name, base_url=base, api_key=SecretStr("sk-test-secret"), model=model,
                          timeout_s=5, options=options, transport="httpx")


SEEDREAM = ("seedream", "https://ark.test/api/v3", "seedream-4-0-250828", SeedreamBackend)
GEMINI = ("gemini", "https://gen.test", "gemini-3-pro-image-preview", GeminiBackend)
REVE = ("reve", "https://reve.test", "reve-create", ReveBackend)
BRIA = ("bria", "https://bria.test", "fibo", BriaBackend)


def make(spec, **options):
    name, base, model, cls = spec
    return cls(config(name, base, model, poll_initial_s=0.01, poll_max_s=0.02, **options))


def soon(seconds=5.0) -> float:
    return time.monotonic() + seconds


ENDPOINTS = {
    "seedream": ("POST", "https://ark.test/api/v3/images/generations"),
    "gemini": ("POST", "https://gen.test/v1beta/models/gemini-3-pro-image-preview:generateContent"),
    "reve": ("POST", "https://reve.test/v1/image/create"),
    "bria": ("POST", "https://bria.test/v2/image/generate"),
}


def route(mock, provider):
    method, url = ENDPOINTS[provider]
    return mock.request(method, url)


# --- wire formats ---------------------------------------------------------------


@respx.mock
async def test_seedream_request_and_b64_response():
    r = route(respx, "seedream").respond(200, json={
        "model": "seedream-4-0-250828", "created": 1, "data": [{"b64_json": B64, "size": "1024x1024"}],
        "usage": {"generated_images": 1}}, headers={"x-request-id": "req-9"})
    result = await make(SEEDREAM).generate(JOB, soon())
    sent = r.calls.last.request
    assert sent.headers["authorization"] == "Bearer sk-test-secret"
    body = json.loads(sent.content)
    assert body == {"model": "seedream-4-0-250828", "prompt": JOB.prompt, "size": "1024x1024",
                    "response_format": "b64_json", "watermark": False, "seed": 42,
                    "sequential_image_generation": "disabled"}  # nulls omitted, watermark off
    assert result.images[0].content() == PNG and result.provider_request_id == "req-9" and result.billed_units == 1
    assert bytes(result.images[0].b64_literal) == b'"%s"' % B64.encode()  # passed through as sent


@respx.mock
async def test_seedream_scales_small_sizes_into_its_pixel_range_and_reports_the_real_size():
    r = route(respx, "seedream").respond(200, json={"data": [{"b64_json": B64, "size": "1024x1024"}]})
    result = await make(SEEDREAM).generate(GenerationJob(id="j", prompt="p", width=512, height=512), soon())
    assert json.loads(r.calls.last.request.content)["size"] == "1024x1024"
    assert (result.width, result.height) == (1024, 1024)


@respx.mock
async def test_seedream_url_response_is_downloaded_for_b64_json_and_passed_through_for_url():
    route(respx, "seedream").respond(200, json={"data": [{"url": "https://cdn.test/img.png"}]})
    respx.get("https://cdn.test/img.png").respond(200, content=PNG)
    got = await make(SEEDREAM, image_hosts=["*.test"]).generate(JOB, soon())
    assert got.images[0].content() == PNG
    import dataclasses

    as_url = await make(SEEDREAM).generate(dataclasses.replace(JOB, response_format="url"), soon())
    assert as_url.images[0].url == "https://cdn.test/img.png" and not as_url.images[0].present


@respx.mock
async def test_an_image_link_is_fetched_only_from_the_upstreams_own_host_or_the_allow_list():
    route(respx, "seedream").respond(200, json={"data": [{"url": "http://169.254.169.254/latest/meta-data"}]})
    metadata = respx.get("http://169.254.169.254/latest/meta-data").respond(200, content=b"secret")
    with pytest.raises(BackendRequestRejected, match="not allowed"):
        await make(SEEDREAM).generate(JOB, soon())
    assert not metadata.called
    route(respx, "seedream").respond(200, json={"data": [{"url": "https://ark.test/files/own.png"}]})
    respx.get("https://ark.test/files/own.png").respond(200, content=PNG)
    assert (await make(SEEDREAM).generate(JOB, soon())).images[0].content() == PNG  # its own host: fetched


@respx.mock
async def test_an_openai_compatible_upstream_answering_with_a_link_when_bytes_were_asked_is_fetched():
    from backends.maas.openai_images import OpenAIImagesBackend

    backend = OpenAIImagesBackend(ProviderConfig(name="vllm", base_url="https://img.test/v1", api_key=SecretStr("k"),
                                                 model="m", transport="httpx"))
    respx.post("https://img.test/v1/images/generations").respond(
        200, json={"data": [{"url": "https://img.test/files/a.png"}]})
    respx.get("https://img.test/files/a.png").respond(200, content=PNG)
    got = await backend.generate(JOB, soon())
    assert got.images[0].content() == PNG


@respx.mock
async def test_download_over_the_size_cap_is_refused():
    route(respx, "seedream").respond(200, json={"data": [{"url": "https://cdn.test/big.png"}]})
    respx.get("https://cdn.test/big.png").respond(200, content=b"x" * 2000)
    backend = SeedreamBackend(ProviderConfig(name="seedream", base_url="https://ark.test/api/v3",
                                             api_key=SecretStr("k"), model="m", max_download_bytes=1000,
                                             transport="httpx", options={"image_hosts": ["cdn.test"]}))
    with pytest.raises(BackendTransientError, match="cap"):
        await backend.generate(JOB, soon())


@respx.mock
async def test_gemini_request_maps_size_to_aspect_ratio_and_tier_and_skips_thought_images():
    r = route(respx, "gemini").respond(200, json={
        "candidates": [{"content": {"parts": [
            {"text": "thinking", "thought": True},
            {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(png(4, 4)).decode()}, "thought": True},
            {"inlineData": {"mimeType": "image/png", "data": B64}}]}, "finishReason": "STOP"}],
        "usageMetadata": {"candidatesTokenCount": 1120}, "modelVersion": "gemini-3-pro-image-preview",
        "responseId": "resp-1"})
    job = GenerationJob(id="j", prompt="wide", width=1920, height=1080)
    result = await make(GEMINI).generate(job, soon())
    sent = r.calls.last.request
    assert sent.headers["x-goog-api-key"] == "sk-test-secret"
    body = json.loads(sent.content)
    assert body["contents"][0]["parts"][0]["text"] == "wide"
    assert body["generationConfig"]["imageConfig"] == {"aspectRatio": "16:9", "imageSize": "2K"}
    assert body["generationConfig"]["responseModalities"] == ["IMAGE"]
    assert result.images[0].content() == PNG and (result.width, result.height) == (16, 16)
    assert result.provider_request_id == "resp-1" and result.billed_units == 1120
    assert bytes(result.images[0].b64_literal) == b'"%s"' % B64.encode()  # passed through as sent


@pytest.mark.parametrize("finish", ["SAFETY", "IMAGE_SAFETY", "PROHIBITED_CONTENT", "IMAGE_PROHIBITED_CONTENT",
                                    "IMAGE_OTHER", "NO_IMAGE", "IMAGE_RECITATION", "OTHER", "STOP"])
@respx.mock
async def test_gemini_200_without_an_image_is_a_content_error(finish):
    route(respx, "gemini").respond(200, json={"candidates": [
        {"content": {"parts": [{"text": "I can't draw that."}]}, "finishReason": finish}]})
    with pytest.raises(ContentRefused):
        await make(GEMINI).generate(JOB, soon())


@respx.mock
async def test_gemini_blocked_prompt_is_a_content_error():
    route(respx, "gemini").respond(200, json={"promptFeedback": {"blockReason": "SAFETY"}})
    with pytest.raises(ContentRefused, match="blocked"):
        await make(GEMINI).generate(JOB, soon())


@respx.mock
async def test_gemini_429_reads_retry_delay_from_retry_info():
    retry_info = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "30s"}
    route(respx, "gemini").respond(429, json={"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "q",
                                                        "details": [retry_info]}})
    with pytest.raises(BackendRateLimited) as err:
        await make(GEMINI).generate(JOB, soon())
    assert err.value.retry_after_s == 30


@respx.mock
async def test_reve_request_and_json_response():
    r = route(respx, "reve").respond(200, json={"image": B64, "version": "reve-create@20250915",
                                               "content_violation": False, "request_id": "rsid-1",
                                               "credits_used": 18})
    result = await make(REVE).generate(GenerationJob(id="j", prompt="tall", width=768, height=1344), soon())
    sent = r.calls.last.request
    assert sent.headers["authorization"] == "Bearer sk-test-secret"
    assert sent.headers["accept"] == "application/json"
    assert json.loads(sent.content) == {"prompt": "tall", "aspect_ratio": "9:16", "version": "latest"}
    assert result.images[0].content() == PNG and result.billed_units == 18 and result.provider_request_id == "rsid-1"
    assert bytes(result.images[0].b64_literal) == b'"%s"' % B64.encode()  # passed through as sent


@pytest.mark.parametrize("how", ["body", "header"])
@respx.mock
async def test_reve_content_violation_is_a_content_error(how):
    if how == "body":
        route(respx, "reve").respond(200, json={"image": "", "content_violation": True})
    else:
        route(respx, "reve").respond(200, json={"image": B64}, headers={"x-reve-content-violation": "true"})
    with pytest.raises(ContentRefused):
        await make(REVE).generate(JOB, soon())


@respx.mock
async def test_bria_polls_to_completion_and_fetches_the_image():
    submit = route(respx, "bria").respond(202, json={"request_id": "abc", "status_url": "https://elsewhere/x"})
    status = respx.get("https://bria.test/v2/status/abc").mock(side_effect=[
        httpx.Response(200, json={"request_id": "abc", "status": "IN_PROGRESS"}),
        httpx.Response(429, headers={"retry-after": "0"}),  # polls count against the limit: keep polling
        httpx.Response(200, json={"request_id": "abc", "status": "COMPLETED",
                                  "result": {"image_url": "https://cdn.test/r.png", "seed": 42}})])
    respx.get("https://cdn.test/r.png").respond(200, content=PNG)
    job = GenerationJob(id="j", prompt="p", width=1536, height=1024, seed=42, negative_prompt="blurry")
    result = await make(BRIA).generate(job, soon())
    sent = submit.calls.last.request
    assert sent.headers["api_token"] == "sk-test-secret" and "authorization" not in sent.headers
    assert json.loads(sent.content) == {"prompt": "p", "aspect_ratio": "3:2", "resolution": "4MP", "sync": False,
                                        "seed": 42, "negative_prompt": "blurry"}
    assert status.call_count == 3 and status.calls.last.request.headers["api_token"] == "sk-test-secret"
    assert result.images[0].content() == PNG and result.provider_request_id == "abc"


@respx.mock
async def test_bria_job_ending_in_error_fails_the_attempt():
    route(respx, "bria").respond(202, json={"request_id": "e1"})
    respx.get("https://bria.test/v2/status/e1").respond(200, json={
        "request_id": "e1", "status": "ERROR", "error": {"code": 500, "message": "gpu fell over"}})
    with pytest.raises(BackendTransientError, match="gpu fell over"):
        await make(BRIA).generate(JOB, soon())


@respx.mock
async def test_bria_still_in_progress_at_the_deadline_times_out():
    route(respx, "bria").respond(202, json={"request_id": "slow"})
    respx.get("https://bria.test/v2/status/slow").respond(200, json={"request_id": "slow", "status": "IN_PROGRESS"})
    started = time.monotonic()
    with pytest.raises(BackendTimeout):
        await make(BRIA).generate(JOB, soon(0.3))
    assert time.monotonic() - started < 1.0


@respx.mock
async def test_bria_sync_mode_answers_directly():
    route(respx, "bria").respond(200, json={"request_id": "s", "status": "COMPLETED",
                                            "result": {"image_url": "https://cdn.test/s.png"}})
    respx.get("https://cdn.test/s.png").respond(200, content=PNG)
    assert (await make(BRIA, sync=True).generate(JOB, soon())).images[0].content() == PNG


# --- the error tree, for every provider ----------------------------------------------

ERRORS = [
    (400, BackendRequestRejected), (404, BackendRequestRejected), (422, BackendRequestRejected),
    (401, BackendAuthError), (402, BackendAuthError), (403, BackendAuthError),
    (429, BackendRateLimited), (500, BackendTransientError), (502, BackendTransientError),
    (503, BackendTransientError),
]
ALL = [SEEDREAM, GEMINI, REVE, BRIA]


@pytest.mark.parametrize("spec", ALL, ids=[s[0] for s in ALL])
@pytest.mark.parametrize(("status", "error"), ERRORS)
@respx.mock
async def test_http_status_maps_to_the_error_tree(spec, status, error):
    route(respx, spec[0]).respond(status, json={"error": {"message": "nope", "code": "X"}},
                                  headers={"retry-after": "7"})
    with pytest.raises(error) as err:
        await make(spec).generate(JOB, soon())
    assert err.value.status == status
    if status == 429:
        assert err.value.retry_after_s == 7
    assert "sk-test-secret" not in str(err.value)


@pytest.mark.parametrize("spec", ALL, ids=[s[0] for s in ALL])
@pytest.mark.parametrize("body", [b"", b"{", b'{"data": [{"b64_json": "iVBOR', b"<html>502</html>", b"[]", b"null",
                                  b'{"data": []}', b'{"image": "!!!notbase64"}',
                                  b'{"candidates": "x"}', b'{"data": [{"b64_json": "@@@"}]}',
                                  b'{"data": [{"b64_json": "' + b"QUJD" * 5000 + b'QU"}]}',  # truncated
                                  b'{"data": [{"b64_json": "' + b"QUJD" * 5000 + b'@@@@"}]}'])  # trailing junk
@respx.mock
async def test_malformed_or_empty_bodies_are_clean_errors_never_crashes(spec, body):
    route(respx, spec[0]).respond(200, content=body, headers={"content-type": "application/json"})
    with pytest.raises((BackendTransientError, BackendRequestRejected)):
        await make(spec).generate(JOB, soon())


@pytest.mark.parametrize("spec", ALL, ids=[s[0] for s in ALL])
@respx.mock
async def test_connect_errors_and_timeouts_are_transient(spec):
    route(respx, spec[0]).mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(BackendTransientError):
        await make(spec).generate(JOB, soon())
    route(respx, spec[0]).mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(BackendTimeout):
        await make(spec).generate(JOB, soon())


@pytest.mark.parametrize("spec", ALL, ids=[s[0] for s in ALL])
async def test_backend_without_a_key_is_unconfigured_and_never_calls_out(spec):
    name, base, model, cls = spec
    backend = cls(ProviderConfig(name=name, base_url=base, api_key=None, model=model, transport="httpx"))
    assert backend.load().health is Health.UNCONFIGURED
    with pytest.raises(BackendUnavailable):
        await backend.generate(JOB, soon())


@pytest.mark.parametrize("spec", ALL, ids=[s[0] for s in ALL])
@respx.mock
async def test_n_images_are_parallel_calls_with_distinct_seeds(spec):
    payload = {
        "seedream": {"data": [{"b64_json": B64}]},
        "gemini": {"candidates": [{"content": {"parts": [{"inlineData": {"mimeType": "image/png", "data": B64}}]}}]},
        "reve": {"image": B64},
        "bria": {"status": "COMPLETED", "result": {"image_url": "https://cdn.test/n.png"}},
    }[spec[0]]
    r = route(respx, spec[0]).respond(200, json=payload)
    respx.get("https://cdn.test/n.png").respond(200, content=PNG)
    import dataclasses

    result = await make(spec, sync=True).generate(dataclasses.replace(JOB, n=3), soon())
    assert len(result.images) == 3 and r.call_count == 3
    seeds = [json.loads(c.request.content).get("seed") for c in r.calls]
    if spec[0] in ("seedream", "bria"):
        assert sorted(seeds) == [42, 43, 44]


@respx.mock
async def test_openai_compatible_backend_sends_n_in_one_call_and_maps_to_listed_sizes():
    from backends.maas import OpenAIImagesBackend

    r = respx.post("https://oai.test/v1/images/generations").respond(
        200, json={"created": 1, "data": [{"b64_json": B64}, {"b64_json": B64}]}, headers={"x-request-id": "oai-1"})
    backend = OpenAIImagesBackend(config("openai", "https://oai.test/v1", "gpt-image-1",
                                         sizes=["1024x1024", "1536x1024", "1024x1536"],
                                         send_response_format=False))
    import dataclasses

    result = await backend.generate(dataclasses.replace(JOB, n=2, width=1920, height=1080), soon())
    body = json.loads(r.calls.last.request.content)
    assert body == {"model": "gpt-image-1", "prompt": JOB.prompt, "n": 2, "size": "1536x1024"}
    assert r.calls.last.request.headers["authorization"] == "Bearer sk-test-secret"
    assert len(result.images) == 2 and result.provider_request_id == "oai-1" and r.call_count == 1
    respx.post("https://oai.test/v1/images/generations").respond(
        400, json={"error": {"message": "blocked", "code": "content_policy_violation"}})
    with pytest.raises(ContentRefused):
        await backend.generate(JOB, soon())


def _answer(body: bytes) -> httpx.Response:
    return httpx.Response(200, content=body)


def test_base64_in_an_openai_shaped_answer_is_kept_as_the_providers_literal_and_embedded_unchanged():
    import msgspec

    from backends.maas._http import b64_image, parse_images_json

    payload = parse_images_json(_answer(b'{"created":7,"data":[{"b64_json":"%s","revised_prompt":"a fox"}],'
                                        b'"usage":{"generated_images":1}}' % B64.encode()))
    item = payload["data"][0]
    assert isinstance(item["b64_json"], msgspec.Raw) and item["revised_prompt"] == "a fox"
    assert payload["created"] == 7 and payload["usage"] == {"generated_images": 1}
    image = b64_image(item["b64_json"], "openai")
    assert image.content() == PNG and image.head() == PNG  # decoded only when asked
    assert msgspec.json.encode({"b64_json": image.b64_literal}) == b'{"b64_json":"%s"}' % B64.encode()


@pytest.mark.parametrize(("body", "expect"), [
    (b'{"data":[{"b64_json":"aGVs\\/bG8="}]}', "aGVs/bG8="),  # an escape: decoded as JSON says
    (b'{"data":[{"b64_json":null,"url":"https://x.test/a.png"}]}', None),  # null stays null
    (b'{"data":"oops"}', "oops"),  # another shape: parsed as it is, for the backend to refuse
])
def test_answers_the_raw_path_cannot_take_are_parsed_as_plain_json(body, expect):
    import msgspec

    from backends.maas._http import parse_images_json

    data = parse_images_json(_answer(body))["data"]
    got = data if isinstance(data, str) else data[0]["b64_json"]
    assert not isinstance(got, msgspec.Raw) and got == expect


def test_a_truncated_or_non_base64_literal_is_a_transient_error():
    from backends.maas._http import b64_image, parse_images_json

    for text in (B64[:-3], "not base64!" * 4):
        item = parse_images_json(_answer(b'{"data":[{"b64_json":"%s"}]}' % text.encode()))["data"][0]
        with pytest.raises(BackendTransientError):
            b64_image(item["b64_json"], "openai")
    with pytest.raises(BackendTransientError):
        parse_images_json(_answer(b'{"data":[{"b64_json":"abc'))  # cut off mid-body


@respx.mock
async def test_gemini_answers_with_escapes_or_odd_shapes_are_read_as_plain_json():
    escaped = json.dumps({"candidates": [{"content": {"parts": [{"inlineData": {"mimeType": "image/png",
                         "data": B64}}]}}]}).replace("/", "\\/").encode()  # JSON may escape every '/'
    route(respx, "gemini").respond(200, content=escaped)
    result = await make(GEMINI).generate(JOB, soon())
    assert result.images[0].content() == PNG and result.images[0].b64_literal is None
    route(respx, "gemini").respond(200, json={"candidates": "not a list"})
    with pytest.raises(BackendError):  # another shape: plain JSON, then the usual checks refuse it
        await make(GEMINI).generate(JOB, soon())
