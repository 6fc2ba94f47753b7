// Node's own test runner against a live gateway: MODELMUX_ADDRESS names it (tests/test_client_ts.py
// starts the gateway and the embedded backend, then runs these). The gateway serves half_plus_two
// (labels stable -> 1, canary -> 2), the dtypes model (identity for every dtype) and the echo
// Python handler (tests/handlers/faulty.py).
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import { credentials, status } from "@grpc/grpc-js";

import { InferenceClient, type PredictResponse } from "../src/gen/modelmux/v1/inference";
import { ModelState } from "../src/gen/modelmux/v1/models";
import { DataType } from "../src/gen/modelmux/v1/tensor";
import { type AnyTensor, type AsyncResult, ModelmuxClient, ModelmuxError, strings, tensor } from "../src/index";

const address = process.env.MODELMUX_ADDRESS;
if (!address) {
  throw new Error("MODELMUX_ADDRESS is not set: run these through tests/test_client_ts.py (make test)");
}
const client = new ModelmuxClient(address);
after(() => client.close());

const x = tensor("float32", Float32Array.of(1, 2, 5));

describe("Predict", () => {
  test("latest, a version and labels, with Float32Array in and out", async () => {
    const latest = await client.predict("half_plus_two", { x });
    assert.equal(latest.version, 2);
    const y = latest.outputs.y;
    assert.equal(y.dtype, "float32");
    assert.ok(y.data instanceof Float32Array);
    assert.deepEqual(Array.from(y.data), [3.5, 4, 5.5]);
    assert.deepEqual(y.shape, [3]);
    assert.equal((await client.predict("half_plus_two", { x }, { version: 1 })).version, 1);
    assert.equal((await client.predict("half_plus_two", { x }, { label: "stable" })).version, 1);
    assert.equal((await client.predict("half_plus_two", { x }, { label: "canary" })).version, 2);
  });

  test("every dtype round-trips with its typed array", async () => {
    const shape = [2, 3];
    const inputs: Record<string, AnyTensor> = {
      float32: tensor("float32", Float32Array.of(1.5, -2, 3e30, 0, -0.25, 7), shape),
      float64: tensor("float64", Float64Array.of(1e300, -1, 0.1, 2, 3, 4), shape),
      float16: tensor("float16", Uint16Array.of(0x3c00, 0xc000, 0x7bff, 0, 1, 0x8000), shape),
      int8: tensor("int8", Int8Array.of(-128, 127, 0, 1, -1, 5), shape),
      int16: tensor("int16", Int16Array.of(-32768, 32767, 0, 1, -1, 5), shape),
      int32: tensor("int32", Int32Array.of(-(2 ** 31), 2 ** 31 - 1, 0, 1, -1, 5), shape),
      int64: tensor("int64", BigInt64Array.of(-(2n ** 63n), 2n ** 63n - 1n, 0n, 1n, -1n, 5n), shape),
      uint8: tensor("uint8", Uint8Array.of(0, 255, 1, 2, 3, 4), shape),
      uint16: tensor("uint16", Uint16Array.of(0, 65535, 1, 2, 3, 4), shape),
      uint32: tensor("uint32", Uint32Array.of(0, 2 ** 32 - 1, 1, 2, 3, 4), shape),
      uint64: tensor("uint64", BigUint64Array.of(0n, 2n ** 64n - 1n, 1n, 2n, 3n, 4n), shape),
      bool: tensor("bool", Uint8Array.of(1, 0, 0, 1, 1, 0), shape),
      string: strings(["modelmux", "", "héllo", "a", "b", "c"], shape),
    };
    const result = await client.predict("dtypes", inputs);
    assert.equal(result.model, "dtypes");
    for (const [name, sent] of Object.entries(inputs)) {
      const got = result.outputs[name];
      assert.equal(got.dtype, sent.dtype, name);
      assert.deepEqual(got.shape, shape, name);
      if (got.dtype === "string") {
        assert.deepEqual(got.data.map((b) => Buffer.from(b).toString("utf8")), ["modelmux", "", "héllo", "a", "b", "c"]);
      } else {
        assert.equal(got.data.constructor, sent.data.constructor, name);
        assert.deepEqual(Array.from(got.data as ArrayLike<number | bigint>), Array.from(sent.data as ArrayLike<number | bigint>), name);
      }
    }
  });

  test("scalars and empty tensors", async () => {
    const scalar = await client.predict("half_plus_two", { x: tensor("float32", Float32Array.of(4), [1]) });
    assert.deepEqual(Array.from(scalar.outputs.y.data as Float32Array), [5]);
    const empty = await client.predict("half_plus_two", { x: tensor("float32", new Float32Array(0)) });
    assert.deepEqual(empty.outputs.y.shape, [0]);
  });

  test("errors carry the gRPC status", async () => {
    await assert.rejects(client.predict("half_plus_two", { x }, { version: 7 }), (error: unknown) => {
      assert.ok(error instanceof ModelmuxError);
      assert.equal(error.code, status.NOT_FOUND);
      assert.match(error.details, /version 7/);
      return true;
    });
    const wrong = tensor("float64", Float64Array.of(1));
    await assert.rejects(client.predict("half_plus_two", { x: wrong }), { code: status.INVALID_ARGUMENT });
    await assert.rejects(client.predict("half_plus_two", { x }, { deadlineMs: 0.01 }), { code: status.DEADLINE_EXCEEDED });
    assert.throws(() => tensor("float32", Float32Array.of(1, 2), [3]), RangeError);
  });

  test("the generated client on its own", async () => {
    const raw = new InferenceClient(address, credentials.createInsecure());
    try {
      const reply = await new Promise<PredictResponse>((resolve, reject) => {
        const content = Buffer.from(Float32Array.of(2).buffer);
        const request = {
          model: "half_plus_two",
          version: 1,
          signatureName: "",
          inputs: { x: { dtype: DataType.DATA_TYPE_FLOAT32, shape: [1], content, stringValues: [] } },
          jsonInputs: undefined,
          outputFilter: [],
        };
        raw.predict(request, (error, response) => (error ? reject(error) : resolve(response)));
      });
      assert.equal(reply.version, 1);
      assert.equal(reply.outputs.y.content.readFloatLE(0), 3);
    } finally {
      raw.close();
    }
  });
});

