"""The local pool's throughput profile: seconds per batch for (model, size, steps, batch size).

Measured by `imagegw pool calibrate`, corrected by observed batches, read by both
the batcher (which batch size meets the deadlines) and `decide()` (predicted
completion and cost per image). Pure data and arithmetic: no I/O, no clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["ProfileKey", "ThroughputProfile", "padded_batch"]

ProfileKey = tuple[str, int, int, int]  # model, width, height, steps


@dataclass(frozen=True, slots=True)
class ThroughputProfile:
    """Measured batch seconds, plus a conservative prior for shapes never measured."""

    # (model, width, height, steps) -> {batch size: seconds}
    table: dict[ProfileKey, dict[int, float]] = field(default_factory=dict)
    # Fallback: seconds = fixed_s + unit_s x steps x megapixels x batch (deliberately pessimistic).
    prior_fixed_s: float = 0.05
    prior_unit_s: float = 0.5
    max_batch: int = 8
    # Batch sizes the device runs (a compiled engine has one static graph per size): a batch is padded
    # up to the smallest that holds it, and takes that size's time. Empty: every size runs as it is.
    run_sizes: tuple[int, ...] = ()

    def run_size(self, batch: int) -> int:
        return padded_batch(self.run_sizes, batch)

    def seconds(self, model: str, width: int, height: int, steps: int, batch: int) -> float:
        """Predicted wall time of one batch of `batch` images of this shape."""
        batch = self.run_size(batch)
        exact = self.table.get((model, width, height, steps))
        if exact:
            return _interpolate(exact, batch)
        nearest = self._nearest(model, width, height, steps)
        if nearest is not None:
            key, measured = nearest
            scale = (steps / key[3]) * (width * height) / (key[1] * key[2])
            return _interpolate(measured, batch) * scale
        return self.prior_fixed_s + self.prior_unit_s * steps * width * height / 1e6 * batch

    def observed(self, model: str, width: int, height: int, steps: int) -> bool:
        """Whether this shape was ever measured (else its prediction is scaled from another, or the prior)."""
        return bool(self.table.get((model, width, height, steps)))

    def seconds_per_image(self, model: str, width: int, height: int, steps: int, batch: int) -> float:
        return self.seconds(model, width, height, steps, batch) / max(batch, 1)

    def _nearest(self, model, width, height, steps):
        same_model = [(k, v) for k, v in self.table.items() if k[0] == model and v]
        if not same_model:
            return None
        pixels = width * height
        return min(same_model, key=lambda kv: (abs(math.log(kv[0][1] * kv[0][2] / pixels)),
                                               abs(math.log(kv[0][3] / steps)), kv[0]))

    def observe(self, model: str, width: int, height: int, steps: int, batch: int, seconds: float,
                weight: float = 0.3) -> ThroughputProfile:
        """A new profile with this observed batch folded in (EWMA on measured points)."""
        key, batch = (model, width, height, steps), self.run_size(batch)
        row = dict(self.table.get(key, {}))
        prior = row.get(batch)
        row[batch] = seconds if prior is None else (1 - weight) * prior + weight * seconds
        return ThroughputProfile({**self.table, key: row}, self.prior_fixed_s, self.prior_unit_s, self.max_batch,
                                 self.run_sizes)

    def to_json(self) -> dict:
        return {"max_batch": self.max_batch, "prior_fixed_s": self.prior_fixed_s, "prior_unit_s": self.prior_unit_s,
                "entries": [{"model": k[0], "width": k[1], "height": k[2], "steps": k[3], "batch": b, "seconds": s}
                            for k, row in sorted(self.table.items()) for b, s in sorted(row.items())]}

    @classmethod
    def from_json(cls, data: dict) -> ThroughputProfile:
        table: dict[ProfileKey, dict[int, float]] = {}
        for e in data.get("entries", []):
            table.setdefault((e["model"], int(e["width"]), int(e["height"]), int(e["steps"])), {})[
                int(e["batch"])] = float(e["seconds"])
        return cls(table, float(data.get("prior_fixed_s", 0.05)), float(data.get("prior_unit_s", 0.5)),
                   int(data.get("max_batch", 8)))


def padded_batch(run_sizes: tuple[int, ...], batch: int) -> int:
    """The batch size a device with these compiled sizes (ascending) runs for `batch` images: the smallest
    that holds them, or `batch` itself when none does (or none is set)."""
    for size in run_sizes:  # a loop, not next(genexpr): this runs on every routing decision
        if size >= batch:
            return size
    return batch


def _interpolate(row: dict[int, float], batch: int) -> float:
    """Linear in batch size between measured points; beyond them, extend the nearest segment's slope."""
    if batch in row:
        return row[batch]
    sizes = sorted(row)
    if len(sizes) == 1:
        only = sizes[0]
        return row[only] * batch / only  # no slope known: assume no batching gain (pessimistic)
    lo = max((b for b in sizes if b < batch), default=sizes[0])
    hi = min((b for b in sizes if b > batch), default=sizes[-1])
    if lo == hi:
        lo, hi = (sizes[-2], sizes[-1]) if batch > sizes[-1] else (sizes[0], sizes[1])
    slope = (row[hi] - row[lo]) / (hi - lo)
    return max(row[lo] + slope * (batch - lo), 1e-6)
