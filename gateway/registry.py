"""Builds the configured backends and their guards from settings.

Adding a provider touches only its module (registered in `backends.maas.PROVIDERS`)
and config; nothing here names a provider.
"""

from __future__ import annotations

import glob
import logging
import socket
import subprocess
import sys
from dataclasses import dataclass, field

from pydantic import SecretStr

from backends.protocol import Backend

from .ejection import EjectionCap, EjectionConfig
from .guard import BackendGuard
from .settings import ProviderSettings, Settings

__all__ = ["Backends", "build_backends", "sandbox_active"]

log = logging.getLogger(__name__)


@dataclass
class Backends:
    """Everything the gateway routes to, with one guard per backend, and the sandbox's address if used."""

    backends: dict[str, Backend]
    guards: dict[str, BackendGuard] = field(default_factory=dict)
    sandbox_url: str | None = None
    cap: EjectionCap | None = None  # told the tiers' candidate sets once the policy is known


def sandbox_active(settings: Settings) -> bool:
    if settings.sandbox.mode != "auto":
        return settings.sandbox.mode == "on"
    return bool(settings.backends) and all(p.api_key() is None for p in settings.backends.values())


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _provider(name: str, provider: ProviderSettings, settings: Settings, sandbox_url: str | None) -> Backend:
    from backends.maas import PROVIDERS, ProviderConfig
    from backends.sandbox import SANDBOX_PREFIX

    cls = PROVIDERS[provider.kind]
    base_url, key = provider.base_url, provider.api_key()
    if sandbox_url is not None and provider.kind in SANDBOX_PREFIX:
        base_url, key = sandbox_url + SANDBOX_PREFIX[provider.kind], SecretStr("sandbox")
    config = ProviderConfig(
        name=name, base_url=base_url, api_key=key, model=provider.model or provider.kind,
        timeout_s=provider.timeout_s, connect_timeout_s=provider.connect_timeout_s,
        max_download_bytes=settings.images.max_download_bytes, max_n=provider.max_n,
        sandbox=sandbox_url is not None and provider.kind in SANDBOX_PREFIX, options=provider.options,
        transport=provider.transport, ca_bundle=str(provider.ca_bundle) if provider.ca_bundle else None,
    )
    return cls(config)


_COUNT_GPUS = "import torch; print(torch.cuda.device_count())"


def _uses_processes(workers: str, gpus: int) -> bool:
    """Workers run in a process each when asked, or (`auto`) on several GPUs."""
    return workers == "process" or (workers == "auto" and gpus > 1)


def _devices(requested: list[str] | str, workers: str) -> list[str]:
    """The devices for `local.devices: auto`: every CUDA device, else the CPU. Where the workers will be processes
    (asked for, or `auto` on a host with several GPU device nodes), the count is taken in a child process:
    importing torch here only to count would keep ~200 MB of it resident in a gateway whose workers hold their own
    (measured: 267 MB -> 72 MB at start, tiny preset on CPU). Thread workers run torch in this process anyway."""
    if requested != "auto":
        return list(requested)
    # Before torch counts them, the device nodes say whether the workers will be processes.
    count = _gpu_count_in_child() if _uses_processes(workers, len(glob.glob("/dev/nvidia[0-9]*"))) else None
    if count is None:
        import torch

        count = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(count)] if count else ["cpu"]


