"""What ops run before applying a policy: replay a trace under the current and a candidate policy.

Builds the simulator's world from this gateway (pool profile and GPU count; API latency
and failure rates fitted from the audit log's outcomes, else the policy's priors), loads
the trace (JSON lines, the audit log, or a synthetic one), and renders the comparison
as text, JSON and an HTML report with plots.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from policies.profile import ThroughputProfile
from policies.schema import Policy
from policies.simulate import ApiModel, PoolSpec, SimResult, World, simulate
from policies.traces import TraceRequest, from_records, parse_jsonl, synthetic, unknown_tiers

from .audit import audit_query, open_reader
from .settings import Settings

__all__ = ["build_world", "compare", "load_trace", "render_html", "render_text"]


def _fitted(records: list[dict], backend: str) -> tuple[float, float, float] | None:
    """(p50 ms, p95 ms, failure rate) of one backend's attempts in the audit records, if enough."""
    ok, failed = [], 0
    for r in records:
        for a in r.get("attempts") or ():
            if a["backend"] == backend and a["outcome"] == "ok":
                ok.append(a["latency_ms"])
            elif a["backend"] == backend and a["outcome"] in ("error", "timeout"):
                failed += 1
    if len(ok) < 20:
        return None
    ok.sort()
    return ok[len(ok) // 2], ok[int(len(ok) * 0.95)], failed / (failed + len(ok))


def build_world(settings: Settings, policy: Policy, gpus: int | None = None,
                records: list[dict] | None = None) -> World:
    apis = []
    for name, bp in policy.backends.items():
        if bp.price_per_image_usd is None or name not in settings.backends:
            continue
        fitted = _fitted(records or [], name)
        if fitted is not None:
            apis.append(ApiModel(name, fitted[0], max(fitted[1], fitted[0]), fitted[2]))
        else:
            prior = bp.latency_prior
            apis.append(ApiModel(name, prior.p50_ms if prior else 8000, prior.p95_ms if prior else 20000))
    pool = None
    if settings.local.enabled and "local" in policy.backends:
        path = settings.resolve(settings.local.profile_file)
        profile = ThroughputProfile.from_json(json.loads(path.read_text())) if path.is_file() else ThroughputProfile()
        count = gpus or (len(settings.local.devices) if settings.local.devices != "auto" else 1)
        prior = policy.backends["local"].latency_prior
        pool = PoolSpec(profile, settings.local.preset, gpus=count, max_batch=settings.local.max_batch,
                        max_wait_s=settings.local.max_wait_ms / 1000, gpu_hour_usd=settings.local.gpu_hour_usd,
                        fixed_p50_ms=prior.p50_ms if prior else 50, fixed_p95_ms=prior.p95_ms if prior else 250)
    return World(tuple(apis), pool)


def trace_from_audit(records: list[dict]) -> list[TraceRequest]:
    """The requests the audit records, as a trace; those refused at the door (a 4xx before any routing decision:
    invalid input, an unknown tier, a budget) are left out, since they never reached a backend."""
    rows = [r for r in records if r.get("request") and not _refused_at_the_door(r)]
    if not rows:
        return []
    t0 = min(r["ts"] for r in rows)
    out = []
    for r in rows:
        q = r["request"]
        w, h = (int(x) for x in q["size"].split("x"))
        out.append(TraceRequest(t=r["ts"] - t0, tenant=r.get("tenant") or "default", tier=q.get("tier"),
                                sla_ms=q.get("sla_ms"), width=w, height=h, steps=q.get("steps"), n=q.get("n", 1)))
    return sorted(out, key=lambda x: x.t)


def _refused_at_the_door(record: dict) -> bool:
    return 400 <= (record.get("status") or 0) < 500 and not record.get("decision")


def audit_records(settings: Settings, since: float | None, until: float | None, limit: int = 200_000) -> list[dict]:
    reader, out, cursor = open_reader(settings), [], None
    while len(out) < limit:
        page, cursor = audit_query(reader, limit=1000, cursor=cursor, since=since, until=until)
        out += page
        if cursor is None:
            break
    reader.close()
    return out


def _trace_file(path: Path) -> list[TraceRequest]:
    """A JSON-lines trace (policies/traces.py), or the audit export (`GET /admin/audit/export`) as it comes:
    audit records are told by their `request` and `ts` fields."""
    import json

    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        first = json.loads(lines[0]) if lines else {}
    except ValueError as exc:
        raise ValueError(f"{path}: line 1 is not JSON ({exc})") from exc
    if isinstance(first, dict) and "ts" in first and "request" in first:
        try:
            return trace_from_audit([json.loads(line) for line in lines])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not an audit export ({exc})") from exc
    try:
        return parse_jsonl(lines)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a trace (JSON lines of policies/traces.py) nor an audit export: {exc}") \
            from exc


def load_trace(spec: dict, settings: Settings, records: list[dict] | None = None, *, policy: Policy | None = None,
               files_under: Path | None = None) -> list[TraceRequest]:
    """A trace from {"file": path}, {"synthetic": kind, "duration_s", "rate_per_s", "seed"},
    {"audit": {"since", "until"}} or {"requests": [...]}. With `policy`, a tier it lacks is an error; with
    `files_under` (the admin API: the data folder), a file elsewhere is not read."""
    trace = _load_trace(spec, settings, records, files_under)
    if policy is not None and (unknown := unknown_tiers(trace, policy.tiers)):
        raise ValueError(f"trace: tiers {unknown} are not in the policy's tiers {sorted(policy.tiers)}")
    return trace


def _load_trace(spec, settings: Settings, records: list[dict] | None, files_under: Path | None) -> list[TraceRequest]:
    if not isinstance(spec, dict):
        raise ValueError("trace: an object with one of file, synthetic, audit, requests")
    if "file" in spec:
        path = Path(spec["file"])
        if files_under is not None and not path.resolve().is_relative_to(Path(files_under).resolve()):
            raise ValueError("trace.file: only a file in the gateway's data folder is read through the API "
                             "(`imagegw plan --trace FILE` reads any)")
        return _trace_file(path)
    if "synthetic" in spec:
        return synthetic(spec["synthetic"], float(spec.get("duration_s", 3600)), float(spec.get("rate_per_s", 0.5)),
                         int(spec.get("seed", 0)))
    if "requests" in spec:
        if not isinstance(spec["requests"], list):
            raise ValueError("trace.requests: a list of requests")
        return from_records((f"trace.requests[{i}]", r) for i, r in enumerate(spec["requests"]))
    if "audit" in spec:
        return trace_from_audit(records if records is not None else audit_records(
            settings, spec["audit"].get("since"), spec["audit"].get("until")))
    raise ValueError("trace: give one of file, synthetic, audit, requests")


def compare(current: Policy, candidate: Policy, trace: list[TraceRequest], world: World, seed: int = 0,
            progress=None) -> tuple[SimResult, SimResult]:
    def part(offset):
        return None if progress is None else (lambda f: progress(offset + f / 2))

    return (simulate(trace, current, world, seed=seed, progress=part(0.0)),
            simulate(trace, candidate, world, seed=seed, progress=part(0.5)))


_ROWS = [("requests", "requests"), ("served", "served"), ("images", "images"), ("total cost $", "total_cost_usd"),
         ("API spend $", "api_spend_usd"), ("GPU cost $", "gpu_cost_usd"), ("cost per image $", "cost_per_image_usd"),
         ("SLA attainment", "sla_attainment"), ("GPU utilisation", "gpu_utilisation"),
         ("pool gave back", "pool_released"), ("hedges started", "hedges_started")]


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if value < 1 else f"{value:.2f}"
    return str(value)


def render_text(a: SimResult, b: SimResult) -> str:
    sa, sb = a.summary(), b.summary()
    lines = [f"{'':22}{'current':>16}{'candidate':>16}"]
    for label, key in _ROWS:
        lines.append(f"{label:22}{_cell(sa[key]):>16}{_cell(sb[key]):>16}")
    for tier in sorted(set(sa["sla_by_tier"]) | set(sb["sla_by_tier"])):
        lines.append(f"{'SLA ' + tier:22}{_cell(sa['sla_by_tier'].get(tier, 0.0)):>16}"
                     f"{_cell(sb['sla_by_tier'].get(tier, 0.0)):>16}")
    for q in ("p50", "p95", "p99"):
        lines.append(f"{'latency ' + q + ' s':22}{_cell(sa['latency_s'][q]):>16}{_cell(sb['latency_s'][q]):>16}")
    for backend in sorted(set(sa["backend_mix"]) | set(sb["backend_mix"])):
        lines.append(f"{'via ' + backend:22}{sa['backend_mix'].get(backend, 0):>16}"
                     f"{sb['backend_mix'].get(backend, 0):>16}")
    return "\n".join(lines)


def _plots(a: SimResult, b: SimResult) -> list[str]:
    """PNG plots (base64) via matplotlib when installed: cost over time, backend mix, latency CDF."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out = []
    fig, ax = plt.subplots(figsize=(7, 3))
    for r, label in ((a, "current"), (b, "candidate")):
        # Total cost (the pool's GPUs, paid by the hour, and the APIs), so the two policies compare whole.
        horizon_min = max(r.horizon_s, 60.0) / 60
        t, api = [(0.0, 0.0)], 0.0
        for row in r.timeline:
            api += row["api_spend_usd"]
            end = min(row["t"] / 60 + 1, horizon_min)
            t.append((end, api + r.gpu_cost_usd * end / horizon_min))  # GPUs accrue by the hour
        t.append((horizon_min, api + r.gpu_cost_usd))
        ax.plot([x for x, _ in t], [y for _, y in t], label=label)
    ax.set(xlabel="minutes", ylabel="cumulative total cost $", title="Cost over time (pool and APIs)")
    ax.legend()
    out.append(fig)
    fig, ax = plt.subplots(figsize=(7, 3))
    for r, label in ((a, "current"), (b, "candidate")):
        ax.plot([row["t"] / 60 for row in r.timeline], [row.get("gpu_utilisation", 0) for row in r.timeline],
                label=label)
    ax.set(xlabel="minutes", ylabel="GPU utilisation", title="GPU utilisation over time", ylim=(0, 1.05))
    ax.legend()
    out.append(fig)
    fig, ax = plt.subplots(figsize=(7, 3))
    backends = sorted(set(a.summary()["backend_mix"]) | set(b.summary()["backend_mix"]))
    for i, (r, label) in enumerate(((a, "current"), (b, "candidate"))):
        mix = r.summary()["backend_mix"]
        ax.bar([j + i * 0.4 for j in range(len(backends))], [mix.get(x, 0) for x in backends], 0.4, label=label)
    ax.set_xticks([j + 0.2 for j in range(len(backends))], backends)
    ax.set(ylabel="requests", title="Backend mix")
    ax.legend()
    out.append(fig)
    fig, ax = plt.subplots(figsize=(7, 3))
    for r, label in ((a, "current"), (b, "candidate")):
        lat = sorted(o.latency_s for o in r.outcomes if o.latency_s is not None)
        ax.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=label)  # reaches 1.0 at the slowest
    ax.set(xlabel="latency s", ylabel="fraction", title="Latency CDF")
    ax.legend()
    out.append(fig)
    images = []
    for fig in out:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        images.append(base64.b64encode(buf.getvalue()).decode())
    return images


def render_html(a: SimResult, b: SimResult, title: str) -> str:
    plots = "".join(f'<img src="data:image/png;base64,{p}">' for p in _plots(a, b)) or \
        "<p>(install matplotlib for plots)</p>"
    return (f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>body{{font-family:sans-serif}}pre{{background:#f4f4f4;padding:1em}}</style>"
            f"<h1>{html.escape(title)}</h1><pre>{html.escape(render_text(a, b))}</pre>{plots}")
