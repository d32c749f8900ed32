"""Reading a GGUF file: its metadata as plain Python values and its tensor table, with every count, length
and extent checked against the file before anything is built from it.

A GGUF file is a header (magic, version, tensor and key counts), the key/value metadata, the tensor table
(name, dimensions, type and data offset of each) and, aligned, the tensor data (ggml's docs/gguf.md).
The `gguf` package's GGUFReader trusts the counts it reads: a file that claims 10^9 keys, or an array of
10^9 elements, makes it loop that many times (past the end of the file each element is an empty array that
costs a Python object all the same), it multiplies dimensions in wrapping uint64, and it keeps several
numpy arrays per array element, ~700 bytes of memory for each byte of a uint8 array. This reader checks
each count against the bytes that follow before looping over it, keeps one Python value per element, sizes
tensors in exact integers, and refuses with a ModelFileError, naming the file and the byte, whatever does
not fit: a truncated file, a string or array longer than the rest of the file, an unknown value or tensor
type, a row that is not a whole number of its type's blocks, tensor data past the end of the file or
overlapping another tensor's.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import quant_shape_to_byte_shape

from ..errors import ModelFileError

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # version 1 had 32-bit counts; nothing has written it since 2023
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # GGML_MAX_DIMS
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_HEADER_BYTES = 4 + 4 + 8 + 8
# The smallest encodings, which bound a count before it is looped over: an empty key with a one-byte value;
# a tensor with an empty name and one dimension.
_MIN_KEY_VALUE_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8

# The scalar value types, little-endian (numpy reads the same format codes for arrays of them).
_SCALARS = {
    GGUFValueType.UINT8: struct.Struct("<B"),
    GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"),
    GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: _U32,
    GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.UINT64: _U64,
    GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT32: struct.Struct("<f"),
    GGUFValueType.FLOAT64: struct.Struct("<d"),
    GGUFValueType.BOOL: struct.Struct("<?"),
}

# Tensor types numpy holds as numbers; the others (BF16, the quantized ones) stay bytes, as GGUFReader gives them.
_NUMPY_TYPES = {
    GGMLQuantizationType.F32: np.dtype("<f4"),
    GGMLQuantizationType.F16: np.dtype("<f2"),
    GGMLQuantizationType.F64: np.dtype("<f8"),
    GGMLQuantizationType.I8: np.dtype("i1"),
    GGMLQuantizationType.I16: np.dtype("<i2"),
    GGMLQuantizationType.I32: np.dtype("<i4"),
    GGMLQuantizationType.I64: np.dtype("<i8"),
}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # as ggml orders dimensions: the row length first
    data: np.ndarray  # a read-only view of the mapped file, in numpy's order (a row of bytes for block types)


@dataclass(frozen=True)
class GGUFFile:
    metadata: dict[str, Any]  # strings decoded, arrays as lists, scalars as int/float/bool
    tensors: list[GGUFTensor]


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse and check a GGUF file; the tensors' data stay in the mapped file until copied out."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < _HEADER_BYTES:
            raise ModelFileError(f"is {size} bytes long, too short for a GGUF header", path)
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    r = _Reader(buf, path)
    tensor_count, key_count = r.header()
    metadata = r.metadata(key_count)
    infos = r.tensor_infos(tensor_count)
    return GGUFFile(metadata, r.tensors(infos, _alignment(metadata, path)))


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Every metadata field of a GGUF file, keyed by its GGUF name, as plain Python values."""
    return read_gguf(path).metadata


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    dims: tuple[int, ...]
    tensor_type: GGMLQuantizationType
    offset: int  # from the start of the data section
    n_bytes: int