def _gpu_count_in_child() -> int | None:
    try:
        out = subprocess.run([sys.executable, "-c", _COUNT_GPUS], capture_output=True, text=True, timeout=300,
                             check=True).stdout
        return int(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        log.warning("could not count CUDA devices in a child process (%s); counting here", exc)
        return None


def _warm_shapes(local, compiled: bool) -> list:
    from backends.local import WarmShape
    from backends.local.presets import PRESETS

    if local.warm_shapes is not None:
        return [WarmShape(s.width, s.height, s.steps, b) for s in local.warm_shapes for b in s.batch_sizes]
    preset = PRESETS.get(local.preset, PRESETS["sdxl"])
    batches = [b for b in (1, 2, 4, 8) if b <= local.max_batch] if compiled else [1]
    return [WarmShape(preset.native_size, preset.native_size, preset.default_steps, b) for b in batches]


def build_local_pool(settings: Settings) -> Backend:
    """The diffusion pool: one worker per device, a process each when asked (or on several GPUs)."""
    from backends.local import EngineSpec, LocalPool, PoolConfig, ProcessWorker, ThreadWorker

    local = settings.local
    if local.workers == "remote":
        return _remote_pool(settings)
    devices = _devices(local.devices, local.workers)
    use_processes = _uses_processes(local.workers, len(devices))
    compiled = local.compile is True or (local.compile is None and any(d.startswith("cuda") for d in devices))
    warm = _warm_shapes(local, compiled)
    # A compiled engine serves only warmed sizes, so no request ever waits for a compile. Under jit it has one
    # static graph per (size, batch size) and smaller batches pad up to a warmed size; AOT packages take any
    # batch size up to max_batch.
    jit = compiled and local.compile_backend == "jit"
    run_sizes = tuple(sorted({w.batch for w in warm})) if jit else ()
    only_sizes = frozenset((w.width, w.height) for w in warm[:1]) if compiled else frozenset()
    if jit and max(run_sizes, default=1) < local.max_batch:
        log.warning("local.max_batch %d capped at %d, the largest warmed batch size (local.warm_shapes)",
                    local.max_batch, max(run_sizes, default=1))
    workers = []
    for i, device in enumerate(devices):
        spec = EngineSpec(preset=local.preset, weights_dir=local.weights_dir, device=device, dtype=local.dtype,
                          compile=local.compile, compile_mode=local.compile_mode, compile_vae=local.compile_vae,
                          dynamic_batch=local.dynamic_batch,
                          tune_layout=local.tune_layout, attention=local.attention, fp8=local.fp8,
                          cache_dir=settings.resolve(local.compile_cache), run_sizes=run_sizes,
                          compile_backend=local.compile_backend, artifacts_dir=settings.resolve(local.artifacts),
                          max_batch=local.max_batch)
        worker_cls = ProcessWorker if use_processes else ThreadWorker
        workers.append(worker_cls(spec, f"local-{i}({device})", warm))
    config = PoolConfig(name="local", max_n=local.max_n, max_batch=local.max_batch,
                        max_wait_s=local.max_wait_ms / 1000, gpu_hour_usd=local.gpu_hour_usd,
                        profile_path=settings.resolve(local.profile_file), run_sizes=run_sizes[:1],
                        only_sizes=only_sizes, compiled=(local.compile_backend if compiled else ""),
                        preempt=local.preempt)
    return LocalPool(workers[0].spec, workers, config)


def _remote_pool(settings: Settings) -> Backend:
    """The fleet's pool as this gateway sees it: batching and predictions here, workers joining by heartbeat
    (`backends.local.stream`). The workers' settings are this config's `local` section too (compile, warm shapes)."""
    from backends.local import EngineSpec, LocalPool, PoolConfig

    local = settings.local
    if not settings.redis_url:
        raise ValueError("local.workers remote needs redis_url: the workers take their batches from Redis")
    compiled = local.compile is not False  # GPU hosts compile unless told not to
    warm = _warm_shapes(local, compiled)
    jit = compiled and local.compile_backend == "jit"
    run_sizes = tuple(sorted({w.batch for w in warm})) if jit else ()
    spec = EngineSpec(preset=local.preset, weights_dir=local.weights_dir, device="remote", run_sizes=run_sizes,
                      compile_backend=local.compile_backend, max_batch=local.max_batch)
    config = PoolConfig(name="local", max_n=local.max_n, max_batch=local.max_batch,
                        max_wait_s=local.max_wait_ms / 1000, gpu_hour_usd=local.gpu_hour_usd,
                        profile_path=settings.resolve(local.profile_file), run_sizes=run_sizes[:1],
                        only_sizes=frozenset((w.width, w.height) for w in warm[:1]) if compiled else frozenset(),
                        compiled=(local.compile_backend if compiled else ""))
    return LocalPool(spec, [], config)


def build_backends(settings: Settings) -> Backends:
    """The local pool (when enabled) plus one backend per `backends:` entry, each with its guard."""
    backends: dict[str, Backend] = {}
    guards: dict[str, BackendGuard] = {}
    ejection = EjectionConfig(**settings.ejection.model_dump())
    cap = EjectionCap(ejection.max_ejected_percent)
    if settings.local.enabled:
        backends["local"] = build_local_pool(settings)
        guards["local"] = BackendGuard("local", ejection=ejection, cap=cap)
    sandbox_url = None
    if sandbox_active(settings):
        port = settings.sandbox.port or _free_port(settings.sandbox.host)
        sandbox_url = f"http://{settings.sandbox.host}:{port}"
        log.warning("SANDBOX MODE: no provider keys set; %s are emulated at %s (placeholder images)",
                    ", ".join(settings.backends), sandbox_url)
    for name, provider in settings.backends.items():
        backend = backends[name] = _provider(name, provider, settings, sandbox_url)
        guard = guards[name] = BackendGuard(name, ejection=ejection, max_concurrency=provider.max_concurrency,
                                            requests_per_minute=provider.requests_per_minute, cap=cap)
        if hasattr(backend, "pace"):
            backend.pace = guard.pacer.acquire  # every upstream call takes a turn
    return Backends(backends, guards, sandbox_url, cap)
