"""The .qkd update file.

    b"QKD\\0"  magic
    u32 LE     length of the header
    header     JSON: format version, form of the model (onnx/state_dict/safetensors), sha256
               fingerprint of the base's weights, the compressor, sha256 and length of the payload
    payload    xz (lzma) of: u32 LE length of the record list, the records as JSON (per tensor:
               name, encoding, its parameters, and for each array its dtype, shape and offset),
               then the arrays' bytes one after the other

The header stays readable without decompressing, so `apply` checks the base and the checksum
before it decodes anything. The lossless stage is the standard library's lzma: nothing to
install on a device, and its range coder entropy-codes what the encodings leave (varint index
gaps, int8/int4 codes near zero, xor bit patterns with shared exponents) about as well as zstd
at its high levels, at speeds that do not matter for files of this size.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantkit.delta.encodings import Encoded
from quantkit.errors import InputError

MAGIC = b"QKD\0"
FORMAT_VERSION = 1


@dataclass
class Record:
    name: str
    encoded: Encoded


@dataclass
class Update:
    kind: str  # the form of the models: onnx, state_dict or safetensors
    base_fingerprint: str
    records: list[Record]
    meta: dict  # free-form: quantkit version, method asked, residual used


def _payload(records: list[Record]) -> bytes:
    index, chunks, offset = [], [], 0
    for r in records:
        arrays = []
        for key, a in r.encoded.arrays.items():
            a = np.ascontiguousarray(a)
            arrays.append({"key": key, "dtype": a.dtype.str, "shape": list(a.shape), "offset": offset})
            chunks.append(a.tobytes())
            offset += a.nbytes
        index.append({"name": r.name, "method": r.encoded.method, "params": r.encoded.params, "arrays": arrays})
    head = json.dumps(index, separators=(",", ":")).encode()
    return struct.pack("<I", len(head)) + head + b"".join(chunks)


def pack(update: Update) -> bytes:
    payload = lzma.compress(_payload(update.records), preset=6)
    header = {"format": "quantkit-delta", "version": FORMAT_VERSION, "kind": update.kind,
              "base_fingerprint": update.base_fingerprint, "compressor": "xz",
              "payload_sha256": hashlib.sha256(payload).hexdigest(), "payload_bytes": len(payload),
              "meta": update.meta}
    h = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(h)) + h + payload


def read_header(data: bytes, path: Path) -> tuple[dict, bytes]:
    if data[:4] != MAGIC or len(data) < 8:
        raise InputError(f"{path} is not a quantkit update (.qkd) file; make one with `quantkit delta`")
    (n,) = struct.unpack("<I", data[4:8])
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(f"{path} is corrupted: its header is not readable; fetch the update again") from None
    if not isinstance(header, dict) or header.get("format") != "quantkit-delta":
        raise InputError(f"{path} is corrupted: its header is not a quantkit update header; fetch it again")
    if header.get("version") != FORMAT_VERSION:
        raise InputError(f"{path} has update format version {header.get('version')}; this quantkit reads "
                         f"version {FORMAT_VERSION}: upgrade quantkit")
    return header, data[8 + n:]


def unpack(data: bytes, path: Path) -> Update:
    header, payload = read_header(data, path)
    digest = hashlib.sha256(payload).hexdigest()
    if len(payload) != header.get("payload_bytes") or digest != header.get("payload_sha256"):
        raise InputError(f"{path} is corrupted: the payload checksum does not match; fetch the update again")
    raw = lzma.decompress(payload)
    (n,) = struct.unpack("<I", raw[:4])
    index, blob = json.loads(raw[4:4 + n]), memoryview(raw)[4 + n:]
    records = []
    for r in index:
        arrays = {}
        for a in r["arrays"]:
            dtype, shape = np.dtype(a["dtype"]), tuple(a["shape"])
            count = int(np.prod(shape, dtype=np.int64))
            arrays[a["key"]] = np.frombuffer(blob, dtype, count, a["offset"]).reshape(shape).copy()
        records.append(Record(r["name"], Encoded(r["method"], r["params"], arrays)))
    return Update(header["kind"], header["base_fingerprint"], records, header.get("meta", {}))
