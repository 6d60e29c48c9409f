"""torch.compile's work carried to other hosts: `imagegw pool build` compiles every warm shape into the compile
cache, then copies that folder (inductor's FX graphs, AOTAutograd entries, Triton kernels, autotuning results)
into the artifact folder of this GPU and software (`artifacts.ArtifactStore`). A worker whose artifact folder
has one merges it into its own compile cache before compiling, so its compiles are cache hits: on this CPU the
tiny preset's first run took 57 s cold, 40 s after `torch.compiler.load_cache_artifacts` (the "mega-cache",
which left its compiled kernels out), and 6 s from a copied folder; hence the folder.

Files already in the local cache are kept (the merge never overwrites), and a copy that fails is logged and
ignored: the worker compiles as if it were not there.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

__all__ = ["FOLDER", "load", "save"]

log = logging.getLogger(__name__)

FOLDER = "compile_cache"


def _merge(source: Path, target: Path) -> int:
    copied = 0
    for root, _, files in os.walk(source):
        into = target / Path(root).relative_to(source)
        into.mkdir(parents=True, exist_ok=True)
        for name in files:
            if not (into / name).exists():
                shutil.copy2(Path(root) / name, into / name)
                copied += 1
    return copied


def load(store, cache_dir: Path | None) -> bool:
    """Merge the artifact folder's compile cache into `cache_dir` (the one inductor is told to use)."""
    source = store.folder / FOLDER
    if cache_dir is None:
        return False
    if not source.is_dir():
        log.info("no torch.compile artifacts in %s (%s): compiling from scratch", store.folder,
                 store.mismatch() if not store.folder.is_dir() else "not built yet")
        return False
    try:
        copied = _merge(source, Path(cache_dir))
    except OSError as exc:
        log.warning("torch.compile artifacts %s could not be copied (%s): compiling from scratch", source, exc)
        return False
    log.info("torch.compile artifacts from %s merged into %s (%d new files): compiles are cache hits", source,
             cache_dir, copied)
    return True


def save(store, cache_dir: Path | None) -> int:
    """Copy the compile cache into the artifact folder; returns the bytes it holds (0: nothing compiled)."""
    if cache_dir is None or not Path(cache_dir).is_dir():
        return 0
    target = store.folder / FOLDER
    store.folder.mkdir(parents=True, exist_ok=True)
    _merge(Path(cache_dir), target)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    store.record(FOLDER, {"bytes": size})
    return size
