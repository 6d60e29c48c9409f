"""Gateway settings: one pydantic model per concern, composed into `Settings`.

Sources, later wins: the defaults below, `gateway.yaml` in the config folder,
then environment variables `IMAGEGW_<FIELD>` with `__` between nested keys,
e.g. `IMAGEGW_SERVER__PORT=9000` or `IMAGEGW_BACKENDS__REVE__BASE_URL=...`.
Secrets never live in these files: a backend names the environment variable
that holds its key (`api_key_env`), read once at start-up into a SecretStr.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

__all__ = [
    "AuditSettings",
    "EjectionSettings",
    "ImageSettings",
    "JobSettings",
    "LimitSettings",
    "LocalPoolSettings",
    "MetricsSettings",
    "ProviderSettings",
    "SandboxSettings",
    "WarmShapeSettings",
    "ServerSettings",
    "Settings",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    public_url: str | None = Field(
        None, description="Base URL clients reach us at, for image links; default: the request's."
    )
    max_body_bytes: int = Field(1_048_576, gt=0)
    drain_timeout_s: float = Field(
        30.0, gt=0, description="On SIGTERM/SIGINT: how long requests in flight may finish before they are cut; "
        "the process exits within this plus 5 s in any state (warming, serving, draining).")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto", description="Event loop; auto = uvloop when installed (measured: docs/benchmarks.md).")
    http: Literal["auto", "httptools", "h11"] = Field(
        "auto", description="HTTP/1.1 parser; auto = httptools when installed.")
    malloc_arena_max: int = Field(
        0, ge=0, description="Cap on glibc malloc arenas for the gateway process (mallopt at start); 0: glibc's "
        "default (8 per core). 2 keeps image buffers freed by threads from staying resident per thread (200 pool "
        "images of 1024x1024: RSS 148 MB against 194 MB); off until its effect on the threads that encode a "
        "multi-GPU pool's images is measured (docs/benchmarks.md).")


class AuditSettings(_Section):
    backend: Literal["sqlite", "postgres"] = Field(
        "sqlite", description="sqlite: a file per replica under data_dir (embedded default); postgres: one database "
        "for every replica (set dsn).")
    path: str = Field("audit.sqlite3", description="SQLite file, relative to data_dir.")
    dsn: SecretStr | None = Field(
        None, description="Postgres connection string (postgresql://user:pass@host/db or key=value), for backend "
        "postgres; best set as IMAGEGW_AUDIT__DSN. A secret: never logged.")
    pool_size: int = Field(4, gt=0, le=64, description="Postgres connections the writer may hold.")
    batch_size: int = Field(256, gt=0)
    flush_interval_s: float = Field(0.2, gt=0)

    @model_validator(mode="after")
    def _dsn_for_postgres(self) -> AuditSettings:
        if self.backend == "postgres" and not self.dsn_value():
            raise ValueError("audit.dsn is required when audit.backend is postgres (or set IMAGEGW_AUDIT__DSN)")
        return self

    def dsn_value(self) -> str:
        return self.dsn.get_secret_value() if self.dsn is not None else ""


class JobSettings(_Section):
    enabled: bool = Field(True, description="POST /v1/images/jobs (async jobs with webhooks).")
    store: Literal["auto", "sqlite", "postgres"] = Field(
        "auto", description="Where jobs and idempotency keys live: auto = the audit's Postgres when audit.backend "
        "is postgres (every replica sees every job), else SQLite under data_dir.")
    path: str = Field("jobs.sqlite3", description="SQLite file, relative to data_dir.")
    concurrency: int = Field(16, gt=0, description="Jobs one replica runs at once.")
    lease_s: float = Field(60.0, ge=1, description="A running job's lease, renewed every third of it: a job whose "
                           "replica died is run again (once at most) after this.")
    poll_interval_s: float = Field(0.5, gt=0, description="How often a replica looks for queued jobs and due webhooks.")
    idempotency_ttl_s: float = Field(86_400.0, gt=0, description="How long an Idempotency-Key is remembered.")
    webhook_secret_env: str = Field(
        "IMAGEGW_WEBHOOK_SECRET", description="Variable holding the master secret tenants' webhook secrets derive "
        "from (set the same on every replica); unset: one is generated into data_dir/webhook_secret.")
    webhook_allow_http: bool = Field(False, description="Allow http:// webhook URLs (https only by default).")
    webhook_allow_private: bool = Field(False, description="Allow webhook hosts on private/loopback addresses.")
    webhook_hosts: list[str] = Field(default_factory=list, description="Only these hosts (and subdomains); empty: any "
                                     "public host.")
    webhook_retry_for_s: float = Field(86_400.0, gt=0, description="A webhook not acknowledged is retried with "
                                       "backoff for this long after the job finished.")
    webhook_timeout_s: float = Field(10.0, gt=0)


class ImageSettings(_Section):
    dir: str = Field("images", description="Where url-format images are kept, under data_dir.")
    url_ttl_s: int = Field(3600, gt=0, description="How long an image URL stays valid.")
    max_download_bytes: int = Field(32 * 1024 * 1024, gt=0)


class CacheSettings(_Section):
    """The result cache and single flight (`gateway/result_cache.py`)."""

    enabled: bool = Field(True, description="Serve a repeat of a seeded request from the images it got before, "
                          "and make identical requests in flight once.")
    dir: str = Field("result_cache", description="Where cached images are kept, under data_dir.")
    max_bytes: int = Field(2 * 1024**3, ge=0, description="Past this the least recently used entries go.")
    ttl_s: float = Field(7 * 86_400, gt=0, description="An entry older than this is made anew.")
    unseeded: bool = Field(False, description="Cache requests without a seed too (they ask for a new image: off).")
    shared_across_tenants: bool = Field(False, description="One tenant's images served to another asking the "
                                        "same: off, each tenant has its own entries.")
    single_flight: bool = Field(True, description="Identical cacheable requests in flight share one generation.")
    shared_dir: bool = Field(False, description="`dir` is on storage every replica shares (an absolute path on a "
                             "shared volume): each replica serves the entries the others made, and with Redis "
                             "identical requests on different replicas share one generation too.")


class LimitSettings(_Section):
    model_aliases: dict[str, str] = Field(
        default_factory=lambda: {m: "auto" for m in ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini")},
        description="Model names clients send (OpenAI SDK defaults) and what they mean here.")
    prompt_max_chars: int = Field(32_000, gt=0)
    max_n: int = Field(10, ge=1, le=10)
    max_side: int = Field(4096, ge=64)
    max_steps: int = Field(150, ge=1)


class WarmShapeSettings(_Section):
    width: int = Field(ge=64)
    height: int = Field(ge=64)
    steps: int = Field(ge=1)
    batch_sizes: list[int] = Field(default_factory=lambda: [1])


class LocalPoolSettings(_Section):
    enabled: bool = True
    preset: Literal["tiny", "sd15", "sdxl"] = "tiny"
    weights_dir: Path | None = Field(None, description="Local diffusers folder; overrides preset.")
    devices: list[str] | Literal["auto"] = Field(
        "auto", description="auto: every visible GPU, else one CPU worker; or e.g. [cuda:0, cuda:1].")
    workers: Literal["auto", "thread", "process", "remote"] = Field(
        "auto", description="process: one child process per device (crash isolation); auto: process on multi-GPU; "
        "remote: no workers here, the fleet's `imagegw worker` processes serve through Redis (needs redis_url).")
    remote_reclaim_s: float = Field(
        10.0, gt=0, description="remote: a batch whose worker stopped renewing its claim this long is taken over "
        "by another worker (run once more at most).")
    remote_max_batch_s: float = Field(900.0, gt=0, description="remote: longest a gateway waits for a batch's answer.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: bool | None = Field(None, description="torch.compile; default on for CUDA.")
    compile_mode: Literal["reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "default"] = \
        "reduce-overhead"
    attention: Literal["auto", "cudnn", "flash"] = Field(
        "auto", description="Scaled-dot-product attention kernel: torch's choice, or cuDNN's / FlashAttention-2's.")
    compile_vae: bool = Field(True, description="Also compile the VAE decoder: SDXL batch 1 1.17 -> 1.03 s on an H100.")
    dynamic_batch: bool = Field(
        True, description="jit: one compiled UNet graph for every batch size (a start traces it once, not once per "
        "warm shape) and the VAE decoded image by image; false: one static graph per batch size.")
    tune_layout: bool = Field(True, description="Fused QKV projections and channels-last weights on CUDA.")
    fp8: bool = Field(False, description="FP8 UNet Linear layers (Hopper).")
    gpu_hour_usd: float = Field(2.0, ge=0)
    gpu_prices: dict[str, float] = Field(
        default_factory=lambda: {"h100": 2.0, "h200": 2.6},
        description="Hourly GPU rates `imagegw plan` (and POST /admin/plan) compares, by name (reserved or on "
        "demand, H100 or H200): what the pool would cost at each size.")
    max_n: int = Field(10, ge=1)
    max_batch: int = Field(8, ge=1, description="Most images in one batch.")
    max_wait_ms: float = Field(100, ge=0, description="Longest a job waits for company before its batch launches.")
    preempt: bool = Field(
        False, description="A request only the pool can serve in time runs first, pausing a running batch of "
        "flexible work after its current denoising step (policies: PoolModel.preemptive). On an H100 with SDXL "
        "compiled a pause costs 1.4 ms and the images are unchanged (benchmarks/preempt_gpu.py); in the simulator "
        "it is 8-15% cheaper on steady tight and mixed traffic at about equal SLA (benchmarks/preemption_study.py). "
        "Off by default: a live CPU soak met fewer SLAs with it, and it has not run under live traffic on a GPU.")
    profile_file: str = Field("pool_profile.json", description="Throughput profile under data_dir.")
    compile_cache: str = Field("compile_cache", description="Inductor cache under data_dir.")
    compile_backend: Literal["jit", "aot"] = Field(
        "jit", description="jit: torch.compile with CUDA graphs, one graph per warmed batch size, compiled at start "
        "(cache hits where `imagegw pool build` left its artifacts or the compile cache has them); aot: "
        "AOTInductor packages per image size taking every batch size, loaded from `artifacts` (built there when "
        "missing). Not the default: on torch 2.11 with CUDA the package loader crashed on an H200 (a check "
        "process catches that and the worker falls back to jit).")
    artifacts: str = Field("artifacts", description="What `imagegw pool build` compiles, under data_dir: copy it "
                           "to hosts with the same GPU and software; a mismatch is logged and compiled anew.")
    warm_shapes: list[WarmShapeSettings] | None = Field(
        None, description="Shapes compiled and timed: the pool is ready once the first is, and warms the rest in "
        "the background while idle; when compiled (GPU), the only sizes (and, under jit, batch sizes) it serves are "
        "those warmed so far. Default: the preset's native size and steps, at batch sizes 1, 2, 4, 8 (up to "
        "max_batch) when compiled, 1 otherwise.")


class ProviderSettings(_Section):
    """Connection to one per-request API (its price and quality live in the policy)."""

    kind: str = Field(description="Which backend module speaks to it: seedream, gemini, reve, bria, ...")
    base_url: str
    api_key_env: str | None = Field(None, description="Environment variable holding the key.")
    model: str | None = None
    timeout_s: float = Field(120.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    max_n: int = Field(10, ge=1, description="Images per request (sent as parallel calls).")
    max_concurrency: int | None = Field(None, ge=1, description="Calls in flight at once.")
    requests_per_minute: float | None = Field(
        None, gt=0, description="Upstream calls per minute at most (each of n, each submit and poll), in any "
        "60 s, shared by replicas through Redis.")
    ca_bundle: Path | None = Field(None, description="CA certificates (PEM) to verify this provider's TLS "
                                   "certificate; default: SSL_CERT_FILE, else the system's.")
    transport: Literal["fast", "httpx", "aiohttp"] = Field(
        "fast", description="fast: the gateway's lean HTTP/1.1 keep-alive transport; httpx: httpx's own pool; "
        "aiohttp: aiohttp's client (needs the aiohttp package; measured in docs/benchmarks.md).")
    options: dict = Field(default_factory=dict, description="Provider-specific knobs (see docs/providers.md).")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        from backends.maas import PROVIDERS

        if value not in PROVIDERS:
            raise ValueError(f"unknown backend kind {value!r}; known: {sorted(PROVIDERS)}")
        return value

    def api_key(self) -> SecretStr | None:
        value = os.environ.get(self.api_key_env) if self.api_key_env else None
        return SecretStr(value) if value else None


class EjectionSettings(_Section):
    """When a broken backend is taken out of rotation (5xx, timeouts, malformed replies; never 429s, which
    pace it instead), for how long, and how it comes back (gateway/ejection.py)."""

    consecutive_failures: int = Field(5, ge=1, description="Failures in a row that eject a backend.")
    error_rate: float = Field(0.5, gt=0, le=1, description="Failure share over window_s that ejects it.")
    window_s: float = Field(60.0, gt=0)
    min_requests: int = Field(10, ge=1, description="Calls in the window before error_rate applies.")
    base_ejection_s: float = Field(10.0, gt=0, description="First ejection; the n-th in a row lasts n times this.")
    max_ejection_s: float = Field(300.0, gt=0)
    max_ejected_percent: float = Field(
        50.0, ge=0, le=100, description="Most of a tier's candidates ejected at once (at least one of two or "
        "more; never the last one).")
    recovery_share: float = Field(0.25, gt=0, le=1, description="Share of calls let through after an ejection; "
                                  "doubles with each success until full service.")
    auth_ejection_s: float = Field(300.0, gt=0, description="Ejection after a bad key or account (401/402/403).")


class MetricsSettings(_Section):
    require_key: bool = Field(
        False, description="GET /metrics needs an admin key (its series name tenants and their spend).")


class SandboxSettings(_Section):
    """The providers' emulators, run inside the gateway process for demos and tests."""

    mode: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: emulate every provider when no provider key at all is set.")
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port.")
    config_file: Path | None = Field(None, description="Fault profiles (YAML); default: mild latency, no faults.")


