"""Compiles run in processes of their own (`imagegw pool build --jobs N`), so they overlap on a host with the
cores and the GPU memory: each process loads the pipeline and compiles one thing.

- `build_component`: one AOTInductor package into the store; returns the seconds it took.
- `build_jit_shapes`: warm shapes of one image size through torch.compile into the process's own compile cache
  (the parent merges the caches into the artifact folder: entries are content-addressed, so they never collide).
  Under a dynamic batch one process compiles all of a size's batch sizes (one graph); else one each.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from .artifacts import Component
from .engine import DiffusionEngine, EngineSpec

__all__ = ["build_component", "build_jit_shapes"]


def build_component(spec: EngineSpec, component: Component) -> float:
    engine = DiffusionEngine(spec)
    engine.load()
    started = time.perf_counter()
    engine.aot.build(component.width, component.height, [component])
    return time.perf_counter() - started


def build_jit_shapes(spec: EngineSpec, cache_dir: Path, width: int, height: int, batches: tuple[int, ...],
                     steps: int) -> float:
    engine = DiffusionEngine(dataclasses.replace(spec, cache_dir=cache_dir, run_sizes=tuple(batches)))
    engine.load()
    started = time.perf_counter()
    for batch in sorted(batches, reverse=True):  # the largest first: the rest then only capture CUDA graphs
        engine.generate(["build"] * batch, width=width, height=height, steps=steps, seeds=list(range(batch)))
    return time.perf_counter() - started
