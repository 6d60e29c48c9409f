"""The service tells the pool of every request it could serve, and which it keeps room for
(policies.reservation.pool_arrival), as it routes them, as the simulator counts them, wherever they are then sent."""

from __future__ import annotations

from litestar.testing import TestClient

from gateway.app import create_app
from policies.types import BackendKind
from tests.fakes import ScriptedBackend


class _Pool(ScriptedBackend):
    def __init__(self):
        super().__init__("local", kind=BackendKind.LOCAL, models=("tiny",))
        self.kept: list[tuple[float, float]] = []
        self.demand: list[tuple[float, float, float]] = []

    def note_arrival(self, arrival) -> None:
        if arrival.keep_room:
            self.kept.append((arrival.sla_s, arrival.gpu_s))
        self.demand.append((arrival.sla_s, arrival.gpu_s, arrival.value))


def test_a_request_only_the_pool_serves_in_time_is_counted_and_one_an_api_serves_in_time_is_not(settings,
                                                                                               shipped_policy):
    pool = _Pool()
    backends = {"local": pool, "reve": ScriptedBackend("reve", models=("reve-v1",))}
    with TestClient(create_app(settings, shipped_policy, backends)) as client:
        flexible = client.post("/v1/images/generations", json={"prompt": "x", "size": "256x256", "sla_ms": 30_000})
        assert flexible.status_code == 200 and pool.kept == []  # reve's p95 (15 s) fits its 30 s too
        tight = client.post("/v1/images/generations", json={"prompt": "x", "size": "256x256", "sla_ms": 5_000})
        assert tight.status_code == 200
    (sla_s, gpu_s), = pool.kept
    assert sla_s == 5.0 and 0 < gpu_s < 1  # its batch alone, by the pool's profile
    # Both are demand the pool could serve, priced by what it saves them per GPU-second (reve's $0.024 here).
    assert [(sla, round(value * gpu, 6)) for sla, gpu, value in pool.demand] == [(30.0, 0.024), (5.0, 0.024)]
