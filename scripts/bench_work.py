"""Micro-benchmark of the work layer (gateway/work): what a durable submit costs, and how soon a
waiting receiver gets a message, on the embedded backend and on SQS + S3 (moto's server on
loopback, so network and AWS latency are not in the figures, moto's own Python is).

    .venv/bin/python scripts/bench_work.py [--count 400] [--skip-moto]

Per backend, one operation at a time (latency at idle, not throughput), p50 and p99 in ms:
  put 1KiB       a store write of a 1 KiB payload (embedded: one SQLite commit with fsync)
  enqueue        one message (embedded: one commit with fsync)
  submit         what an async Submit does: put payload, put status, enqueue
  to receiver    from just before enqueue until a receive waiting in the same process returns it
  to process     the same with the receiver in another process (embedded only: woken by its
                 doorbell, a named pipe the enqueuing process writes to)
and, for reference, the cost of one fsync of a small file in the same folder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import boto3
import uvloop

from gateway.work import AwsConfig, Queue, Work, open_aws, open_embedded

BIN = Path(sys.executable).parent
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
PAYLOAD = os.urandom(1024)


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)

    def rank(q: float) -> float:  # nearest rank
        return ordered[max(0, min(len(ordered) - 1, round(q * len(ordered)) - 1))] * 1000

    return f"p50 {rank(0.50):7.3f}  p99 {rank(0.99):7.3f}"


async def timed(count: int, op: Callable[[int], Awaitable[object]]) -> list[float]:
    samples = []
    for i in range(count):
        start = time.perf_counter()
        await op(i)
        samples.append(time.perf_counter() - start)
    return samples


async def submit_costs(work: Work, queue: Queue, count: int) -> dict[str, list[float]]:
    async def put(i: int) -> None:
        await work.store.put(f"bench/p{i}/payload", PAYLOAD)

    async def enqueue(i: int) -> None:
        await queue.enqueue(f"e{i}")

    async def submit(i: int) -> None:
        await work.store.put(f"bench/s{i}/payload", PAYLOAD)
        await work.store.put(f"bench/s{i}/status", b'{"status": "IN_QUEUE"}', if_absent=True)
        await queue.enqueue(f"s{i}")

    out = {"put 1KiB": await timed(count, put), "enqueue": await timed(count, enqueue)}
    out["submit"] = await timed(count, submit)
    while got := await queue.receive(max_messages=10, visibility_timeout=60):
        for m in got:
            await queue.delete(m)
    return out


async def to_receiver(queue: Queue, count: int) -> list[float]:
    """A receiver in this process waits in a long poll while each message is enqueued."""
    samples = []
    for i in range(count):
        waiting = asyncio.create_task(queue.receive(visibility_timeout=60, wait=20))
        await asyncio.sleep(0.002)  # let it settle into its wait
        start = time.perf_counter()
        await queue.enqueue(f"r{i}")
        [message] = await waiting
        samples.append(time.perf_counter() - start)
        await queue.delete(message)
    return samples


async def to_process(folder: Path, queue: Queue, count: int) -> list[float]:
    """The receiver is another process; both read the same wall clock."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--receiver",
        str(folder),
        queue.name,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    assert child.stdout is not None
    try:
        assert (await child.stdout.readline()).strip() == b"ready"
        samples = []
        for i in range(count):
            # at a random moment, as requests come, not in step with the receiver's own timer
            await asyncio.sleep(random.uniform(0, 0.02))
            start = time.time()
            await queue.enqueue(f"x{i}")
            body, received = (await child.stdout.readline()).split()
            assert body == f"x{i}".encode()
            samples.append(float(received) - start)
        return samples
    finally:
        child.kill()
        await child.wait()


async def receiver(folder: Path, name: str) -> None:
    work = await open_embedded(folder)
    queue = await work.queue(name)
    print("ready", flush=True)
    while True:
        for m in await queue.receive(visibility_timeout=60, wait=20):
            print(m.body, repr(time.time()), flush=True)
            await queue.delete(m)


def fsync_cost(folder: Path, count: int) -> list[float]:
    samples = []
    with open(folder / "fsync-probe", "wb") as fh:
        for _ in range(count):
            fh.write(b"x" * 100)
            fh.flush()
            start = time.perf_counter()
            os.fsync(fh.fileno())
            samples.append(time.perf_counter() - start)
    return samples


def report(title: str, figures: dict[str, list[float]]) -> None:
    print(f"\n{title}")
    for name, samples in figures.items():
        print(f"  {name:<14} {percentiles(samples)}   (n={len(samples)})")


async def bench_embedded(count: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-work-") as tmp:
        folder = Path(tmp) / "state"
        work = await open_embedded(folder)
        try:
            queue = await work.queue("bench")
            figures = {"fsync (raw)": fsync_cost(folder, count)}
            figures.update(await submit_costs(work, queue, count))
            figures["to receiver"] = await to_receiver(queue, count)
            figures["to process"] = await to_process(folder, queue, count)
        finally:
            await work.close()
    report("embedded (SQLite WAL, synchronous=FULL, in a temporary folder)", figures)


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **AWS_ENV},
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise SystemExit("moto_server did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


async def bench_moto(count: int, endpoint: str) -> None:
    os.environ.update(AWS_ENV)
    config = AwsConfig(bucket="bench-work", endpoint_url=endpoint, region="us-east-1")
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=config.bucket)
    aws = await open_aws(config)
    try:
        queue = await aws.queue("bench")
        figures = await submit_costs(aws, queue, count)
        figures["to receiver"] = await to_receiver(queue, count)
    finally:
        await aws.close()
    report("SQS + S3 on moto's server (loopback HTTP)", figures)


async def main(args: argparse.Namespace) -> None:
    if args.receiver:
        await receiver(Path(args.receiver[0]), args.receiver[1])
        return
    print(f"{args.count} operations per figure, one at a time; ms")
    await bench_embedded(args.count)
    if not args.skip_moto:
        with moto_server() as endpoint:
            await bench_moto(max(50, args.count // 2), endpoint)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--skip-moto", action="store_true")
    parser.add_argument("--receiver", nargs=2, help=argparse.SUPPRESS)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(parser.parse_args()))
