"""Compiles run in processes of their own (`imagegw pool build --jobs N`), so they overlap on a host with the
cores and the GPU memory: each process loads the pipeline and compiles one thing.

- `build_component`: one AOTInductor package into the store; returns the seconds it took.
- `build_jit_shape`: one warm shape through torch.compile into the process's own compile cache (the parent
  merges the caches into the artifact folder: entries are content-addressed, so they never collide).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from .artifacts import Component
from .engine import DiffusionEngine, EngineSpec

__all__ = ["build_component", "build_jit_shape"]


def build_component(spec: EngineSpec, component: Component) -> float:
    engine = DiffusionEngine(spec)
    engine.load()
    started = time.perf_counter()
    engine.aot.build(component.width, component.height, [component])
    return time.perf_counter() - started


def build_jit_shape(spec: EngineSpec, cache_dir: Path, width: int, height: int, batch: int, steps: int) -> float:
    engine = DiffusionEngine(dataclasses.replace(spec, cache_dir=cache_dir, run_sizes=(batch,)))
    engine.load()
    started = time.perf_counter()
    engine.generate(["build"] * batch, width=width, height=height, steps=steps, seeds=list(range(batch)))
    return time.perf_counter() - started