class _Reader:
    """The mapped file and a position in it; every read first checks that its bytes are there."""

    def __init__(self, buf: mmap.mmap, path: str | os.PathLike[str]):
        self.buf = buf
        self.path = path
        self.pos = 0

    def error(self, problem: str) -> ModelFileError:
        return ModelFileError(problem, self.path)

    def left(self) -> int:
        return len(self.buf) - self.pos

    def skip(self, n: int, what: str) -> int:
        """Move past the `n` bytes of `what`; where they start."""
        if n > self.left():
            raise self.error(f"truncated: {what} at byte {self.pos} needs {n} bytes, {self.left()} are left")
        self.pos += n
        return self.pos - n

    def scalar(self, form: struct.Struct, what: str) -> Any:
        return form.unpack_from(self.buf, self.skip(form.size, what))[0]

    def fits(self, count: int, item_bytes: int, what: str) -> int:
        """`count`, if that many items of at least `item_bytes` each fit in the rest of the file."""
        if count * item_bytes > self.left():
            raise self.error(f"{count} {what} at byte {self.pos} cannot fit in the {self.left()} bytes left")
        return count

    def string(self, what: str) -> str:
        n = self.fits(self.scalar(_U64, f"the length of {what}"), 1, f"bytes of {what}")
        start = self.skip(n, what)
        try:
            return str(self.buf[start : self.pos], "utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{what} at byte {start} is not UTF-8") from None

    def header(self) -> tuple[int, int]:
        """(tensor count, key count)."""
        if self.buf[:4] != _MAGIC:
            raise self.error("not a GGUF file: it does not start with 'GGUF'")
        self.skip(4, "the magic")
        version = self.scalar(_U32, "the version")
        if version not in _VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            kind = "a big-endian GGUF file" if swapped in _VERSIONS else f"GGUF version {version}"
            raise self.error(f"{kind} is not supported (little-endian versions {_VERSIONS[0]} and {_VERSIONS[1]} are)")
        return self.scalar(_U64, "the tensor count"), self.scalar(_U64, "the key count")

    def metadata(self, count: int) -> dict[str, Any]:
        self.fits(count, _MIN_KEY_VALUE_BYTES, "metadata keys")
        metadata: dict[str, Any] = {}
        for _ in range(count):
            key = self.string("a metadata key")
            if key in metadata:
                raise self.error(f"metadata key {_short(key)} appears twice")
            metadata[key] = self.value(self.scalar(_U32, f"the type of {_short(key)}"), _short(key))
        return metadata

    def value(self, value_type: int, key: str) -> Any:
        if value_type == GGUFValueType.STRING:
            return self.string(f"the value of {key}")
        if value_type == GGUFValueType.ARRAY:
            return self.array(key)
        form = _SCALARS.get(value_type)
        if form is None:
            raise self.error(f"{key} has unknown value type {value_type}")
        return self.scalar(form, f"the value of {key}")

    def array(self, key: str) -> list[Any]:
        item_type = self.scalar(_U32, f"the item type of {key}")
        if item_type == GGUFValueType.STRING:
            count = self.fits(self.scalar(_U64, f"the length of {key}"), 8, f"strings of {key}")
            return [self.string(f"an item of {key}") for _ in range(count)]
        form = _SCALARS.get(item_type)
        if form is None:  # arrays of arrays among them: llama.cpp refuses those too
            raise self.error(f"{key} is an array of {_value_type_name(item_type)}, which GGUF metadata cannot hold")
        count = self.fits(self.scalar(_U64, f"the length of {key}"), form.size, f"items of {key}")
        start = self.skip(count * form.size, f"the items of {key}")
        return np.frombuffer(self.buf, np.dtype(form.format), count, start).tolist()

    def tensor_infos(self, count: int) -> list[_TensorInfo]:
        self.fits(count, _MIN_TENSOR_INFO_BYTES, "tensors")
        infos: list[_TensorInfo] = []
        names: set[str] = set()
        for _ in range(count):
            name = self.string("a tensor name")
            if name in names:
                raise self.error(f"tensor {_short(name)} appears twice")
            names.add(name)
            infos.append(self.tensor_info(_short(name), name))
        return infos

    def tensor_info(self, label: str, name: str) -> _TensorInfo:
        n_dims = self.scalar(_U32, f"the dimension count of tensor {label}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise self.error(f"tensor {label} has {n_dims} dimensions; GGUF tensors have 1 to {_MAX_DIMS}")
        dims = struct.unpack_from(f"<{n_dims}Q", self.buf, self.skip(8 * n_dims, f"the dimensions of tensor {label}"))
        raw_type = self.scalar(_U32, f"the type of tensor {label}")
        offset = self.scalar(_U64, f"the data offset of tensor {label}")
        if 0 in dims:  # no weights, and the other dimensions then bounded by nothing (numpy refuses some)
            raise self.error(f"tensor {label} has dimensions {list(dims)}: one of them is empty")
        try:
            tensor_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise self.error(f"tensor {label} has unknown type {raw_type}") from None
        block, block_bytes = GGML_QUANT_SIZES[tensor_type]
        if dims[0] % block:
            raise self.error(f"tensor {label} has rows of {dims[0]} values, not a whole number of "
                             f"{tensor_type.name} blocks of {block}")
        return _TensorInfo(name, dims, tensor_type, offset, math.prod(dims) // block * block_bytes)

    def tensors(self, infos: list[_TensorInfo], alignment: int) -> list[GGUFTensor]:
        """Check that each tensor's data lies in the file, aligned and apart from the others; view it."""
        start = -(-self.pos // alignment) * alignment
        end_of_previous, previous = start, None
        for info in sorted(infos, key=lambda t: t.offset):
            label, first = _short(info.name), start + info.offset
            if info.offset % alignment:
                raise self.error(f"tensor {label}: data offset {info.offset} is not a multiple of the alignment "
                                 f"{alignment}")
            if info.n_bytes > len(self.buf) - first:
                raise self.error(f"tensor {label}: {info.n_bytes} bytes of data at byte {first} run past the end "
                                 f"of the file ({len(self.buf)} bytes)")
            if first < end_of_previous:
                raise self.error(f"tensor {label}: its data at byte {first} overlaps the data of tensor {previous}")
            end_of_previous, previous = first + info.n_bytes, label
        return [GGUFTensor(t.name, t.tensor_type, t.dims, self.view(t, start + t.offset)) for t in infos]

    def view(self, info: _TensorInfo, first: int) -> np.ndarray:
        shape = tuple(reversed(info.dims))
        dtype = _NUMPY_TYPES.get(info.tensor_type)
        if dtype is not None:
            return np.frombuffer(self.buf, dtype, math.prod(shape), first).reshape(shape)
        return np.frombuffer(self.buf, np.uint8, info.n_bytes, first).reshape(
            quant_shape_to_byte_shape(shape, info.tensor_type))


def _alignment(metadata: dict[str, Any], path: str | os.PathLike[str]) -> int:
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment < 1 or alignment & (alignment - 1):
        raise ModelFileError(f"general.alignment must be a power of two, not {_short(alignment)}", path)
    return alignment


def _value_type_name(raw: int) -> str:
    try:
        return f"{GGUFValueType(raw).name.lower()}s"
    except ValueError:
        return f"unknown type {raw}"


def _short(value: Any, limit: int = 60) -> str:
    """A value or name for a message, whatever its length."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
