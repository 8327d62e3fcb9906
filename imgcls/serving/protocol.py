"""The Open Inference Protocol v2 (KServe v2, Triton's HTTP/REST API) as data: request tensors in,
response bytes out. JSON tensors, and the binary tensor extension tritonclient uses by default:
the JSON header, then the raw bytes of each tensor whose `parameters.binary_data_size` says so,
the header's length in `Inference-Header-Content-Length`. A BYTES element in binary form is a
4-byte little-endian length and the bytes; in JSON, a string (for images: base64).
"""
from __future__ import annotations

import base64
import binascii
import json
import struct

import numpy as np

DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
          "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
          "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
HEADER_LENGTH = "Inference-Header-Content-Length"


class ProtocolError(ValueError):
    """A malformed inference request (400)."""


def split_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """(the JSON header, the binary data after it)."""
    if header_length is None:
        length = len(body)
    elif not header_length.isdigit() or int(header_length) > len(body):
        raise ProtocolError(f"{HEADER_LENGTH} {header_length!r} is not a length within the {len(body)}-byte body")
    else:
        length = int(header_length)
    try:
        header = json.loads(body[:length])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"the inference header is not JSON: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list) or not header["inputs"]:
        raise ProtocolError("the inference header needs a non-empty 'inputs' list")
    return header, body[length:]


def unpack_bytes(buffer: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(buffer):
        if offset + 4 > len(buffer):
            raise ProtocolError("a BYTES element is cut inside its 4-byte length")
        (size,) = struct.unpack_from("<I", buffer, offset)
        if offset + 4 + size > len(buffer):
            raise ProtocolError(f"a BYTES element of {size} bytes runs past the end of its tensor")
        items.append(buffer[offset + 4:offset + 4 + size])
        offset += 4 + size
    return items


def pack_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def read_inputs(header: dict, binary: bytes) -> list[tuple[str, str, list[int], object]]:
    """[(name, datatype, shape, data)]: data is a list of bytes for BYTES, else a numpy array."""
    tensors, offset = [], 0
    for spec in header["inputs"]:
        try:
            name, datatype, shape = spec["name"], spec["datatype"], [int(d) for d in spec["shape"]]
        except (KeyError, TypeError, ValueError):
            raise ProtocolError(f"input {spec!r} needs a name, a datatype and a shape") from None
        if datatype != "BYTES" and datatype not in DTYPES:
            raise ProtocolError(f"input {name!r}: unknown datatype {datatype!r}")
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if offset + int(size) > len(binary):
                raise ProtocolError(f"input {name!r}: binary_data_size {size} runs past the body")
            raw, offset = binary[offset:offset + int(size)], offset + int(size)
            data = unpack_bytes(raw) if datatype == "BYTES" else _array(raw, datatype, shape, name)
        elif "data" in spec:
            data = _json_data(spec["data"], datatype, shape, name)
        else:
            raise ProtocolError(f"input {name!r} has neither data nor parameters.binary_data_size")
        if datatype == "BYTES" and len(data) != int(np.prod(shape)):
            raise ProtocolError(f"input {name!r}: {len(data)} elements for shape {shape}")
        tensors.append((name, datatype, shape, data))
    return tensors


def _array(raw: bytes, datatype: str, shape: list[int], name: str) -> np.ndarray:
    dtype = np.dtype(DTYPES[datatype]).newbyteorder("<")
    if len(raw) != int(np.prod(shape)) * dtype.itemsize:
        raise ProtocolError(f"input {name!r}: {len(raw)} bytes for a {datatype} tensor of shape {shape}")
    return np.frombuffer(raw, dtype).reshape(shape)


def _json_data(data, datatype: str, shape: list[int], name: str):
    flat = np.asarray(data, dtype=object).reshape(-1).tolist() if isinstance(data, list) else [data]
    if datatype == "BYTES":
        try:
            return [base64.b64decode(item, validate=True) for item in flat]
        except (binascii.Error, TypeError, ValueError):
            raise ProtocolError(f"input {name!r}: BYTES elements in JSON must be base64 strings") from None
    try:
        return np.asarray(flat, dtype=DTYPES[datatype]).reshape(shape)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"input {name!r}: {e}") from None


def requested_outputs(header: dict, available: list[str]) -> list[tuple[str, dict]]:
    """[(output name, its parameters)] as the request asks, every output by default; each
    parameters dict gets `binary_data` (the request-wide `binary_data_output` default)."""
    binary = bool((header.get("parameters") or {}).get("binary_data_output", False))
    wanted = header.get("outputs") or [{"name": name} for name in available]
    out = []
    for spec in wanted:
        name = spec.get("name") if isinstance(spec, dict) else None
        if name not in available:
            raise ProtocolError(f"unknown output {name!r}; this model has {', '.join(available)}")
        params = dict(spec.get("parameters") or {})
        params.setdefault("binary_data", binary)
        out.append((name, params))
    return out


def encode_response(head: dict, outputs: list[tuple[str, str, object, bool]]) -> tuple[bytes, dict]:
    """(body, extra headers) for `head` (model_name, model_version, id, parameters) and
    outputs [(name, datatype, data: an array, or a nested list of bytes for BYTES, binary?)]."""
    tensors, chunks = [], []
    for name, datatype, data, binary in outputs:
        array = np.asarray(data, dtype=object if datatype == "BYTES" else DTYPES[datatype])
        tensor = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            raw = (pack_bytes(list(array.reshape(-1))) if datatype == "BYTES"
                   else array.astype(array.dtype.newbyteorder("<")).tobytes())
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            flat = array.reshape(-1).tolist()
            tensor["data"] = [x.decode() for x in flat] if datatype == "BYTES" else flat
        tensors.append(tensor)
    header = json.dumps({**head, "outputs": tensors}).encode()
    if not chunks:
        return header, {}
    return header + b"".join(chunks), {HEADER_LENGTH: str(len(header))}
