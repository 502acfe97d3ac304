"""Screening of site replies before they are averaged: shapes, finiteness, weights.

No torch here (as in Flower's own strategies): arrays are checked as numpy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MetricRecord


def check_arrays(arrays: ArrayRecord, reference: dict[str, tuple[tuple[int, ...], str]]) -> str | None:
    """Why ``arrays`` cannot be averaged into a model shaped like ``reference``, or None."""
    keys = set(arrays.keys())
    if keys != set(reference):
        missing = sorted(set(reference) - keys)[:3]
        extra = sorted(keys - set(reference))[:3]
        return f"parameter names differ from the global model (missing {missing}, unexpected {extra})"
    for key, (shape, _dtype) in reference.items():
        array = arrays[key].numpy()
        if tuple(array.shape) != shape:
            return f"parameter {key} has shape {tuple(array.shape)}, expected {shape}"
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            return f"parameter {key} contains NaN/inf values"
    return None


def check_metrics(metrics: MetricRecord, weight_key: str) -> str | None:
    """Why a reply's metrics are unusable (non-finite or non-positive weight), or None."""
    weight = metrics.get(weight_key)
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        return f"'{weight_key}' is {weight!r}; it must be a non-negative number of training cases"
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and math.isinf(v) for v in values):
            return f"metric {key} is infinite"
    return None


def record_to_dict(record: MetricRecord) -> dict[str, Any]:
    return {k: (float(v) if not isinstance(v, list) else [float(x) for x in v]) for k, v in record.items()}
