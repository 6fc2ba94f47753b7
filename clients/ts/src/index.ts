// A small typed wrapper over the generated @grpc/grpc-js clients of modelmux.v1: Predict with
// typed arrays, Invoke with JSON or bytes, ListModels, async requests (Submit, Get, Watch, Cancel,
// List); a deadline on every call and gRPC's own retry of UNAVAILABLE (service config) by default,
// as in the Python client (a Submit carries its id, so a retried one is the same request).
import { randomBytes } from "node:crypto";

import { credentials, type ChannelCredentials, type ChannelOptions, Metadata, type ServiceError, status } from "@grpc/grpc-js";

import { AsyncClient, type AsyncRequest as WireAsyncRequest, AsyncState } from "./gen/modelmux/v1/async";
import type { Timestamp } from "./gen/google/protobuf/timestamp";
import { InferenceClient, type InvokeResponse, type PredictResponse } from "./gen/modelmux/v1/inference";
import { type Model, ModelsClient } from "./gen/modelmux/v1/models";
import { type AnyTensor, fromWire, toWire } from "./tensors";

export * from "./tensors";
export * as inference from "./gen/modelmux/v1/inference";
export * as models from "./gen/modelmux/v1/models";
export * as asyncs from "./gen/modelmux/v1/async";

/** gRPC's retry policy (gRFC A6); gRPC caps maxAttempts at 5. */
export interface RetryPolicy {
  maxAttempts: number;
  initialBackoffSeconds: number;
  maxBackoffSeconds: number;
  backoffMultiplier: number;
}

export const DEFAULT_RETRY: RetryPolicy = {
  maxAttempts: 5,
  initialBackoffSeconds: 0.2,
  maxBackoffSeconds: 2,
  backoffMultiplier: 2,
};

export interface Tls {
  rootCerts?: Buffer;
  privateKey?: Buffer;
  certChain?: Buffer;
}

export interface ClientOptions {
  /** Default deadline of every call, in milliseconds (30 s). */
  deadlineMs?: number;
  /** Retry of UNAVAILABLE; null for none. */
  retry?: RetryPolicy | null;
  tls?: Tls;
  /** Sent with every call, e.g. { authorization: "Bearer ..." }. */
  metadata?: Record<string, string>;
  /** Raw channel options; they win over the client's own. */
  channelOptions?: ChannelOptions;
}

export interface CallOptions {
  deadlineMs?: number;
}

export interface PredictOptions extends CallOptions {
  version?: number;
  label?: string;
  signature?: string;
  outputFilter?: string[];
}

export interface InvokeOptions extends CallOptions {
  queryParams?: Record<string, string>;
  headers?: Record<string, string>;
}

export interface SubmitOptions extends CallOptions {
  /** Content type of a Uint8Array payload (application/octet-stream). */
  contentType?: string;
  /** The request id, the handler's idempotency key; the client makes one when none is given. */
  requestId?: string;
}

export interface RequestOptions extends CallOptions {
  /** The AsyncAPI holding the request; empty lets the gateway find it. */
  api?: string;
}

export type AsyncStateName = "IN_QUEUE" | "IN_PROGRESS" | "COMPLETED" | "FAILED" | "CANCELLED";

/** An async request as Get, Watch, Cancel and List report it. */
export interface AsyncResult {
  id: string;
  api: string;
  state: AsyncStateName;
  attempts: number;
  submittedAt?: Date;
  startedAt?: Date;
  finishedAt?: Date;
  expiresAt?: Date;
  /** What handle_async returned once COMPLETED: a JSON value, or a Uint8Array for bytes. */
  result?: unknown;
  error: string;
}

export interface ListRequestsOptions extends CallOptions {
  states?: AsyncStateName[];
  pageSize?: number;
  pageToken?: string;
}

/** A fresh request id in the gateway's own form: milliseconds since the epoch, 80 random bits. */
export function newRequestId(): string {
  return Date.now().toString(16).padStart(12, "0") + randomBytes(10).toString("hex");
}

function date(t: Timestamp | undefined): Date | undefined {
  return t === undefined ? undefined : new Date(t.seconds * 1000 + Math.floor(t.nanos / 1e6));
}

