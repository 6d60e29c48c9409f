"""Runs the providers' sandbox as a second HTTP server inside the gateway's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
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


class _QuietSandbox(logging.Filter):
    """uvicorn's servers share one logger: keep the sandbox's start and stop lines out of the gateway's log
    (they said "Started server process" twice), while its warnings and errors still show."""

    def __init__(self):
        super().__init__()
        self.active = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.active and record.levelno < logging.WARNING)


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        # The gateway's server owns SIGTERM/SIGINT and stops this one in its lifespan, after its own requests
        # (some of which call this one) have drained. Capturing them here stopped the emulators first.
        yield


class SandboxServer:
    def __init__(self, url: str, config: SandboxConfig):
        parts = urlsplit(url)
        self._server = _EmbeddedServer(uvicorn.Config(create_sandbox_app(config), host=parts.hostname,
                                                     port=parts.port, log_level="warning", lifespan="off",
                                                     log_config=None))
        self._task: asyncio.Task | None = None
        self._quiet = _QuietSandbox()

    async def start(self) -> None:
        self._server.config.setup_event_loop = lambda: None  # share the gateway's loop
        logging.getLogger("uvicorn.error").addFilter(self._quiet)
        self._quiet.active = True
        try:
            await self._start()
        finally:
            self._quiet.active = False

    async def _start(self) -> None:
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
            self._quiet.active = True
            try:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(self._task, 5)
            finally:
                self._quiet.active = False