describe("Invoke", () => {
  test("JSON in and out, query parameters and headers", async () => {
    const echoed = await client.invoke("echo", { text: "hi", n: [1, 2.5] }, {
      queryParams: { mode: "echo" },
      headers: { "x-tenant": "t1" },
    });
    assert.deepEqual(echoed, { payload: { text: "hi", n: [1, 2.5] }, tenant: "t1" });
  });

  test("raw bytes in and out", async () => {
    assert.equal(await client.invoke("echo", Uint8Array.of(0, 1), { queryParams: { mode: "type" } }), "bytes");
    const raw = await client.invoke("echo", undefined, { queryParams: { mode: "bytes" } });
    assert.ok(raw instanceof Uint8Array);
    assert.deepEqual(Array.from(raw), [0, 1, ...Buffer.from("raw")]);
  });

  test("an unknown API is NOT_FOUND", async () => {
    await assert.rejects(client.invoke("no-such-api", {}), { code: status.NOT_FOUND });
  });
});

describe("ListModels", () => {
  test("lists the models with their state, versions and labels", async () => {
    const models = new Map((await client.listModels()).map((m) => [m.name, m]));
    const hpt = models.get("half_plus_two");
    assert.ok(hpt);
    assert.equal(hpt.state, ModelState.MODEL_STATE_AVAILABLE);
    assert.equal(hpt.latestVersion, 2);
    assert.deepEqual(hpt.labels, { stable: 1, canary: 2 });
    assert.deepEqual(hpt.versions.map((v) => v.version), [1, 2]);
    assert.ok(models.has("dtypes"));
  });
});

describe("Async", () => {
  async function ended(id: string): Promise<AsyncResult[]> {
    const seen: AsyncResult[] = [];
    for await (const update of client.watch(id, { deadlineMs: 30_000 })) {
      seen.push(update);
    }
    return seen;
  }

  test("submit JSON, watch it to COMPLETED, get the result", async () => {
    const id = await client.submit("recorder", { text: "hi" });
    assert.match(id, /^[0-9a-f]{32}$/);
    const seen = await ended(id);
    const last = seen[seen.length - 1];
    assert.equal(last.state, "COMPLETED");
    assert.deepEqual(last.result, { id, payload: { text: "hi" }, type: "dict" });
    const got = await client.getRequest(id);
    assert.equal(got.api, "recorder");
    assert.equal(got.attempts, 1);
    assert.ok(got.submittedAt instanceof Date && got.finishedAt instanceof Date);
    assert.ok(got.finishedAt >= got.submittedAt);
  });

  test("raw bytes come back as a Uint8Array; a chosen id is idempotent", async () => {
    const id = await client.submit("recorder", Uint8Array.of(1, 2, 3), { requestId: "ts-raw-1" });
    assert.equal(id, "ts-raw-1");
    assert.equal(await client.submit("recorder", Uint8Array.of(1, 2, 3), { requestId: "ts-raw-1" }), id);
    await assert.rejects(client.submit("recorder", Uint8Array.of(9), { requestId: "ts-raw-1" }), {
      code: status.ALREADY_EXISTS,
    });
    const last = (await ended(id)).pop();
    assert.ok(last?.result instanceof Uint8Array);
    assert.deepEqual(Array.from(last.result), [3, 2, 1]);
  });

  test("cancel a queued request; list by state", async () => {
    const slow = await client.submit("recorder", { delay: 1 });
    const queued = await client.submit("recorder", {});
    const cancelled = await client.cancel(queued, { api: "recorder" });
    assert.equal(cancelled.state, "CANCELLED");
    await assert.rejects(client.cancel(queued), { code: status.FAILED_PRECONDITION });
    const page = await client.listRequests("recorder", { states: ["CANCELLED"], pageSize: 100 });
    assert.ok(page.requests.some((r) => r.id === queued));
    assert.ok(page.requests.every((r) => r.state === "CANCELLED"));
    assert.equal((await ended(slow)).pop()?.state, "COMPLETED");
  });

  test("errors: unknown id, unknown API, a failing handler", async () => {
    await assert.rejects(client.getRequest("no-such-id", { api: "recorder" }), { code: status.NOT_FOUND });
    await assert.rejects(client.submit("no-such-api", {}), { code: status.NOT_FOUND });
    await assert.rejects(client.submit("echo", {}), { code: status.FAILED_PRECONDITION });
    const id = await client.submit("recorder", { fail: "on purpose" });
    const last = (await ended(id)).pop();
    assert.equal(last?.state, "FAILED");
    assert.match(last?.error ?? "", /asked to fail: on purpose/);
    assert.equal(last?.attempts, 2);
  });
});
