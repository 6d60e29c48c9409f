"""Request traces for the simulator: the JSON-lines format, and synthetic generators.

One request per line: {"t": seconds from start, "tenant": "...", "tier": "...",
"sla_ms": int, "width": int, "height": int, "steps": int, "n": int, "job": bool}
(all but "t" optional). Generators are deterministic for a seed.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass

__all__ = ["KINDS", "SHAPES", "TraceRequest", "dump_jsonl", "from_records", "parse_jsonl", "synthetic",
           "unknown_tiers"]


@dataclass(frozen=True, slots=True)
class TraceRequest:
    t: float
    tenant: str = "default"
    tier: str | None = None
    sla_ms: int | None = None
    width: int = 1024
    height: int = 1024
    steps: int | None = None
    n: int = 1
    job: bool = False  # an async job (POST /v1/images/jobs): may be held for idle pool capacity

    def __post_init__(self):
        """Held to what a request to the gateway may say (a trace is read from files and the admin API): a bad
        field is a ValueError naming it, never a nonsense replay or a type error deep in the simulator."""
        if not _number(self.t) or not 0 <= self.t < 10**9:
            raise ValueError(f"t: seconds from the trace's start, a number from 0, not {self.t!r}")
        if not isinstance(self.tenant, str) or not 0 < len(self.tenant) <= 128:
            raise ValueError(f"tenant: a name of 1 to 128 characters, not {self.tenant!r}")
        if self.tier is not None and (not isinstance(self.tier, str) or not self.tier):
            raise ValueError(f"tier: a tier's name, not {self.tier!r}")
        for name, low, high, optional in _BOUNDS:
            value = getattr(self, name)
            if value is None and optional:
                continue
            if not _integer(value) or not low <= value <= high:
                raise ValueError(f"{name}: a whole number from {low} to {high}, not {value!r}")
        if not isinstance(self.job, bool):
            raise ValueError(f"job: true or false, not {self.job!r}")


# (field, least, most, may be null): the gateway's own request limits
_BOUNDS = (("sla_ms", 1, 86_400_000, True), ("width", 64, 99_999, False), ("height", 64, 99_999, False),
           ("steps", 1, 500, True), ("n", 1, 10, False))


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def unknown_tiers(trace: Iterable[TraceRequest], tiers) -> list[str]:
    """The tiers a trace names that `tiers` (a policy's) lacks: replaying those could only guess SLA and quality."""
    return sorted({r.tier for r in trace if r.tier is not None and r.tier not in tiers})


def parse_jsonl(lines: Iterable[str]) -> list[TraceRequest]:
    return from_records((f"trace line {i + 1}", json.loads(line)) for i, line in enumerate(lines) if line.strip())


def from_records(records: Iterable[tuple[str, object]]) -> list[TraceRequest]:
    """A trace in time order from (where, fields) pairs: a bad one is a ValueError that says where and why."""
    out = []
    for where, data in records:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: a JSON object, not {type(data).__name__}")
        try:
            out.append(TraceRequest(**data))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from exc
    return sorted(out, key=lambda r: r.t)


def dump_jsonl(trace: list[TraceRequest]) -> str:
    return "".join(json.dumps({k: v for k, v in asdict(r).items() if v is not None and (k != "job" or v)}) + "\n"
                   for r in trace)


# (tier, sla_ms, share): a product mix of interactive drafts, standard and premium work
MIX = [("draft", 15_000, 0.25), ("standard", 30_000, 0.6), ("premium", 60_000, 0.15)]
SHAPES = [(1024, 1024, 0.8), (1152, 896, 0.1), (896, 1152, 0.1)]


# The harder mix (issue 18): 5 s drafts that only a pool can meet, mixed sizes and step counts, n up to 4.
TIGHT_MIX = [("draft", 5_000, 0.3), ("standard", 20_000, 0.4), ("standard", 30_000, 0.15), ("premium", 60_000, 0.15)]
MIXED_SHAPES = [(1024, 1024, 0.5), (896, 1152, 0.12), (1152, 896, 0.12), (1536, 1024, 0.13), (1024, 1536, 0.13)]
_KINDS = {  # kind -> (arrival shape, tier mix, sizes, steps choices, n choices with weights)
    "steady": ("steady", MIX, SHAPES, (None,), ((1, 0.85), (2, 0.15))),
    "diurnal": ("diurnal", MIX, SHAPES, (None,), ((1, 0.85), (2, 0.15))),
    "bursty": ("bursty", MIX, SHAPES, (None,), ((1, 0.85), (2, 0.15))),
    "flash_crowd": ("flash_crowd", MIX, SHAPES, (None,), ((1, 0.85), (2, 0.15))),
    "tight_drafts": ("bursty", TIGHT_MIX, SHAPES, (None,), ((1, 0.85), (2, 0.15))),
    "mixed_shapes": ("diurnal", TIGHT_MIX, MIXED_SHAPES, (20, 30), ((1, 0.6), (2, 0.2), (3, 0.1), (4, 0.1))),
    "flash_mixed": ("flash_crowd", TIGHT_MIX, MIXED_SHAPES, (20, 30), ((1, 0.6), (2, 0.2), (3, 0.1), (4, 0.1))),
    # The other pairings of those arrival shapes and mixes: checks the policy's constants were not tuned on.
    "steady_tight": ("steady", TIGHT_MIX, SHAPES, (None,), ((1, 0.85), (2, 0.15))),
    "diurnal_tight": ("diurnal", TIGHT_MIX, SHAPES, (None,), ((1, 0.85), (2, 0.15))),
    "flash_tight": ("flash_crowd", TIGHT_MIX, SHAPES, (None,), ((1, 0.85), (2, 0.15))),
    "steady_mixed": ("steady", TIGHT_MIX, MIXED_SHAPES, (20, 30), ((1, 0.6), (2, 0.2), (3, 0.1), (4, 0.1))),
    "bursty_mixed": ("bursty", TIGHT_MIX, MIXED_SHAPES, (20, 30), ((1, 0.6), (2, 0.2), (3, 0.1), (4, 0.1))),
}
KINDS = tuple(_KINDS)


def _rate(kind: str, t: float, base: float, duration: float) -> float:
    if kind == "steady":
        return base
    if kind == "diurnal":  # one compressed "day": trough at the ends, peak in the middle (3x the trough)
        return base * (1 + math.sin(math.pi * t / duration) * 2) / 2
    if kind == "bursty":  # one minute in five at 4x
        return base * (4 if (t // 60) % 5 == 0 else 0.5)
    if kind == "flash_crowd":  # steady, then ten times the load for 5 minutes from the middle
        mid = duration / 2
        return base * (10 if mid <= t < mid + 300 else 1)
    raise ValueError(f"unknown trace kind {kind!r}: steady, diurnal, bursty, flash_crowd")


def synthetic(kind: str, duration_s: float = 3600, rate_per_s: float = 0.5, seed: int = 0) -> list[TraceRequest]:
    """A non-homogeneous Poisson trace (thinning) of one of KINDS: its arrival shape, tier mix, sizes, steps, n."""
    if kind not in _KINDS:
        raise ValueError(f"unknown trace kind {kind!r}: {', '.join(KINDS)}")
    shape, mix, sizes, steps, ns = _KINDS[kind]
    rng = random.Random(seed)
    peak = max(_rate(shape, t, rate_per_s, duration_s) for t in range(0, int(duration_s) + 1, 10))
    t, out = 0.0, []
    while True:
        t += rng.expovariate(peak)
        if t >= duration_s:
            return out
        if rng.random() > _rate(shape, t, rate_per_s, duration_s) / peak:
            continue
        tier, sla, _ = rng.choices(mix, weights=[m[2] for m in mix])[0]
        w, h, _ = rng.choices(sizes, weights=[s[2] for s in sizes])[0]
        tenant = f"app{rng.randrange(3)}"  # drawn in this order: the four original kinds stay as they were
        n = rng.choices([n for n, _ in ns], weights=[p for _, p in ns])[0] if len(ns) > 2 else \
            (1 if rng.random() < ns[0][1] else ns[1][0])
        out.append(TraceRequest(t=round(t, 3), tenant=tenant, tier=tier, sla_ms=sla,
                                width=w, height=h, n=n,
                                steps=rng.choice(steps) if len(steps) > 1 else steps[0]))
