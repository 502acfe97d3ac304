"""client.worker: the site's long-lived worker gives the replies the ClientApp's own process gives,
is reused across messages, restarts after it died, stops when idle or orphaned, and talks to
nobody without the site's key."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from client import worker
from client.handlers import evaluate_content, train_content
from client.worker import SiteWorkerError, call, socket_path, worker_pid, worker_wanted
from common.config import compose, to_run_config
from common.data.site import SiteNotFoundError
from common.model import build_model
from common.wire import pack_state


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from synth import generate_cohort

    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, preset="tiny", sites=1, cases_per_site=5, heldout_cases=2, shape=32, seed=3)
    return out


@pytest.fixture
def stop_workers():
    """Kill every worker a test started (by the pid its worker wrote), also when the test fails."""
    states: list[Path] = []
    yield states
    for state in states:
        pid = worker_pid(state)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)


def _gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # our own child (the owner stand-in) turns zombie until reaped
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def _message(cohort: Path, state: Path, *overrides: str) -> tuple[RecordDict, dict, dict]:
    cfg = compose(["+experiment=tiny", "train.max_steps=2", "train.threads=1", "train.progress=false", *overrides])
    model = build_model(cfg.model, cfg.data.size)
    instruction = RecordDict({"arrays": pack_state(model.state_dict()),
                              "config": ConfigRecord({"stage": "supervised", "global-round": 1, "validate": True})})
    node = {"data-path": str(cohort / "site-a"), "state-path": str(state), "site-name": "site-a"}
    return instruction, node, to_run_config(cfg)


def _arrays(reply: RecordDict) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in reply["arrays"].items()}


def test_the_worker_replies_as_the_clientapp_process_does_is_reused_and_serves_on_after_errors_and_intruders(
    cohort: Path, tmp_path: Path, stop_workers
) -> None:
    state = tmp_path / "state"
    stop_workers.append(state)
    # validation in the reply (after_reply: test_validation_after_the_reply_travels_with_the_next_reply)
    instruction, node, run_config = _message(cohort, state, "federation.site_validation=in_train")
    local = train_content(instruction, node, run_config)
    first, started = call("train", instruction, node, run_config, state, idle_s=60, owner_pid=os.getpid())
    assert started
    pid = worker_pid(state)
    assert pid is not None and pid != os.getpid()
    second, started_again = call("train", instruction, node, run_config, state, idle_s=60, owner_pid=os.getpid())
    assert not started_again and worker_pid(state) == pid  # the same process served both
    for reply in (first, second):
        a, b = _arrays(local), _arrays(reply)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        # timings differ, and the cache the first call filled serves the later ones
        timing = {k for k in local["metrics"] if k.endswith("seconds")} | {"cache_hits"}
        assert {k: v for k, v in reply["metrics"].items() if k not in timing} == {
            k: v for k, v in local["metrics"].items() if k not in timing}
        assert dict(reply["site"]) == {"name": "site-a"}
    # the evaluate handler too (one validation case here: let its metrics through)
    _, _, run_config = _message(cohort, state, "federation.min_metric_cases=1", "federation.site_validation=in_train")
    content = RecordDict({"arrays": instruction["arrays"]})
    evaluated, _ = call("evaluate", content, node, run_config, state, 60, os.getpid())
    expected = evaluate_content(content, node, run_config)["metrics"]
    assert np.isfinite(expected["dice_wt"])
    assert dict(evaluated["metrics"]) == pytest.approx(dict(expected), nan_ok=True)

    # a handler's error reaches the caller with its class (what the error reply names) ...
    broken = {**node, "data-path": str(tmp_path / "no-such-site")}
    with pytest.raises(SiteNotFoundError) as raised:
        call("train", instruction, broken, run_config, state, 60, os.getpid())
    assert any("in the site's worker" in note for note in getattr(raised.value, "__notes__", []))
    # ... a peer without the site's key is refused ...
    with pytest.raises(AuthenticationError):
        Client(str(socket_path(state)), family="AF_UNIX", authkey=b"x" * 32)
    assert (state / worker.KEY_FILE).stat().st_mode & 0o077 == 0
    assert socket_path(state).parent.stat().st_mode & 0o077 == 0
    # ... and the same worker serves on
    reply, started = call("train", instruction, node, run_config, state, 60, os.getpid())
    assert not started and worker_pid(state) == pid and reply["metrics"]["num-examples"] > 0


def test_validation_after_the_reply_travels_with_the_next_reply(cohort: Path, tmp_path: Path, stop_workers) -> None:
    """federation.site_validation=after_reply: the worker validates the received model after it
    replied; the next reply (training or evaluate) carries those metrics, tagged with the model's
    round, equal to what a validation before training gives; kept metrics of another model are
    never sent."""
    state = tmp_path / "state"
    stop_workers.append(state)
    instruction, node, run_config = _message(cohort, state, "federation.min_metric_cases=1")
    # without a worker: validated before training, in the same reply, tagged with model 0
    inline = dict(train_content(instruction, node, run_config)["metrics"])
    assert inline["val/global-round"] == 0.0 and inline["validation_after_reply"] == 0.0
    assert np.isfinite(inline["val/dice_wt"])
    first, _ = call("train", instruction, node, run_config, state, 60, os.getpid())
    assert first["metrics"]["validation_after_reply"] == 1.0
    assert not any(k.startswith("val/") for k in first["metrics"])  # the validation is not done yet
    assert _arrays(first).keys() == _arrays(RecordDict({"arrays": instruction["arrays"]})).keys()
    # round 2's reply brings model 0's validation (and the worker keeps model 1's for later)
    round_2 = RecordDict({"arrays": first["arrays"],
                          "config": ConfigRecord({"stage": "supervised", "global-round": 2, "validate": True})})
    second, _ = call("train", round_2, node, run_config, state, 60, os.getpid())
    carried = {k: v for k, v in second["metrics"].items() if k.startswith("val/")}
    assert carried["val/global-round"] == 0.0
    assert {k: v for k, v in carried.items() if k != "val/seconds"} == pytest.approx(
        {k: v for k, v in inline.items() if k.startswith("val/") and k != "val/seconds"}, nan_ok=True)
    # the evaluate message after the last round brings model 1's, beside the final model's own
    final = RecordDict({"arrays": second["arrays"], "config": ConfigRecord({"global-round": 2})})
    evaluated, _ = call("evaluate", final, node, run_config, state, 60, os.getpid())
    assert evaluated["metrics"]["val/global-round"] == 1.0 and np.isfinite(evaluated["metrics"]["dice_wt"])
    # nothing is kept now; and what is kept for another model is dropped, not sent
    again, _ = call("evaluate", final, node, run_config, state, 60, os.getpid())
    assert not any(k.startswith("val/") for k in again["metrics"])
    call("train", round_2, node, run_config, state, 60, os.getpid())  # keeps model 1's validation
    later = RecordDict({"arrays": second["arrays"], "config": ConfigRecord({"global-round": 7})})
    skipped, _ = call("evaluate", later, node, run_config, state, 60, os.getpid())
    assert not any(k.startswith("val/") for k in skipped["metrics"])


def test_a_validation_that_fails_after_the_reply_is_reported_by_the_next_reply(tmp_path: Path) -> None:
    """The reply is gone when the worker validates: a failure is kept as a marker, so the site's
    next reply tells the server (which names the site and model); the traceback stays at the site."""
    from client.handlers import _validate_later
    from client.state import RoundTag, take_pending_validation

    class BrokenSite:
        state_dir = tmp_path

        def validate_received(self, model, round_config):
            raise RuntimeError("disk gone")

    cfg = compose(["+experiment=tiny"])
    instruction = RecordDict({"arrays": pack_state(build_model(cfg.model, cfg.data.size).state_dict()),
                              "config": ConfigRecord({"global-round": 3, "validate": True})})
    with pytest.raises(RuntimeError, match="disk gone"):
        _validate_later(BrokenSite(), cfg, instruction, lambda: build_model(cfg.model, cfg.data.size))
    assert take_pending_validation(tmp_path, RoundTag(cfg.federation.run_name, 2)) == {
        "validation_failed": 1.0, "global-round": 2.0}


def test_pseudo_labels_selected_after_the_reply_train_the_next_round_as_selecting_in_it_would(
    cohort: Path, tmp_path: Path, stop_workers
) -> None:
    """ssl.select_after_reply: the round before a pseudo-labeling round leaves the selection (with
    the model it received) to the worker after its reply; the pseudo-labeling round trains with
    those labels and reports their metrics. With the same received model in both rounds, that
    round's weights equal those of a site that selected inside the round (no worker)."""
    from client.pseudo_labels import read_pseudo_labels

    state, inline_state = tmp_path / "state", tmp_path / "inline"
    stop_workers.append(state)
    site = tmp_path / "site-a"  # the site with its molecular labels blanked: candidates to pseudo-label
    shutil.copytree(cohort / "site-a", site)
    rows = (site / "labels.csv").read_text().splitlines()
    (site / "labels.csv").write_text("\n".join([rows[0]] + [",".join(r.split(",")[:1] + [""] * 4 + r.split(",")[5:])
                                                           for r in rows[1:]]) + "\n")
    overrides = ("ssl.enabled=true", "ssl.tau_c=0.5", "ssl.tau_u=1.0", "federation.site_validation=in_train",
                 "federation.min_metric_cases=1")
    instruction, node, run_config = _message(cohort, state, *overrides)
    node = {**node, "data-path": str(site)}
    round_1 = RecordDict({"arrays": instruction["arrays"], "config": ConfigRecord(
        {"stage": "supervised", "global-round": 1, "select-after-reply": True})})
    call("train", round_1, node, run_config, state, 60, os.getpid())
    round_2 = RecordDict({"arrays": instruction["arrays"], "config": ConfigRecord(
        {"stage": "supervised", "global-round": 2, "pseudo-label": True})})
    worker_reply, _ = call("train", round_2, node, run_config, state, 60, os.getpid())  # waits for that work
    stored = read_pseudo_labels(state)
    assert stored is not None and stored[0].global_round == 1  # selected after round 1's reply
    inline_node = {**node, "state-path": str(inline_state)}
    inline_reply = train_content(round_2, inline_node, run_config)
    assert worker_reply["metrics"]["pseudo_after_reply"] == 1.0 and "pseudo_after_reply" not in inline_reply["metrics"]
    pseudo = {k for k in inline_reply["metrics"] if k.startswith("pseudo_") and k != "pseudo_seconds"}
    assert inline_reply["metrics"]["pseudo_accepted"] > 0, dict(inline_reply["metrics"])  # (lenient thresholds: labels to compare)
    assert {k: worker_reply["metrics"][k] for k in pseudo} == {k: inline_reply["metrics"][k] for k in pseudo}
    a, b = _arrays(worker_reply), _arrays(inline_reply)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # a later round selects itself: what the worker left was for round 2 only
    round_4 = RecordDict({"arrays": instruction["arrays"], "config": ConfigRecord(
        {"stage": "supervised", "global-round": 4, "pseudo-label": True})})
    later, _ = call("train", round_4, node, run_config, state, 60, os.getpid())
    assert "pseudo_after_reply" not in later["metrics"] and "pseudo_accepted" in later["metrics"]


