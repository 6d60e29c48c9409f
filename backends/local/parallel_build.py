"""One package compiled in a process of its own (`imagegw pool build --jobs N`): load the pipeline, export and
compile one component into the store, return the seconds it took."""

from __future__ import annotations

import time

from .artifacts import Component
from .engine import DiffusionEngine, EngineSpec

__all__ = ["build_component"]


def build_component(spec: EngineSpec, component: Component) -> float:
    engine = DiffusionEngine(spec)
    engine.load()
    started = time.perf_counter()
    engine.aot.build(component.width, component.height, [component])
    return time.perf_counter() - started
