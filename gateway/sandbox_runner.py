"""Runs the providers' sandbox as a second HTTP server inside the gateway's event loop."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from urllib.parse import urlsplit

import uvicorn
import yaml

from backends.sandbox import SandboxConfig, create_sandbox_app

__all__ = ["SandboxServer", "load_sandbox_config"]


def load_sandbox_config(path: Path | None) -> SandboxConfig:
    if path is None:
        return SandboxConfig()
    return SandboxConfig.model_validate(yaml.safe_load(path.read_text()) or {})


class SandboxServer:
    def __init__(self, url: str, config: SandboxConfig):
        parts = urlsplit(url)
        self._server = uvicorn.Server(uvicorn.Config(create_sandbox_app(config), host=parts.hostname,
                                                     port=parts.port, log_level="warning", lifespan="off"))
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._server.config.setup_event_loop = lambda: None  # share the gateway's loop
        self._task = asyncio.create_task(self._server.serve(), name="sandbox-server")
        for _ in range(200):
            if self._server.started or self._task.done():
                break
            await asyncio.sleep(0.01)
        if self._task.done():
            self._task.result()  # re-raise a bind error

    async def stop(self) -> None:
        if self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._task, 5)
