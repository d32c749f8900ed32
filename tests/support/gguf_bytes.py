"""GGUF files as bytes, for the loader's tests of malformed files: encoded field by field (so that a test can
write any count, type or offset, true or not), or re-encoded from a valid file with some metadata changed."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from seriatim.weights.gguf_file import read_gguf

ALIGNMENT = 32


def u32(n: int) -> bytes:
    return struct.pack("<I", n)


def u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return u64(len(raw)) + raw


def key_value(key: str | bytes, value_type: int, payload: bytes) -> bytes:
    return string(key) + u32(value_type) + payload


def tensor_info(name: str, dims: tuple[int, ...], tensor_type: int, offset: int) -> bytes:
    return string(name) + u32(len(dims)) + b"".join(u64(d) for d in dims) + u32(tensor_type) + u64(offset)


def gguf(kvs: list[bytes] = (), infos: list[bytes] = (), data: bytes = b"", *, keys: int | None = None,
         tensors: int | None = None, version: int = 3) -> bytes:
    """A file of these encoded fields; `keys` and `tensors` override the counts the header claims."""
    head = b"GGUF" + u32(version) + u64(len(infos) if tensors is None else tensors)
    body = head + u64(len(kvs) if keys is None else keys) + b"".join(kvs) + b"".join(infos)
    return body + bytes(-len(body) % ALIGNMENT) + data


def reencode(source: Path, changes: dict[str, Any] | None = None,
             extra: dict[str, np.ndarray] | None = None) -> bytes:
    """`source` with the metadata keys in `changes` replaced (written as the Python values' natural GGUF
    types; None drops the key), its tensors unchanged, and the float32 tensors of `extra` added."""
    g = read_gguf(source)
    merged = {k: v for k, v in {**g.metadata, **(changes or {})}.items() if v is not None}
    kvs = [string(k) + _value(v) for k, v in merged.items()]
    tensors = [(t.name, t.shape, t.tensor_type, t.data) for t in g.tensors]
    f32 = GGMLQuantizationType.F32
    tensors += [(name, a.shape[::-1], f32, a.astype(np.float32)) for name, a in (extra or {}).items()]
    infos, data = [], b""
    for name, dims, tensor_type, array in tensors:
        data += bytes(-len(data) % ALIGNMENT)
        infos.append(tensor_info(name, dims, tensor_type, len(data)))
        data += array.tobytes()
    return gguf(kvs, infos, data)


def patch_tensor(data: bytes, name: str, *, dims: tuple[int, ...] | None = None, tensor_type: int | None = None,
                 offset: int | None = None) -> bytes:
    """`data` with fields of tensor `name`'s entry in the tensor table rewritten (its number of dimensions
    stays)."""
    at, old_dims, old_type, old_offset = _entry(data, name)
    entry = u32(len(old_dims)) + b"".join(u64(d) for d in (dims or old_dims))
    entry += u32(old_type if tensor_type is None else tensor_type) + u64(old_offset if offset is None else offset)
    return data[:at] + entry + data[at + len(entry):]


def tensor_offset(data: bytes, name: str) -> int:
    """Tensor `name`'s data offset, from the start of the data section."""
    return _entry(data, name)[3]


def _entry(data: bytes, name: str) -> tuple[int, tuple[int, ...], int, int]:
    """(where the fields after the name start, dimensions, type, offset) of tensor `name`'s entry; its name is
    unique in the files the tests change."""
    at = data.index(string(name)) + len(string(name))
    n_dims = struct.unpack_from("<I", data, at)[0]
    dims = struct.unpack_from(f"<{n_dims}Q", data, at + 4)
    tensor_type, offset = struct.unpack_from("<IQ", data, at + 4 + 8 * n_dims)
    return at, dims, tensor_type, offset


def _value(v: Any) -> bytes:
    """A value's type and payload."""
    if isinstance(v, list):
        item_type, _ = _scalar(v[0]) if v else (GGUFValueType.INT32, b"")
        return u32(GGUFValueType.ARRAY) + u32(item_type) + u64(len(v)) + b"".join(_scalar(x)[1] for x in v)
    value_type, payload = _scalar(v)
    return u32(value_type) + payload


def _scalar(v: Any) -> tuple[int, bytes]:
    if isinstance(v, bool):
        return GGUFValueType.BOOL, struct.pack("<?", v)
    if isinstance(v, int):
        return (GGUFValueType.UINT32, u32(v)) if 0 <= v < 2**32 else (GGUFValueType.INT64, struct.pack("<q", v))
    if isinstance(v, float):
        return GGUFValueType.FLOAT32, struct.pack("<f", v)
    return GGUFValueType.STRING, string(v)