def test_a_killed_worker_is_replaced_by_the_next_message(cohort: Path, tmp_path: Path, stop_workers) -> None:
    state = tmp_path / "state"
    stop_workers.append(state)
    instruction, node, run_config = _message(cohort, state)
    call("train", instruction, node, run_config, state, 60, os.getpid())
    pid = worker_pid(state)
    os.kill(pid, signal.SIGKILL)
    assert _gone(pid)
    assert socket_path(state).exists()  # left behind by the killed worker: must not be trusted
    reply, started = call("train", instruction, node, run_config, state, 60, os.getpid())
    assert started and worker_pid(state) not in (None, pid) and reply["metrics"]["num-examples"] > 0


def test_the_worker_stops_when_idle_and_when_its_owner_is_gone(cohort: Path, tmp_path: Path, stop_workers) -> None:
    instruction, node, run_config = _message(cohort, tmp_path / "idle")
    stop_workers.extend([tmp_path / "idle", tmp_path / "orphan"])
    call("train", instruction, node, run_config, tmp_path / "idle", idle_s=1.0, owner_pid=os.getpid())
    pid = worker_pid(tmp_path / "idle")
    assert _gone(pid) and not socket_path(tmp_path / "idle").exists()

    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        _, node_b, _ = _message(cohort, tmp_path / "orphan")
        call("train", instruction, node_b, run_config, tmp_path / "orphan", idle_s=600, owner_pid=owner.pid)
        pid = worker_pid(tmp_path / "orphan")
        assert pid is not None and not _gone(pid, timeout_s=1.5)  # the owner lives: it stays
    finally:
        owner.kill()
        owner.wait()
    assert _gone(pid)


def test_a_site_may_refuse_the_worker_and_a_shared_socket_folder_is_refused(tmp_path: Path, monkeypatch) -> None:
    assert worker_wanted({}, True) and not worker_wanted({}, False)
    assert not worker_wanted({"site-worker": "false"}, True) and not worker_wanted({"site-worker": "off"}, True)
    monkeypatch.setattr(worker.tempfile, "gettempdir", lambda: str(tmp_path))
    folder = tmp_path / f"fedglioma-{os.getuid()}"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    with pytest.raises(SiteWorkerError, match="not private"):
        socket_path(tmp_path / "state")
