"""``LocalFederation.wait`` asks the SuperLink for a run's status (a ``flwr ls`` process, ~2 s of a
core) only when the answer can have changed: before the ServerApp starts, after it exited, and
every STATUS_REFRESH_S while it runs; the cheap polls in between read /proc only."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

import deploy.federation as launcher
from deploy.certs import ensure_credentials
from deploy.federation import LocalFederation


@pytest.fixture
def fed(tmp_path: Path):
    federation = LocalFederation(tmp_path / "work", ensure_credentials(tmp_path / "certs", []), verify_apps=False)
    yield federation
    federation.stop()
    assert not federation.leftover_processes()


def test_the_status_is_asked_before_the_serverapp_starts_and_after_it_exits_not_while_it_runs(
    fed: LocalFederation, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a ServerApp for 12 polls, after 3 polls without one (the run is pending), then none again
    alive = iter([[]] * 3 + [[4242]] * 12 + [[]] * 100)
    statuses = iter(["pending", "pending", "running", "finished:completed"])
    asked: list[int] = []
    polls: list[str] = []
    monkeypatch.setattr(fed, "serverapp_pids", lambda: next(alive))
    monkeypatch.setattr(fed, "status", lambda run_id: asked.append(len(polls)) or next(statuses))
    assert fed.wait(7, timeout_s=30, poll_s=0.01, on_poll=polls.append) == "finished:completed"
    # asked at the 3 polls before the ServerApp, not during its 12 polls (the last answer stands),
    # then at the first poll without it
    assert asked == [0, 1, 2, 15], asked
    assert polls[:3] == ["pending", "pending", "running"] and polls[15:] == ["finished:completed"]
    assert all(p == "running" for p in polls[3:15])


def test_a_long_running_serverapp_still_gets_its_status_refreshed(fed: LocalFederation, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher, "STATUS_REFRESH_S", 0.05)
    monkeypatch.setattr(fed, "serverapp_pids", lambda: [4242])  # e.g. another run's ServerApp lives on
    answers = iter(["running"] * 3 + ["finished:stopped"])
    asked: list[float] = []
    monkeypatch.setattr(fed, "status", lambda run_id: asked.append(time.monotonic()) or next(answers))
    assert fed.wait(7, timeout_s=30, poll_s=0.01) == "finished:stopped"
    assert len(asked) == 4 and all(b - a >= 0.05 for a, b in zip(asked, asked[1:])), asked


def test_serverapp_pids_finds_the_superlinks_serverapp_by_its_program_name(fed: LocalFederation, tmp_path: Path) -> None:
    assert fed.serverapp_pids() == []  # no SuperLink yet
    # a stand-in SuperLink whose child runs under the program name flwr-serverapp, as Flower's does
    fed.superlink = fed.spawn("superlink", ["bash", "-c", "exec -a flwr-serverapp sleep 30 & sleep 30"], tmp_path)
    deadline = time.monotonic() + 10
    while not (found := fed.serverapp_pids()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(found) == 1 and found[0] != fed.superlink.popen.pid
    assert launcher.command_line(found[0])[0] == "flwr-serverapp"
    assert launcher.command_line(fed.superlink.popen.pid)[0] == "bash"
    assert launcher.command_line(2**22 + 1) == []  # no such process
    assert sys.platform != "linux" or fed.superlink.members()
