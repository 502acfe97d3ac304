"""Bounds on what one site's reply can do to the global model: update size and averaging weight.

FedAvg trusts every reply: a site that returns its weights x1000 drives every site's loss to NaN
the next round, and one that claims ``num-examples`` = 1e9 replaces the global model. Two checks,
both relative to the other sites so that no absolute scale has to be guessed:

* **update distance** ``||w_site - w_global||`` against the median distance of the *other* sites
  (leave-one-out, so that with two sites the honest one is the reference for the other): beyond
  ``max_update_ratio`` x that median the update is rejected, or clipped back to the bound
  (``update_bound`` = reject | clip | off). A sign-flipped update has an honest length: that is
  what the robust aggregators (FedMedian, FedTrimmedAvg, Krum, Bulyan) are for;
* **averaging weight** (``num-examples``, and a head's ``labeled_<task>``) capped by the training
  cases the site declared (``n_train``) the first time it was seen, by ``max_examples_ratio`` x
  the median of the other sites' weights, and by ``max_examples`` when set.

Flower's strategies have no such screen (its robust aggregators replace the average instead of
bounding one reply), hence this module. No torch here: arrays are numpy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord


@dataclass(frozen=True)
class UpdateBounds:
    """The bounds of the module docstring (from ``federation.*`` of the config)."""

    mode: str = "reject"  # reject | clip | off
    max_update_ratio: float = 5.0
    max_examples: int = 0  # 0: no fixed cap
    max_examples_ratio: float = 10.0


def update_distance(arrays: ArrayRecord, current: ArrayRecord) -> float:
    """L2 distance between two packed models over their floating-point arrays (in float64)."""
    total = 0.0
    for key in current.keys():
        reference = current[key].numpy()
        if not np.issubdtype(reference.dtype, np.floating):
            continue  # e.g. BatchNorm's step counters
        diff = arrays[key].numpy().astype(np.float64) - reference.astype(np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def leave_one_out_medians(values: Mapping[str, float]) -> dict[str, float | None]:
    """For each key, the median of the other keys' values (None when it has no other)."""
    out: dict[str, float | None] = {}
    for key in values:
        others = [v for k, v in values.items() if k != key]
        out[key] = float(np.median(others)) if others else None
    return out


def screen_distances(
    distances: Mapping[str, float], bounds: UpdateBounds
) -> tuple[dict[str, str], dict[str, float]]:
    """(rejected {site: reason}, clipped {site: scale factor}) under ``bounds``."""
    rejected: dict[str, str] = {}
    clipped: dict[str, float] = {}
    if bounds.mode == "off":
        return rejected, clipped
    for site, median in leave_one_out_medians(distances).items():
        distance = distances[site]
        if median is None or median <= 0.0:
            continue  # nothing to compare with
        limit = bounds.max_update_ratio * median
        if distance <= limit:
            continue
        if bounds.mode == "reject":
            rejected[site] = (
                f"update distance {distance:.3g} is {distance / median:.1f}x the median of the other "
                f"sites ({median:.3g}); the bound is {bounds.max_update_ratio:g}x (federation.max_update_ratio)"
            )
        else:
            clipped[site] = limit / distance
    return rejected, clipped


def clip_update(arrays: ArrayRecord, current: ArrayRecord, scale: float) -> ArrayRecord:
    """``current + scale * (arrays - current)`` on the floating-point arrays; the rest unchanged."""
    out = ArrayRecord()
    for key in arrays.keys():
        array = arrays[key].numpy()
        reference = current[key].numpy()
        if np.issubdtype(reference.dtype, np.floating):
            array = (reference + scale * (array.astype(np.float64) - reference)).astype(reference.dtype)
        out[key] = Array(np.ascontiguousarray(array))
    return out


def cap_weights(
    weights: Mapping[str, float], declared: Mapping[str, float], bounds: UpdateBounds
) -> dict[str, tuple[float, str]]:
    """``{site: (capped weight, why)}`` for the sites whose weight exceeds a cap (see the module
    docstring); ``declared``: each site's training cases when it was first seen."""
    out: dict[str, tuple[float, str]] = {}
    medians = leave_one_out_medians(weights)
    for site, weight in weights.items():
        caps: list[tuple[float, str]] = []
        if site in declared:
            caps.append((declared[site], "the training cases it declared when it joined"))
        median = medians[site]
        if median is not None and median > 0:
            caps.append((bounds.max_examples_ratio * median,
                         f"{bounds.max_examples_ratio:g}x the median of the other sites (federation.max_examples_ratio)"))
        if bounds.max_examples > 0:
            caps.append((float(bounds.max_examples), "federation.max_examples"))
        below = [cap for cap in caps if weight > cap[0]]
        if below:
            cap, why = min(below)
            out[site] = (cap, f"num-examples {weight:g} capped to {cap:g} ({why})")
    return out

