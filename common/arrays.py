"""Weights on the wire in another float type (``federation.wire_dtype``), without torch.

float16 halves the bytes of every message. Flower averages what it receives in the type it
receives, so the server turns replies back into float32 before averaging; integer arrays (step
counters) are never touched. Flower has no such option (no compression mod), hence this module.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def cast_floats(record: ArrayRecord, dtype: str) -> ArrayRecord:
    """``record`` with every floating-point array as ``dtype``; the others unchanged."""
    target = np.dtype(dtype)
    if all(record[key].numpy().dtype == target or not np.issubdtype(record[key].numpy().dtype, np.floating)
           for key in record.keys()):
        return record
    out = ArrayRecord()
    for key in record.keys():
        array = record[key].numpy()
        out[key] = Array(np.ascontiguousarray(array.astype(target)) if np.issubdtype(array.dtype, np.floating) else array)
    return out


def copy_arrays(record: ArrayRecord) -> ArrayRecord:
    """An independent copy of ``record`` (``copy.deepcopy`` cannot copy arrays whose buffer is a
    memoryview, as Flower's received messages hold)."""
    out = ArrayRecord()
    for key in record.keys():
        out[key] = Array(np.array(record[key].numpy(), copy=True))
    return out


def nbytes(record: ArrayRecord) -> int:
    """The bytes of the arrays of ``record`` (what a message carries, apart from a small header)."""
    return int(sum(record[key].numpy().nbytes for key in record.keys()))


#: The key of a SecAgg+ ``FitIns`` config that names the packed arrays in order: legacy ``Parameters``
#: have no names (server.strategy.secure sends it, client.secure reads it)
ARRAY_KEYS = "array-keys"


def float_keys(record: ArrayRecord) -> list[str]:
    """The keys of the floating-point arrays of ``record``, in order: what SecAgg+ sums."""
    return [key for key in record.keys() if np.issubdtype(record[key].numpy().dtype, np.floating)]
