// Typed arrays <-> modelmux.v1.Tensor, without touching elements: numeric data goes out as a
// view of the array's bytes and comes back as a typed array over the reply's bytes (copied only
// when the reply's bytes are not aligned for the element size). Only strings are per element.
import { endianness } from "node:os";

import { DataType, type Tensor } from "./gen/modelmux/v1/tensor";

/** The array type that holds each dtype. float16 travels as its raw bits; bool as 0 / 1 bytes. */
export interface ArrayOf {
  float32: Float32Array;
  float64: Float64Array;
  float16: Uint16Array;
  int8: Int8Array;
  int16: Int16Array;
  int32: Int32Array;
  int64: BigInt64Array;
  uint8: Uint8Array;
  uint16: Uint16Array;
  uint32: Uint32Array;
  uint64: BigUint64Array;
  bool: Uint8Array;
  string: Uint8Array[];
}

export type DType = keyof ArrayOf;

/** A dense row-major tensor of one dtype. */
export interface TypedTensor<D extends DType = DType> {
  dtype: D;
  shape: number[];
  data: ArrayOf[D];
}

/** Any of the tensors above, told apart by `dtype`. */
export type AnyTensor = { [D in DType]: TypedTensor<D> }[DType];

type NumericDType = Exclude<DType, "string">;

interface Layout {
  wire: DataType;
  make: (buffer: ArrayBuffer, offset: number, length: number) => ArrayOf[NumericDType];
  bytes: number;
}

const NUMERIC: { [D in NumericDType]: Layout } = {
  float32: { wire: DataType.DATA_TYPE_FLOAT32, bytes: 4, make: (b, o, n) => new Float32Array(b, o, n) },
  float64: { wire: DataType.DATA_TYPE_FLOAT64, bytes: 8, make: (b, o, n) => new Float64Array(b, o, n) },
  float16: { wire: DataType.DATA_TYPE_FLOAT16, bytes: 2, make: (b, o, n) => new Uint16Array(b, o, n) },
  int8: { wire: DataType.DATA_TYPE_INT8, bytes: 1, make: (b, o, n) => new Int8Array(b, o, n) },
  int16: { wire: DataType.DATA_TYPE_INT16, bytes: 2, make: (b, o, n) => new Int16Array(b, o, n) },
  int32: { wire: DataType.DATA_TYPE_INT32, bytes: 4, make: (b, o, n) => new Int32Array(b, o, n) },
  int64: { wire: DataType.DATA_TYPE_INT64, bytes: 8, make: (b, o, n) => new BigInt64Array(b, o, n) },
  uint8: { wire: DataType.DATA_TYPE_UINT8, bytes: 1, make: (b, o, n) => new Uint8Array(b, o, n) },
  uint16: { wire: DataType.DATA_TYPE_UINT16, bytes: 2, make: (b, o, n) => new Uint16Array(b, o, n) },
  uint32: { wire: DataType.DATA_TYPE_UINT32, bytes: 4, make: (b, o, n) => new Uint32Array(b, o, n) },
  uint64: { wire: DataType.DATA_TYPE_UINT64, bytes: 8, make: (b, o, n) => new BigUint64Array(b, o, n) },
  bool: { wire: DataType.DATA_TYPE_BOOL, bytes: 1, make: (b, o, n) => new Uint8Array(b, o, n) },
};

const BY_WIRE = new Map<DataType, NumericDType>(
  (Object.keys(NUMERIC) as NumericDType[]).map((name) => [NUMERIC[name].wire, name]),
);

if (endianness() !== "LE") {
  throw new Error("modelmux tensors are little-endian; this platform is not");
}

function count(shape: number[]): number {
  return shape.reduce((product, size) => product * size, 1);
}

/** A tensor of `dtype` over `data`; `shape` defaults to a vector of all of it. */
export function tensor<D extends DType>(dtype: D, data: ArrayOf[D], shape?: number[]): TypedTensor<D> {
  const dims = shape ?? [data.length];
  if (count(dims) !== data.length) {
    throw new RangeError(`shape [${dims}] holds ${count(dims)} elements, data has ${data.length}`);
  }
  return { dtype, shape: dims, data };
}

/** UTF-8 strings as a string tensor. */
export function strings(values: string[], shape?: number[]): TypedTensor<"string"> {
  return tensor("string", values.map((v) => Buffer.from(v, "utf8")), shape);
}

export function toWire(name: string, value: AnyTensor): Tensor {
  if (count(value.shape) !== value.data.length) {
    throw new RangeError(`input '${name}': shape [${value.shape}] does not match ${value.data.length} elements`);
  }
  if (value.dtype === "string") {
    const stringValues = value.data.map((item) => Buffer.from(item.buffer, item.byteOffset, item.byteLength));
    return { dtype: DataType.DATA_TYPE_STRING, shape: value.shape, content: Buffer.alloc(0), stringValues };
  }
  const data = value.data;
  const content = Buffer.from(data.buffer, data.byteOffset, data.byteLength); // a view, no copy
  return { dtype: NUMERIC[value.dtype].wire, shape: value.shape, content, stringValues: [] };
}

export function fromWire(name: string, wire: Tensor): AnyTensor {
  const shape = wire.shape;
  const n = count(shape);
  if (wire.dtype === DataType.DATA_TYPE_STRING) {
    if (wire.stringValues.length !== n) {
      throw new RangeError(`output '${name}': shape [${shape}] needs ${n} strings, got ${wire.stringValues.length}`);
    }
    return { dtype: "string", shape, data: wire.stringValues };
  }
  const dtype = BY_WIRE.get(wire.dtype);
  if (dtype === undefined) {
    throw new RangeError(`output '${name}': unknown DataType ${wire.dtype}`);
  }
  const layout = NUMERIC[dtype];
  if (wire.content.byteLength !== n * layout.bytes) {
    throw new RangeError(`output '${name}': ${dtype} shape [${shape}] needs ${n * layout.bytes} bytes, got ${wire.content.byteLength}`);
  }
  let bytes: Uint8Array = wire.content;
  if (bytes.byteOffset % layout.bytes !== 0) {
    bytes = new Uint8Array(bytes); // an aligned copy
  }
  return { dtype, shape, data: layout.make(bytes.buffer as ArrayBuffer, bytes.byteOffset, n) } as AnyTensor;
}
