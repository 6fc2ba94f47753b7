"""What a benchmark run measures: its settings (full or --quick) and the targets it calls.

Apart from scripts/bench.py so that the scenarios of scripts/bench_lifecycle.py can name them
without importing the harness that imports them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    calls: int = 400  # measured calls per target and round at concurrency 1
    sat_calls: int = 1500  # measured calls per target and round at saturation
    concurrency: int = 16  # calls in flight at saturation
    rounds: int = 5
    latency_calls: int = 2000  # calls per target in the interleaved latency scenario
    warmup: int = 50
    large_mb: int = 40
    large_calls: int = 12
    bottleneck_rounds: int = 4
    asset_mb: int = 64  # extra file in the version modelsync mirrors while "loaded"
    start_rounds: int = 3
    reload_timeout: float = 30.0
    metrics_rounds: int = 15  # the metrics scenario: rounds of calls through the request path
    metrics_calls: int = 5000
    processes: int = 2  # Python load processes / h2load connections at saturation
    load: str = "auto"
    quick: bool = False


QUICK = Settings(
    calls=150,
    sat_calls=300,
    rounds=1,
    latency_calls=100,
    warmup=10,
    large_mb=4,
    large_calls=1,
    bottleneck_rounds=2,
    asset_mb=4,
    start_rounds=1,
    reload_timeout=5.0,
    metrics_rounds=3,
    metrics_calls=1000,
    quick=True,
)


@dataclass(frozen=True)
class Target:
    """One way of calling half_plus_two: through which process, with which request."""

    name: str
    process: str  # the stack process the call goes to ("backend": direct)
    kind: str  # request form: tf, typed, json or invoke
    version: int | None  # None: latest
    base: str  # the direct target it is compared with
    floor: str = ""  # the bare-hop target whose costs it is compared with


TARGETS = (
    Target("direct-v2", "backend", "tf", 2, "direct-v2"),
    Target("direct-latest", "backend", "tf", None, "direct-latest"),
    Target("barehop-v2", "barehop", "tf", 2, "direct-v2", "barehop-v2"),
    Target("barehop-latest", "barehop", "tf", None, "direct-latest", "barehop-latest"),
    Target("barehop-uvloop", "barehop-uvloop", "tf", None, "direct-latest", "barehop-latest"),
    Target("nginx-v2", "nginx", "tf", 2, "direct-v2", "barehop-v2"),
    Target("nginx-latest", "nginx", "tf", None, "direct-latest", "barehop-latest"),
    Target("facade-v2", "gateway", "tf", 2, "direct-v2", "barehop-v2"),
    Target("facade-latest", "gateway", "tf", None, "direct-latest", "barehop-latest"),
    Target("facade-latest-logged", "gateway-logged", "tf", None, "direct-latest", "barehop-latest"),
    # tracing on (docs/tracing.md): every call sampled out, and every call sampled in and exported
    Target(
        "facade-traced-out", "gateway-traced-out", "tf", None, "direct-latest", "barehop-latest"
    ),
    Target("facade-traced", "gateway-traced", "tf", None, "direct-latest", "barehop-latest"),
    Target(
        "facade-latest-metrics", "gateway-metrics", "tf", None, "direct-latest", "barehop-latest"
    ),
    Target("own-typed", "gateway", "typed", None, "direct-latest", "barehop-latest"),
    Target("own-json", "gateway", "json", None, "direct-latest", "barehop-latest"),
    Target("facade-batched", "gateway-batched", "tf", None, "direct-latest", "barehop-latest"),
    Target("invoke", "gateway-handler", "invoke", None, "direct-latest", "barehop-latest"),
    Target("static-v2", "gateway-static", "tf", 2, "direct-v2", "barehop-v2"),
    Target("static-latest", "gateway-static", "tf", None, "direct-latest", "barehop-latest"),
)
LARGE_TARGETS = (
    "direct-v2",
    "direct-latest",
    "barehop-v2",
    "nginx-v2",
    "facade-v2",
    "facade-latest",
    "static-v2",
    "static-latest",
    "own-typed",
)
