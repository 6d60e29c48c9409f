"""Keeps images for `response_format=url` and serves them under unguessable ids until they expire."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from pathlib import Path

__all__ = ["ImageStore"]

log = logging.getLogger(__name__)

_EXT = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}
_MEDIA = {v: k for k, v in _EXT.items()}
_NAME = re.compile(r"^[A-Za-z0-9_-]{32}\.(png|jpeg|webp)$")


class ImageStore:
    """Files under one folder; the name is the capability, the file's mtime its birth."""

    def __init__(self, root: Path, ttl_s: int, clock=time.time):
        self.root = root
        self.ttl_s = ttl_s
        self._clock = clock
        self._sweeper: asyncio.Task | None = None

    async def start(self) -> None:
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="image-store-sweeper")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    async def put(self, data: bytes, media_type: str) -> str:
        """Store bytes; returns the file name clients fetch it by."""
        name = f"{secrets.token_urlsafe(24)}.{_EXT.get(media_type, 'png')}"
        await asyncio.to_thread((self.root / name).write_bytes, data)
        return name

    def locate(self, name: str) -> tuple[Path, str] | None:
        """The path and media type of a live image, or None if unknown or expired."""
        if not _NAME.match(name):
            return None
        path = self.root / name
        try:
            born = path.stat().st_mtime
        except FileNotFoundError:
            return None
        if self._clock() - born > self.ttl_s:
            return None
        return path, _MEDIA[name.rsplit(".", 1)[1]]

    def sweep(self) -> int:
        """Delete expired files; returns how many."""
        cutoff, removed = self._clock() - self.ttl_s, 0
        for path in self.root.glob("*.*"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(min(60.0, self.ttl_s / 4))
            try:
                await asyncio.to_thread(self.sweep)
            except OSError:
                log.exception("image sweep failed")
