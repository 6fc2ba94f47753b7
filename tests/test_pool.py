"""Pool's answer to new desired state (gateway/pool.py), in process with no backend running:
what routing uses and what each backend is asked to keep loaded."""

from __future__ import annotations

from gateway.catalog import DesiredModel, Servable, single_servable
from gateway.pool import AVAILABLE, Pool, VersionStatus
from modelmux_common.config import BackendConfig, GatewayConfig


async def test_a_second_rewrite_keeps_the_content_that_serves() -> None:
    """Version 1 serves from servable m; it is rewritten (m@r7, still loading), then rewritten
    again (m@r9): routing must keep using m until a successor is AVAILABLE."""
    pool = Pool(
        config=GatewayConfig(),
        backends=[BackendConfig(name="b", address="127.0.0.1:1")],
        models={"m": single_servable("m", "api", False, "/v/m", (1,), False)},
        labels={},
    )
    backend = pool.backends[0]
    backend.reachable = True
    backend.status = {"m": {1: VersionStatus(AVAILABLE)}}

    def rewritten(revision: int) -> DesiredModel:
        name = f"m@r{revision}"
        return DesiredModel(
            "m", "api", False, {1: name}, {name: Servable(name, f"/s/m/r{revision}", (1,))}
        )

    pool.update({"m": rewritten(7)})
    backend.status["m@r7"] = {1: VersionStatus(20)}  # LOADING
    pool.update({"m": rewritten(9)})
    version, targets = pool.table.resolve("m", None, None)
    assert version == 1 and [t.servable for t in targets] == ["m"]
    assert "m" in {s.name for s in pool.wanted(backend)}
    backend.status["m@r9"] = {1: VersionStatus(AVAILABLE)}
    pool._rebuild()
    assert [t.servable for t in pool.table.resolve("m", 1, None)[1]] == ["m@r9"]
    await pool.close()


async def test_with_several_workers_a_removed_version_stays_loaded_for_the_hold() -> None:
    model = single_servable("m", "api", False, "/v/m", (1, 2), False)
    pool = Pool(
        config=GatewayConfig(workers=2, status_interval=0.5),
        backends=[BackendConfig(name="b", address="127.0.0.1:1")],
        models={"m": model},
        labels={},
    )
    backend = pool.backends[0]
    pool.update({"m": single_servable("m", "api", False, "/v/m", (1,), False)})
    assert (
        pool.table.routes == {} or 2 not in pool.table.routes["m"].versions
    )  # routing left at once
    assert [(s.name, s.versions) for s in pool.wanted(backend)] == [("m", (1, 2))]  # still loaded
    pool.retired = {k: (m, s, 0.0) for k, (m, s, _) in pool.retired.items()}  # the hold is over
    assert [(s.name, s.versions) for s in pool.wanted(backend)] == [("m", (1,))]
    await pool.close()
