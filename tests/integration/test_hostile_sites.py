"""Sites that misbehave, in a real in-process federation (ServerApp + ClientApps, no network).

A site that scales its update x1000 or flips its sign must not take the global model over, and
no reply - error replies included - may carry a case ID, a file name or a path of a site.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from common.config import compose
from deploy import simulation
from deploy.simulation import InProcessGrid

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from synth import generate_cohort

    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, preset="tiny", sites=3, cases_per_site=6, heldout_cases=6, shape=32, seed=5)
    return out


class HostileGrid(InProcessGrid):
    """Node ``hostile`` returns ``attack(received global, its trained weights)`` instead of its weights."""

    def __init__(self, nodes, run_config, hostile: int, attack) -> None:
        super().__init__(nodes, run_config)
        self.hostile, self.attack = hostile, attack

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        for message, reply in zip(messages, replies):
            if message.metadata.dst_node_id == self.hostile and not reply.has_error() and reply.content.array_records:
                sent, trained = message.content["arrays"], reply.content["arrays"]
                reply.content["arrays"] = ArrayRecord({
                    k: Array(self.attack(sent[k].numpy(), trained[k].numpy())) for k in trained.keys()
                })
        return replies


def run(cohort: Path, out: Path, grid_factory, *overrides: str) -> dict:
    cfg = compose(["+experiment=tiny", f"federation.heldout={cohort / 'heldout'}", f"federation.out_dir={out}",
                   "train.threads=1", "federation.rounds=3", "train.local_epochs=3", "federation.evaluate_sites=false",
                   "federation.min_nodes=3", *overrides])
    simulation.run_inprocess(cfg, simulation.site_nodes(cohort, ["site-a", "site-b", "site-c"]), grid_class=grid_factory)
    return json.loads((out / "tiny" / "metrics.json").read_text())


def scale(sent: np.ndarray, trained: np.ndarray) -> np.ndarray:
    return trained * 1000 if np.issubdtype(trained.dtype, np.floating) else trained


def flip(sent: np.ndarray, trained: np.ndarray) -> np.ndarray:
    return sent - (trained - sent) if np.issubdtype(trained.dtype, np.floating) else trained


#: how far the held-out Dice of an attacked run may fall below the honest one. Measured (tiny model,
#: 3 rounds x 3 local epochs, 6 held-out cases): honest 0.46, scaled x1000 rejected 0.4-0.5, sign flip
#: under FedMedian 0.51, sign flip under plain FedAvg 0.14 (the control below), scaled x1000 without
#: the bound: NaN losses at every site in round 2 and the run stops.
TOLERANCE = 0.1


@pytest.mark.long
def test_a_scaled_or_sign_flipped_site_cannot_take_the_model_over(cohort: Path, tmp_path: Path) -> None:
    honest = run(cohort, tmp_path / "honest", InProcessGrid)
    scaled = run(cohort, tmp_path / "scaled", lambda n, c: HostileGrid(n, c, 3, scale))
    flipped = run(cohort, tmp_path / "flipped", lambda n, c: HostileGrid(n, c, 3, flip),
                  "federation.strategy=fedmedian")
    control = run(cohort, tmp_path / "control", lambda n, c: HostileGrid(n, c, 3, flip))  # FedAvg: no defence
    for entry in scaled["rounds"][1:]:
        assert "site-c" in entry["rejected"] and "median of the other sites" in entry["rejected"]["site-c"]
        assert set(entry["train"]) == {"site-a", "site-b"}
    dice = {name: h["final"]["heldout"]["dice_wt"] for name, h in
            (("honest", honest), ("scaled", scaled), ("flipped", flipped), ("control", control))}
    assert all(math.isfinite(v) for v in dice.values()), dice
    assert dice["scaled"] >= dice["honest"] - TOLERANCE, dice
    assert dice["flipped"] >= dice["honest"] - TOLERANCE, dice
    assert dice["control"] < dice["honest"] - TOLERANCE, dice  # the attack is real: the test can fail


def test_no_reply_carries_a_case_id_a_file_name_or_a_path(cohort: Path, tmp_path: Path) -> None:
    sites = tmp_path / "sites"
    shutil.copytree(cohort / "site-a", sites / "site-a")
    shutil.copytree(cohort / "site-b", sites / "site-mixed")
    broken = sorted(p for p in (sites / "site-mixed").iterdir() if p.is_dir())[0]
    next(broken.glob("*.nii*")).write_bytes(b"not a nifti file")  # one rejected case
    (sites / "site-bad").mkdir()
    for case in sorted(p for p in (cohort / "site-c").iterdir() if p.is_dir()):
        shutil.copytree(case, sites / "site-bad" / case.name)
        for volume in (sites / "site-bad" / case.name).glob("*.nii*"):
            volume.write_bytes(b"\x00" * 64)  # every case unusable
    shutil.copy(cohort / "site-c" / "labels.csv", sites / "site-bad" / "labels.csv")
    nodes = simulation.site_nodes(sites, ["site-a", "site-mixed", "site-bad"])
    cfg = compose(["+experiment=tiny", f"federation.heldout={cohort / 'heldout'}", f"federation.out_dir={tmp_path / 'runs'}",
                   "train.threads=1", "federation.rounds=1", "federation.min_nodes=3"])  # default min_metric_cases
    grid = simulation.run_inprocess(cfg, nodes)

    secrets = {str(sites), str(sites.resolve())}
    for site in sites.iterdir():
        secrets.add(str(site))
        for case in site.iterdir():
            secrets.add(case.name)
            if case.is_dir():
                secrets.update(f.name for f in case.iterdir())
    secrets.discard("labels.csv")
    texts = []
    for reply in grid.replies:
        if reply.has_error():
            texts.append(reply.error.reason)
            continue
        texts.append(repr({k: dict(v) for k, v in reply.content.config_records.items()}))
        texts.append(repr({k: dict(v) for k, v in reply.content.metric_records.items()}))
    errors = [r.error.reason for r in grid.replies if r.has_error()]
    assert errors and all("site-bad" in e and "rejected" in e for e in errors), errors
    leaked = sorted({s for s in secrets for t in texts if s in t})
    assert not leaked, leaked
    run_dir = tmp_path / "runs" / "tiny"
    for name in ("metrics.json", "report.html"):
        text = (run_dir / name).read_text()
        assert not [s for s in secrets if s in text], name
    # 1-2 validation cases per site: below federation.min_metric_cases nothing of them is sent
    history = json.loads((run_dir / "metrics.json").read_text())
    for metrics in history["rounds"][1]["sites"].values():
        assert "dice_wt" not in metrics and metrics.get("n_cases", 0) == 0