function asyncResult(wire: WireAsyncRequest | undefined): AsyncResult {
  if (wire === undefined) {
    throw new Error("the gateway sent no request");
  }
  return {
    id: wire.id,
    api: wire.api,
    state: AsyncState[wire.state].replace(/^ASYNC_STATE_/, "") as AsyncStateName,
    attempts: wire.attempts,
    submittedAt: date(wire.submittedAt),
    startedAt: date(wire.startedAt),
    finishedAt: date(wire.finishedAt),
    expiresAt: date(wire.expiresAt),
    result: wire.raw !== undefined ? new Uint8Array(wire.raw) : wire.json,
    error: wire.error,
  };
}

export interface Prediction {
  model: string;
  version: number;
  signatureName: string;
  outputs: Record<string, AnyTensor>;
}

/** A failed call: `code` is the gRPC status (e.g. status.NOT_FOUND), `details` its message. */
export class ModelmuxError extends Error {
  readonly code: status;
  readonly details: string;

  constructor(error: ServiceError) {
    super(`${status[error.code]}: ${error.details}`);
    this.name = "ModelmuxError";
    this.code = error.code;
    this.details = error.details;
  }
}

function serviceConfig(retry: RetryPolicy): string {
  const services = ["modelmux.v1.Inference", "modelmux.v1.Models", "modelmux.v1.Async"].map((service) => ({ service }));
  return JSON.stringify({
    methodConfig: [
      {
        name: services,
        retryPolicy: {
          maxAttempts: retry.maxAttempts,
          initialBackoff: `${retry.initialBackoffSeconds}s`,
          maxBackoff: `${retry.maxBackoffSeconds}s`,
          backoffMultiplier: retry.backoffMultiplier,
          retryableStatusCodes: ["UNAVAILABLE"],
        },
      },
    ],
    retryThrottling: { maxTokens: 10, tokenRatio: 0.1 },
  });
}

function isServiceError(error: unknown): error is ServiceError {
  return typeof error === "object" && error !== null && "code" in error && "details" in error;
}

type Callback<T> = (error: ServiceError | null, response: T) => void;

export class ModelmuxClient {
  /** The generated clients, for calls the wrapper does not cover. */
  readonly inference: InferenceClient;
  readonly models: ModelsClient;
  readonly asyncs: AsyncClient;
  private readonly deadlineMs: number;
  private readonly metadata: Metadata;

  constructor(target = "127.0.0.1:8500", options: ClientOptions = {}) {
    const retry = options.retry === undefined ? DEFAULT_RETRY : options.retry;
    const channelOptions: ChannelOptions = {
      "grpc.max_receive_message_length": 64 * 1024 * 1024,
      "grpc.max_send_message_length": 64 * 1024 * 1024,
      "grpc.enable_retries": retry === null ? 0 : 1,
      ...(retry === null ? {} : { "grpc.service_config": serviceConfig(retry) }),
      ...options.channelOptions,
    };
    const creds: ChannelCredentials = options.tls
      ? credentials.createSsl(options.tls.rootCerts ?? null, options.tls.privateKey ?? null, options.tls.certChain ?? null)
      : credentials.createInsecure();
    this.inference = new InferenceClient(target, creds, channelOptions);
    this.models = new ModelsClient(target, creds, channelOptions);
    this.asyncs = new AsyncClient(target, creds, channelOptions);
    this.deadlineMs = options.deadlineMs ?? 30_000;
    this.metadata = new Metadata();
    for (const [key, value] of Object.entries(options.metadata ?? {})) {
      this.metadata.set(key, value);
    }
  }

  private call<Req, Res>(
    method: (request: Req, metadata: Metadata, options: { deadline: Date }, callback: Callback<Res>) => unknown,
    request: Req,
    options: CallOptions,
  ): Promise<Res> {
    const deadline = new Date(Date.now() + (options.deadlineMs ?? this.deadlineMs));
    return new Promise((resolve, reject) => {
      method(request, this.metadata, { deadline }, (error, response) => {
        if (error) reject(new ModelmuxError(error));
        else resolve(response);
      });
    });
  }

