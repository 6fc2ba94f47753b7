"""Async APIs (kind: AsyncAPI): the modelmux.v1.Async service, the runner that feeds handler
workers from the queue, and the sweeper. docs/async.md has the contract. ``payloads`` is what a
handler worker imports; the rest runs in the gateway."""