class ApiKeySettings(_Section):
    key_sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$", description="sha256 hex of the key (never the key).")
    tenant: str = Field(min_length=1, max_length=128)
    role: Literal["app", "admin"] = "app"


class AuthSettings(_Section):
    keys: list[ApiKeySettings] = Field(default_factory=list)
    admin_key_env: str | None = Field("IMAGEGW_ADMIN_KEY", description="Variable holding an admin key.")
    anonymous_apps: bool | Literal["auto"] = Field(
        "auto", description="auto: app requests may be anonymous only while no app keys are configured.")

    def admin_key(self) -> str | None:
        return os.environ.get(self.admin_key_env) or None if self.admin_key_env else None


class Settings(BaseSettings):
    """Everything the gateway process needs to start."""

    model_config = SettingsConfigDict(
        env_prefix="IMAGEGW_", env_nested_delimiter="__", extra="forbid", nested_model_default_partial_update=True
    )

    config_dir: Path | None = Field(None, description="Folder holding gateway.yaml and policy.yaml.")
    data_dir: Path = Path("data")
    policy_file: str = Field("policy.yaml", description="Relative to config_dir.")
    server: ServerSettings = ServerSettings()
    audit: AuditSettings = AuditSettings()
    jobs: JobSettings = JobSettings()
    images: ImageSettings = ImageSettings()
    cache: CacheSettings = CacheSettings()
    limits: LimitSettings = LimitSettings()
    local: LocalPoolSettings = LocalPoolSettings()
    backends: dict[str, ProviderSettings] = Field(default_factory=dict)
    ejection: EjectionSettings = EjectionSettings()
    auth: AuthSettings = AuthSettings()
    policy_reload_interval_s: float = Field(2.0, ge=0, description="Poll policy.yaml for edits; 0 disables.")
    redis_url: str | None = Field(None, description="Share live state across replicas (e.g. redis://127.0.0.1:6379/0).")
    redis_namespace: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$", description="Key prefix imagegw:<ns>:")
    state_sync_interval_s: float = Field(1.0, gt=0, description="How often shared state is pulled into memory.")
    sandbox: SandboxSettings = SandboxSettings()
    metrics: MetricsSettings = MetricsSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file (init carries the parsed gateway.yaml).
        return env_settings, init_settings

    def resolve(self, relative: str) -> Path:
        return self.data_dir / relative
