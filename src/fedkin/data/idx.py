"""Reader for the IDX format of (Fashion-)MNIST, optionally gzip-compressed.

Layout: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
0x0D float32, 0x0E float64), the number of dimensions ``d``, then ``d`` big-endian uint32
sizes, then the values in C order, big-endian.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from fedkin.core.errors import DataError

_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _raw_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix != ".gz":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(
            f"{path} is not a valid gzip file ({err}); delete it and reinstall or re-download it."
        ) from err


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Array stored in the IDX file ``path`` (``.gz`` is decompressed), which must have
    ``ndim`` dimensions; a malformed file raises :class:`DataError` naming the problem."""
    path = Path(path)
    data = _raw_bytes(path)
    fix = "; the file is corrupt or not an IDX file — reinstall or re-download it."
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise DataError(f"{path}: bad IDX magic number {data[:4].hex() or '(empty)'}{fix}")
    if data[3] != ndim:
        raise DataError(f"{path}: IDX file has {data[3]} dimensions, expected {ndim}{fix}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header{fix}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(
            f"{path}: IDX header announces shape {shape} ({expected} bytes of data) but the "
            f"file holds {len(data) - header} bytes{fix}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
