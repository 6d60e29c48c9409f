"""Images for url responses live under unguessable names until they expire."""

from __future__ import annotations

from gateway.image_store import ImageStore


async def test_stored_image_is_found_until_it_expires(tmp_path):
    now = [1_000_000.0]
    store = ImageStore(tmp_path, ttl_s=60, clock=lambda: now[0])
    await store.start()
    name = await store.put(b"\x89PNG...", "image/png")
    assert (tmp_path / name).read_bytes() == b"\x89PNG..."  # put() wrote it
    import os

    os.utime(tmp_path / name, (now[0], now[0]))  # its birth, on the test's clock
    assert store.locate(name) == (tmp_path / name, "image/png")
    now[0] += 61
    assert store.locate(name) is None
    assert store.sweep() == 1 and not (tmp_path / name).exists()
    await store.close()


def test_names_are_unguessable_and_paths_cannot_escape(tmp_path):
    store = ImageStore(tmp_path, ttl_s=60)
    assert store.locate("../etc/passwd") is None
    assert store.locate("short.png") is None
