"""What capping the standard tier's pool queue (`tiers.standard.local_max_ms`) trades: cost per image
against SLA attainment, on the routing-economics world and traces (one line per cap).

    .venv/bin/python benchmarks/tier_queue_cap.py [--caps none,6000,12000,21000]
"""

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import routing_economics  # noqa: E402

from policies.schema import Policy  # noqa: E402
from policies.simulate import Strategy, simulate  # noqa: E402
from policies.traces import synthetic  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--caps", default="none,6000,12000,15000,18000,21000,24000")
    args = p.parse_args()
    raw = yaml.safe_load((ROOT / "config" / "policy.yaml").read_text())
    world = routing_economics.world(2)
    print("| standard local_max_ms | steady $/image, SLA | diurnal | bursty | flash crowd |")
    print("|---|---|---|---|---|")
    for cap in args.caps.split(","):
        tiers = {k: dict(v) for k, v in raw["tiers"].items()}
        if cap != "none":
            tiers["standard"]["local_max_ms"] = int(cap)
        policy = Policy.model_validate({**raw, "tiers": tiers})
        cells = []
        for kind in ("steady", "diurnal", "bursty", "flash_crowd"):
            r = simulate(synthetic(kind, 3600, 1.5, seed=1), Strategy("ours", policy), world, seed=1).summary()
            cells.append(f"{r['total_cost_usd'] / r['images']:.5f}, {r['sla_attainment']:.1%}")
        print(f"| {cap} | " + " | ".join(cells) + " |", flush=True)
    print("\ncommand: .venv/bin/python benchmarks/tier_queue_cap.py --caps " + args.caps)


if __name__ == "__main__":
    main()
