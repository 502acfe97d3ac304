"""How model weights travel between the server and the sites.

Flower ships an ``ArrayRecord`` as one object per array (plus one per 5 MB chunk), and every
object is a separate authenticated request through the SuperLink. A state dict of ~150 tensors
therefore costs ~300 requests per site per direction, which on a loaded machine took ~20 s per
message (measured with ``FLWR_LOG_LEVEL=DEBUG`` on the tiny preset). Packing the tensors of each
parameter group (``stems``, ``imputer``, ``encoder``, ``decoder``, ``classifier``, ...) into one
flat vector keeps the wire at a handful of objects while strategies can still select weights by
group name. FedAvg/FedProx average element-wise, so averaging packed vectors gives exactly the
same global model as averaging tensor by tensor.

Flower has no such packing (its ``ArrayRecord`` keeps one entry per tensor), hence this module.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from flwr.app import ArrayRecord


#: the survival head's module name under ``classifier`` (``classifier.survival.*``)
SURVIVAL_HEAD = "survival"


def head_group(task: str) -> str:
    """The wire group of one task's classifier head (averaged per task by the server)."""
    return f"classifier.heads.{task}"


def group_of(name: str) -> str:
    """The parameter group of a state-dict key: its top-level module (``encoder.stages.0.w`` ->
    ``encoder``), except that the task-specific parameters of the classifier form one group per
    task (``classifier.heads.idh.0.weight``, ``classifier.direct.idh.weight`` -> ``classifier.heads.idh``),
    and the survival head one of its own (``classifier.survival.*`` -> ``classifier.heads.survival``)."""
    parts = name.split(".")
    if len(parts) > 3 and parts[0] == "classifier" and parts[1] in ("heads", "direct"):
        return head_group(parts[2])
    if len(parts) > 2 and parts[0] == "classifier" and parts[1] == SURVIVAL_HEAD:
        return head_group(SURVIVAL_HEAD)  # averaged by the cases with a known survival, as a task head
    return parts[0]


def _wire_key(name: str, dtype: torch.dtype) -> str:
    # float32 groups keep the bare group name; any other dtype gets its own vector
    suffix = "" if dtype == torch.float32 else f".{str(dtype).removeprefix('torch.')}"
    return group_of(name) + suffix


def pack_state(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """One flat numpy vector per (group, dtype), in the state dict's key order."""
    groups: dict[str, list[torch.Tensor]] = OrderedDict()
    for name, tensor in state.items():
        groups.setdefault(_wire_key(name, tensor.dtype), []).append(tensor.detach().cpu().reshape(-1))
    return ArrayRecord(OrderedDict((key, torch.cat(parts)) for key, parts in groups.items()))


class WireFormatError(ValueError):
    """Packed weights that do not fit the model they are loaded into."""


def unpack_state(record: ArrayRecord, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_state` given a state dict of the same model (shapes, dtypes, order)."""
    offsets: dict[str, int] = {}
    vectors = {key: array.numpy() for key, array in record.items()}
    out: dict[str, torch.Tensor] = OrderedDict()
    for name, ref in template.items():
        key = _wire_key(name, ref.dtype)
        if key not in vectors:
            raise WireFormatError(
                f"the received weights have no group {key!r} (they have {sorted(vectors)}); "
                "server and site must run the same model configuration"
            )
        start = offsets.get(key, 0)
        stop = start + ref.numel()
        chunk = vectors[key][start:stop]
        if chunk.size != ref.numel():
            raise WireFormatError(f"group {key!r} is too short for {name!r}: the model configurations differ")
        out[name] = torch.from_numpy(np.ascontiguousarray(chunk)).reshape(ref.shape).to(ref.dtype)
        offsets[key] = stop
    for key, vector in vectors.items():
        if offsets.get(key, 0) != vector.size:
            raise WireFormatError(
                f"group {key!r} has {vector.size} values but the model uses {offsets.get(key, 0)}: "
                "server and site must run the same model configuration"
            )
    return out


def load_packed(model: torch.nn.Module, record: ArrayRecord) -> None:
    """Load packed weights into ``model`` in place."""
    model.load_state_dict(unpack_state(record, model.state_dict()))