  /** Runs `model` (latest, or `version`, or the version `label` points at). */
  async predict(model: string, inputs: Record<string, AnyTensor>, options: PredictOptions = {}): Promise<Prediction> {
    if (options.version !== undefined && options.label !== undefined) {
      throw new TypeError("give version or label, not both");
    }
    const wireInputs = Object.fromEntries(Object.entries(inputs).map(([name, t]) => [name, toWire(name, t)]));
    const request = {
      model,
      version: options.version,
      versionLabel: options.label,
      signatureName: options.signature ?? "",
      inputs: wireInputs,
      jsonInputs: undefined,
      outputFilter: options.outputFilter ?? [],
    };
    const reply: PredictResponse = await this.call(this.inference.predict.bind(this.inference), request, options);
    const outputs = Object.fromEntries(Object.entries(reply.outputs).map(([name, t]) => [name, fromWire(name, t)]));
    return { model: reply.model, version: reply.version, signatureName: reply.signatureName, outputs };
  }

  /** Calls an API's handler: a Uint8Array goes as raw bytes, anything else as JSON. */
  async invoke(api: string, payload?: unknown, options: InvokeOptions = {}): Promise<unknown> {
    const raw = payload instanceof Uint8Array ? Buffer.from(payload) : undefined;
    const request = {
      api,
      json: raw === undefined ? payload : undefined,
      raw,
      queryParams: options.queryParams ?? {},
      headers: options.headers ?? {},
    };
    const reply: InvokeResponse = await this.call(this.inference.invoke.bind(this.inference), request, options);
    return reply.raw ?? reply.json;
  }

  /** Every model the gateway knows, with versions, labels, state and reason. */
  async listModels(options: CallOptions = {}): Promise<Model[]> {
    const reply = await this.call(this.models.listModels.bind(this.models), {}, options);
    return reply.models;
  }

  // -- async requests (modelmux.v1.Async) --

  /** Queues a request for an AsyncAPI's handle_async; resolves to its id once it is stored. A
   * Uint8Array goes as raw bytes (with contentType), anything else as JSON. */
  async submit(api: string, payload?: unknown, options: SubmitOptions = {}): Promise<string> {
    const raw = payload instanceof Uint8Array ? Buffer.from(payload) : undefined;
    const request = {
      api,
      json: raw === undefined ? (payload ?? null) : undefined,
      raw,
      contentType: raw === undefined ? "" : (options.contentType ?? "application/octet-stream"),
      id: options.requestId ?? newRequestId(),
    };
    const reply = await this.call(this.asyncs.submit.bind(this.asyncs), request, options);
    return reply.id;
  }

  /** The request's state, and its result or error once it ended. */
  async getRequest(id: string, options: RequestOptions = {}): Promise<AsyncResult> {
    const reply = await this.call(this.asyncs.get.bind(this.asyncs), { api: options.api ?? "", id }, options);
    return asyncResult(reply.request);
  }

  /** The request now, then at each change; ends after its terminal state. Without deadlineMs
   * the watch has none. */
  async *watch(id: string, options: RequestOptions = {}): AsyncGenerator<AsyncResult> {
    const deadline = options.deadlineMs === undefined ? undefined : new Date(Date.now() + options.deadlineMs);
    const stream = this.asyncs.watch({ api: options.api ?? "", id }, this.metadata, { deadline });
    try {
      for await (const update of stream) {
        yield asyncResult(update.request);
      }
    } catch (error) {
      throw isServiceError(error) ? new ModelmuxError(error) : error;
    } finally {
      stream.cancel();
    }
  }

  /** Cancels a request that has not ended (FAILED_PRECONDITION once it has). */
  async cancel(id: string, options: RequestOptions = {}): Promise<AsyncResult> {
    const reply = await this.call(this.asyncs.cancel.bind(this.asyncs), { api: options.api ?? "", id }, options);
    return asyncResult(reply.request);
  }

  /** One page of an API's requests (without results) and the token of the next ("" at the end). */
  async listRequests(
    api: string,
    options: ListRequestsOptions = {},
  ): Promise<{ requests: AsyncResult[]; nextPageToken: string }> {
    const states = (options.states ?? []).map((s) => AsyncState[`ASYNC_STATE_${s}` as keyof typeof AsyncState]);
    const request = { api, states, pageSize: options.pageSize ?? 0, pageToken: options.pageToken ?? "" };
    const reply = await this.call(this.asyncs.list.bind(this.asyncs), request, options);
    return { requests: reply.requests.map(asyncResult), nextPageToken: reply.nextPageToken };
  }

  close(): void {
    this.inference.close();
    this.models.close();
    this.asyncs.close();
  }
}
