"""Calls half_plus_two through modelmux.client, blocking and with asyncio.

    python clients/examples/predict.py [ADDRESS]     # default 127.0.0.1:8500 (`make run`)

Also what the client's install test type-checks with mypy --strict against the installed
distribution, so it uses the public API only.
"""

from __future__ import annotations

import asyncio
import sys

import numpy as np

from modelmux.client import AsyncClient, Client, NotFoundError, Prediction, RetryPolicy


def blocking(address: str) -> Prediction:
    x = np.array([1.0, 2.0, 5.0], dtype=np.float32)
    with Client(address, timeout=10.0) as client:
        latest = client.predict("half_plus_two", {"x": x})
        stable = client.predict("half_plus_two", {"x": x}, label="stable")
        print(f"latest: version {latest.version}, y = {latest['y'].tolist()}")
        print(f"stable: version {stable.version}, y = {stable['y'].tolist()}")
        try:
            client.predict("half_plus_two", {"x": x}, version=99)
        except NotFoundError as exc:
            print(f"version 99: {exc.code.name}")
        for model in client.list_models():
            print(f"model {model.name}: latest {model.latest_version}")
        return latest


async def concurrent(address: str) -> list[int]:
    retry = RetryPolicy(max_attempts=3, initial_backoff=0.1, max_backoff=1.0)
    async with AsyncClient(address, retry=retry, channels=2) as client:
        x = np.arange(3, dtype=np.float32)
        results = await asyncio.gather(
            *(client.predict("half_plus_two", {"x": x}, version=v) for v in (1, 2))
        )
        versions = [r.version for r in results]
        print(f"versions answered concurrently: {versions}")
        return versions


def main() -> int:
    address = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:8500"
    blocking(address)
    asyncio.run(concurrent(address))
    return 0


if __name__ == "__main__":
    sys.exit(main())
