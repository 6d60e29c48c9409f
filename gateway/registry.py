"""Builds the configured backends from settings; adding a provider touches only its module."""

from __future__ import annotations

import logging

from backends.protocol import Backend

from .settings import Settings

__all__ = ["build_backends"]

log = logging.getLogger(__name__)


def build_backends(settings: Settings) -> dict[str, Backend]:
    """The local pool (when enabled) plus one backend per `backends:` entry."""
    backends: dict[str, Backend] = {}
    if settings.local.enabled:
        from backends.local import EngineSpec, LocalPoolBackend

        spec = EngineSpec(
            preset=settings.local.preset, weights_dir=settings.local.weights_dir,
            device=settings.local.device, dtype=settings.local.dtype,
        )
        backends["local"] = LocalPoolBackend.from_spec(
            spec, max_n=settings.local.max_n, gpu_hour_usd=settings.local.gpu_hour_usd,
            warmup=settings.local.warmup,
        )
    for name, provider in settings.backends.items():
        log.warning("backend %s (%s): no module for this kind yet; skipped", name, provider.kind)
    return backends
