"""Identical requests served once: a disk cache of delivered images, and single flight for identical requests in
flight at the same time.

A request is cacheable when it names a seed: without one a client asks for a new image (`cache.unseeded` opts
those in too). Its key is a digest of everything that shapes the images it gets: the prompt (Unicode NFC, runs
of whitespace collapsed, trimmed), the negative prompt, size, n, steps, seed, model, tier, quality and output
format, and the tenant unless `cache.shared_across_tenants`. The response format is not in it: a cached image is
answered as base64 or as a URL alike.

On disk, under `cache.dir` in the data folder: `<key>.json` (what was served, by whom, at what cost) and
`<key>.<i>` per image, written under temporary names and moved in place (a reader never sees half an entry).
Entries expire after `cache.ttl_s`; past `cache.max_bytes` the least recently used go first (by the meta file's
time of last use, so replicas sharing a folder agree on it).

Each replica keeps its own folder unless `cache.shared_dir` says `cache.dir` is on storage they all share. Then a
replica looks on disk for entries the others made, and single flight spans the fleet through the state store
(Redis): the first replica to claim a key's lease makes the images, and identical requests on other replicas
wait for its entry while the lease is held (at most their own time left), then make their own if none came.
Without Redis, or while it is away, single flight is per replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
import unicodedata
import uuid
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path

from backends.protocol import GeneratedImage

__all__ = ["CachedResult", "ResultCache", "request_key"]

log = logging.getLogger(__name__)

_SPACE = re.compile(r"\s+")


def _normal(text: str | None) -> str:
    return _SPACE.sub(" ", unicodedata.normalize("NFC", text or "")).strip()


def request_key(req, width: int, height: int, tenant: str | None, *, shared: bool = False) -> str:
    """The digest identical requests share (see the module docstring for what counts)."""
    fields = {
        "prompt": _normal(req.prompt), "negative_prompt": _normal(req.negative_prompt),
        "size": f"{width}x{height}", "n": req.n, "steps": req.steps, "seed": req.seed, "model": req.model,
        "tier": req.tier, "quality": req.quality, "output_format": req.output_format,
        "tenant": None if shared else (tenant or "anonymous"),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class CachedResult:
    """What one request was served: the delivered images and what they cost when they were made."""

    images: tuple[GeneratedImage, ...]
    size: str
    backend: str
    model: str
    cost_usd: float
    made_by: str  # the decision id of the request that made them
    created: float = 0.0


class _Flight:
    """The first of identical requests in flight makes the images; the others wait for them."""

    def __init__(self):
        self.done = asyncio.get_running_loop().create_future()
        self.followers = 0


class ResultCache:
    # How often a request waits on another replica's generation checks whether it has landed.
    FLEET_POLL_S = 0.05
    # In a shared folder, how stale this replica's view of the entries may be when it evicts (others add them).
    RESCAN_S = 60.0

    def __init__(self, folder: Path, *, max_bytes: int, ttl_s: float, unseeded: bool = False,
                 shared_across_tenants: bool = False, single_flight: bool = True, enabled: bool = True,
                 shared_dir: bool = False, fleet=None, clock=time.time):
        self.folder = Path(folder)
        self.max_bytes, self.ttl_s = max_bytes, ttl_s
        self.unseeded, self.shared, self.single_flight, self.enabled = (unseeded, shared_across_tenants,
                                                                       single_flight, enabled)
        self.shared_dir = shared_dir
        self.fleet = fleet if shared_dir and single_flight else None  # a StateStore leasing keys to replicas
        self._clock = clock
        self._leased: set[str] = set()  # keys this replica leads for the fleet
        # Runs a store call off the request path (StateSync.spawn, which also drains them at shutdown); without
        # one a lease is left to expire.
        self.spawn: Callable[[Coroutine], None] | None = None
        # key -> (last use, bytes), least recently used first (eviction pops from the front, O(1) an entry);
        # loaded at first use
        self._index: OrderedDict[str, tuple[float, int]] | None = None
        # The index is read and changed by the threads that do the disk I/O, several at once under load (a batch's
        # jobs land together): every use holds this lock. An unguarded eviction once raised "dictionary changed
        # size during iteration" and failed a request whose images were made.
        self._lock = threading.RLock()
        self._used = 0  # bytes the index holds, kept with it (a sum per write was a pass over every entry)
        self._scanned = 0.0  # when the index was last read from the folder
        self._flights: dict[str, _Flight] = {}
        self.hits = self.shared_hits = self.misses = 0
        self.saved_usd = 0.0

    def key(self, req, width: int, height: int, tenant: str | None) -> str | None:
        """The request's key, or None when it is not cacheable."""
        if not self.enabled or (req.seed is None and not self.unseeded):
            return None
        return request_key(req, width, height, tenant, shared=self.shared)

    # -- disk ------------------------------------------------------------------------------------------------

    async def get(self, key: str) -> CachedResult | None:
        found = await self._lookup(key)
        if found is None:
            self.misses += 1
        return found

    async def _lookup(self, key: str) -> CachedResult | None:
        if not self.shared_dir and self._index is not None and key not in self._index:
            # a known miss costs no thread and no disk (in a shared folder another replica may have made it)
            return None
        try:
            return await asyncio.to_thread(self._read, key)
        except (OSError, ValueError, KeyError) as exc:  # a damaged entry is a miss, never an error
            log.warning("result cache entry %s unreadable (%s): ignored", key[:12], exc)
            return None
        except Exception:  # a bug here costs the cache, never the request
            log.exception("result cache lookup of %s failed: treated as a miss", key[:12])
            return None

    async def put(self, key: str, result: CachedResult) -> None:
        if not all(image.present for image in result.images):
            return  # links the provider hosts: nothing of ours to keep
        try:
            await asyncio.to_thread(self._write, key, result)
        except OSError as exc:  # a full disk costs the cache, not the request
            log.warning("result cache could not store %s: %s", key[:12], exc)
        except Exception:  # nor does a bug: the images are made, the request gets them
            log.exception("result cache could not store %s", key[:12])

    def _meta(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def _load_index(self, rescan: bool = False) -> OrderedDict[str, tuple[float, int]]:
        with self._lock:
            if rescan and time.monotonic() - self._scanned > self.RESCAN_S:
                self._index = None  # what the other replicas made and used meanwhile counts towards max_bytes
            if self._index is None:
                self._scanned = time.monotonic()
                found = {}
                for meta in self.folder.glob("*.json") if self.folder.is_dir() else ():
                    with contextlib.suppress(OSError, ValueError):
                        info = json.loads(meta.read_text())
                        found[meta.stem] = (meta.stat().st_mtime, int(info.get("bytes", 0)))
                index = OrderedDict(sorted(found.items(), key=lambda item: item[1][0]))
                self._index, self._used = index, sum(size for _, size in index.values())
            return self._index

    def _note(self, key: str, used_at: float, size: int) -> None:
        """Record an entry's last use and size in the current index (the caller holds the lock)."""
        index = self._load_index()
        old = index.get(key)
        index[key] = (used_at, size)
        index.move_to_end(key)  # used now: the last to go
        self._used += size - (old[1] if old else 0)

    def _forget(self, key: str) -> None:
        """Drop an entry from the index, if it is loaded (the caller holds the lock)."""
        old = self._index.pop(key, None) if self._index is not None else None
        if old is not None:
            self._used -= old[1]

    def _read(self, key: str) -> CachedResult | None:
        meta_path = self._meta(key)
        with self._lock:
            known = key in self._load_index()
        if (not known and not self.shared_dir) or not meta_path.is_file():
            with self._lock:
                self._forget(key)
            return None
        info = json.loads(meta_path.read_text())
        now = self._clock()
        if now - info["created"] > self.ttl_s:
            self._remove(key)
            return None
        images = tuple(GeneratedImage(data=(self.folder / f"{key}.{i}").read_bytes(), media_type=media)
                       for i, media in enumerate(info["media_types"]))
        os.utime(meta_path, (now, now))  # last use, for eviction
        with self._lock:  # one another replica made counts from now too
            self._note(key, now, int(info.get("bytes", 0)))
        return CachedResult(images=images, size=info["size"], backend=info["backend"], model=info["model"],
                            cost_usd=info["cost_usd"], made_by=info["made_by"], created=info["created"])

    def _write(self, key: str, result: CachedResult) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._load_index(rescan=self.shared_dir)  # a write may evict: know what the others hold
        total = 0
        suffix = f".tmp-{uuid.uuid4().hex[:12]}"  # unique across the replicas of a shared folder
        for i, image in enumerate(result.images):
            data = image.content()
            tmp = self.folder / f"{key}.{i}{suffix}"
            tmp.write_bytes(data)
            os.replace(tmp, self.folder / f"{key}.{i}")
            total += len(data)
        info = {"created": self._clock(), "size": result.size, "backend": result.backend, "model": result.model,
                "cost_usd": result.cost_usd, "made_by": result.made_by, "bytes": total,
                "media_types": [image.media_type for image in result.images]}
        tmp = self.folder / f"{key}.json{suffix}"
        tmp.write_text(json.dumps(info))
        os.replace(tmp, self._meta(key))  # last: an entry exists only once its images do
        now = self._clock()
        os.utime(self._meta(key), (now, now))  # last use, on the clock every replica reads it by
        with self._lock:
            self._note(key, now, total)
            victims = self._victims() if self._used > self.max_bytes else []
        for victim in victims:
            self._remove(victim)

    def _victims(self) -> list[str]:
        """The least recently used entries to drop for the rest to fit max_bytes (the caller holds the lock)."""
        used, victims = self._used, []
        for key, (_, size) in self._load_index().items():  # least recently used first
            if used <= self.max_bytes:
                break
            victims.append(key)
            used -= size
        return victims

    def _remove(self, key: str) -> None:
        with self._lock:
            self._forget(key)
        meta = self._meta(key)
        with contextlib.suppress(OSError, ValueError):
            count = len(json.loads(meta.read_text()).get("media_types", []))
            meta.unlink()
            for i in range(count):
                (self.folder / f"{key}.{i}").unlink(missing_ok=True)

    # -- single flight -----------------------------------------------------------------------------------------

    def join(self, key: str) -> tuple[bool, asyncio.Future]:
        """(True, future) for the first of identical requests: it makes the images and `land`s them;
        (False, future) for the others: they await the future (a CachedResult, or None if the first failed)."""
        flight = self._flights.get(key) if self.single_flight else None
        if flight is None:
            flight = _Flight()
            if self.single_flight:
                self._flights[key] = flight
            return True, flight.done
        flight.followers += 1
        return False, flight.done

    def land(self, key: str, result: CachedResult | None) -> None:
        """The first request is done (None: it failed; its followers then make their own)."""
        flight = self._flights.pop(key, None)
        if flight is not None and not flight.done.done():
            flight.done.set_result(result)
        if key in self._leased:
            self._leased.discard(key)
            if self.spawn is not None:
                self.spawn(self.fleet.release_flight(key))

    async def from_fleet(self, key: str, within_s: float) -> tuple[CachedResult | None, str]:
        """For the first of identical requests on this replica: the images another replica is making for the
        same key (it holds the lease), waited for at most `within_s`, as (images, "shared"); or (images, "hit")
        when they landed just before. (None, "") when this replica leads (it then makes them and `land`s them),
        when nobody answers for the fleet, or when the other replica failed."""
        if self.fleet is None or within_s <= 0:
            return None, ""
        claimed = await self.fleet.claim_flight(key, within_s + 1.0)  # a lease outlives its maker's deadline
        if claimed is None:
            return None, ""
        if claimed:  # the lease was free: made and landed meanwhile, or never asked for
            found = await self._lookup(key)  # a maker stores its entry before it releases its lease
            if found is not None:
                await self.fleet.release_flight(key)
                return found, "hit"
            self._leased.add(key)
            return None, ""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline and await self.fleet.flight_held(key):
            await asyncio.sleep(self.FLEET_POLL_S)
        return await self._lookup(key), "shared"

    def served(self, kind: str, saved_usd: float) -> None:
        """Count an answer given from an identical request's images (`hit` or `shared`)."""
        if kind == "hit":
            self.hits += 1
        else:
            self.shared_hits += 1
        self.saved_usd += saved_usd

    def stats(self) -> dict:
        with self._lock:
            entries, used = len(self._index or {}), self._used
        return {"enabled": self.enabled, "entries": entries, "bytes": used,
                "max_bytes": self.max_bytes, "hits": self.hits, "shared": self.shared_hits, "misses": self.misses,
                "saved_usd": round(self.saved_usd, 6), "in_flight": len(self._flights)}
