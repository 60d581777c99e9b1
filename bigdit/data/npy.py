"""Array coding of the shards: sample arrays as ``.npy`` bytes and back, without copying on the way back.

WebDataset shards store every array field as one ``.npy`` member (dtype and shape travel with the data);
reading them is on the loaders' per-sample path, hence the header cache.
"""

from __future__ import annotations

import io

import numpy as np

from bigdit.data.schema import SchemaError


def npy_bytes(a: np.ndarray) -> bytes:
    """``a`` in .npy format (self-describing: dtype and shape travel with the data)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}


def npy_array(data: bytes | memoryview) -> np.ndarray:
    """Inverse of :func:`npy_bytes`, without copying the payload.

    Parsed headers are cached by their bytes: every sample of a field has the same header, and parsing
    it (a Python literal) would otherwise cost more than the rest of decoding.
    """
    data = memoryview(data)
    if bytes(data[:6]) != b"\x93NUMPY" or len(data) < 10:
        raise SchemaError("not an .npy array (bad magic)")
    size_bytes = 2 if data[6] == 1 else 4
    end = 8 + size_bytes + int.from_bytes(data[8 : 8 + size_bytes], "little")
    header = bytes(data[:end])
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        buf = io.BytesIO(header)
        version = np.lib.format.read_magic(buf)
        shape, fortran, dtype = np.lib.format._read_array_header(buf, version)  # public readers copy the data
        if fortran:
            raise SchemaError("fortran-ordered arrays are not part of the schema")
        parsed = _NPY_HEADERS[header] = (dtype, shape, int(np.prod(shape)))
    dtype, shape, count = parsed
    if len(data) - end != count * dtype.itemsize:
        raise SchemaError(f"truncated array: {(len(data) - end) // dtype.itemsize} of {count} values")
    return np.frombuffer(data, dtype=dtype, offset=end).reshape(shape)
