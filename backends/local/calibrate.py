"""Measures the throughput profile: seconds per batch for each (size, steps, batch size)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable

from policies.profile import ThroughputProfile

from .engine import DiffusionEngine

__all__ = ["calibrate"]


def calibrate(engine: DiffusionEngine, model: str, shapes: Iterable[tuple[int, int, int]], batches: list[int],
              repeats: int = 2, progress: Callable[[str], None] = lambda _: None,
              profile: ThroughputProfile | None = None) -> ThroughputProfile:
    """Time each shape at each batch size (one untimed warm-up run, then the median of `repeats`), as the
    worker runs it: generation and the copy to the host (the pool encodes while the worker runs its next batch)."""
    profile = profile or ThroughputProfile(max_batch=max(batches))
    table = {k: dict(v) for k, v in profile.table.items()}
    for width, height, steps in shapes:
        for batch in batches:
            progress(f"{width}x{height} {steps} steps, batch {batch}")
            runs = []
            for i in range(repeats + 1):
                started = time.perf_counter()
                images = engine.generate([f"calibration {i}"] * batch, width=width, height=height, steps=steps,
                                         seeds=list(range(batch)), output_type="uint8")
                images.cpu()  # the worker's part ends with its pixels on the host
                if i:  # the first run compiles and warms caches
                    runs.append(time.perf_counter() - started)
            table.setdefault((model, width, height, steps), {})[batch] = statistics.median(runs)
    return ThroughputProfile(table, profile.prior_fixed_s, profile.prior_unit_s, max(max(batches), profile.max_batch))
