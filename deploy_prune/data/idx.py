"""Reader for the IDX format (MNIST / Fashion-MNIST), plain or gzipped.

numpy reads it in a few lines; no library in our dependency set does (torchvision's reader
lives inside its download-oriented MNIST class), so it is written here.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Any

import numpy as np

from deploy_prune.errors import UserError

_DTYPES: dict[int, Any] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Return the array stored in an IDX file (``.gz`` is decompressed transparently)."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read IDX file {str(p)!r}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise UserError(f"{str(p)!r} is not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_DTYPES[raw[2]])
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UserError(f"IDX file {str(p)!r} is truncated: header says {dims}, found {data.size} values")
    return data.reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as IDX (used by tests to make small Fashion-MNIST-like files)."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09}
    arr = np.ascontiguousarray(array)
    header = bytes([0, 0, codes[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "wb") as f:
        f.write(header + arr.tobytes())


def find_idx(directory: Path, stem: str) -> Path:
    """``stem`` with or without ``.gz`` (both spellings of the Fashion-MNIST file names)."""
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise UserError(f"{stem}[.gz] not found in {str(directory)!r}; point --data-dir at the IDX files")
