"""Live outcome statistics per backend: latency quantiles and error rate over a sliding window.

Fed from finished requests' attempts; read by the snapshot, which switches a
backend's latency prediction from its configured prior to what was observed once
enough samples exist. With Redis, every replica's samples are shared (gateway/state_sync.py).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["BackendStats", "OutcomeStats"]


@dataclass(frozen=True, slots=True)
class BackendStats:
    samples: int
    p50_ms: float
    p95_ms: float
    error_rate: float


def _quantile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


class OutcomeStats:
    def __init__(self, window_s: float = 600.0, max_samples: int = 2000, clock: Callable[[], float] = time.time):
        self.window_s = window_s
        self.max_samples = max_samples
        self._clock = clock
        self._outcomes: dict[str, deque[tuple[float, float, bool]]] = {}
        # Quantiles are read on every request and change only with new samples: cache them per backend,
        # recomputed after a change or once a second (so the window still slides).
        self._cache: dict[str, tuple[float, BackendStats | None]] = {}

    def add(self, backend: str, latency_ms: float, ok: bool) -> None:
        window = self._outcomes.setdefault(backend, deque(maxlen=self.max_samples))
        window.append((self._clock(), latency_ms, ok))
        self._cache.pop(backend, None)

    def replace(self, backend: str, samples: list[tuple[float, float, bool]]) -> None:
        """Adopt the shared samples (wall-clock time, latency ms, ok) every replica contributed."""
        self._outcomes[backend] = deque(sorted(samples), maxlen=self.max_samples)
        self._cache.pop(backend, None)

    def attempts(self, record: dict) -> list[tuple[str, float, bool]]:
        return [(a["backend"], a["latency_ms"], a["outcome"] == "ok") for a in record.get("attempts") or ()
                if a["outcome"] in ("ok", "error", "timeout")]

    def observe_record(self, record: dict) -> None:
        """Every attempt that reached a backend counts; skipped and cancelled ones say nothing."""
        for backend, latency_ms, ok in self.attempts(record):
            self.add(backend, latency_ms, ok)

    def get(self, backend: str) -> BackendStats | None:
        now = self._clock()
        cached = self._cache.get(backend)
        if cached is not None and now - cached[0] < 1.0:
            return cached[1]
        stats = self._compute(backend)
        self._cache[backend] = (now, stats)
        return stats

    def _compute(self, backend: str) -> BackendStats | None:
        window = self._outcomes.get(backend)
        if not window:
            return None
        cutoff = self._clock() - self.window_s
        while window and window[0][0] < cutoff:
            window.popleft()
        ok = sorted(lat for _, lat, good in window if good)
        if not ok:
            return BackendStats(len(window), 0.0, 0.0, 1.0 if window else 0.0)
        return BackendStats(len(ok), _quantile(ok, 0.5), _quantile(ok, 0.95),
                            1 - len(ok) / len(window))
