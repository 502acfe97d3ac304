"""Integration-test guard: no Flower process a test started may outlive its test module."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.certs import Credentials
from deploy.federation import LocalFederation, command_line, descendant_processes, proc_stat, runs_program

#: executables of Flower's deployment engine (SuperLink/SuperNode, their SuperExec, the apps) and the proxy
FLOWER_PROCESS_NAMES = (
    "flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp", "flwr-clientapp", "flwr",
    "nginx",  # the reverse-proxy test starts one
)


def flower_processes(pids: dict[int, int] | list[int]) -> dict[int, str]:
    """``{pid: command line}`` of the live Flower processes among ``pids``."""
    found: dict[int, str] = {}
    for pid in pids:
        stat = proc_stat(pid)
        argv = command_line(pid)
        if stat is not None and stat[0] != "Z" and runs_program(argv, *FLOWER_PROCESS_NAMES):
            found[pid] = " ".join(argv)
    return found


def wait_until_gone(pids: dict[int, int] | list[int], timeout_s: float = 10.0) -> dict[int, str]:
    """The Flower processes among ``pids`` still alive after ``timeout_s`` (empty when all exited)."""
    deadline = time.monotonic() + timeout_s
    while (alive := flower_processes(pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


@pytest.fixture(scope="module", autouse=True)
def no_flower_process_left_behind() -> Iterator[None]:
    """After each integration module, no Flower process may remain among this pytest's descendants."""
    yield
    left = wait_until_gone(list(descendant_processes(os.getpid())))
    assert not left, f"Flower processes outlived their test module: {left}"


@pytest.fixture
def federation_factory() -> Iterator[Callable[..., LocalFederation]]:
    """``make(workdir, credentials, **kwargs)`` -> a :class:`LocalFederation` that is stopped at the
    end of the test whatever happened (a failed assertion, a timeout), then checked: no process it
    started, directly or through Flower, may be left. The check finds them by the federation's
    environment tag, so it also catches processes re-parented to init (a killed SuperNode's
    SuperExec and ClientApp), which a walk of this process's descendants misses."""
    made: list[LocalFederation] = []

    def make(workdir: Path, credentials: Credentials, **kwargs: Any) -> LocalFederation:
        federation = LocalFederation(workdir, credentials, **kwargs)
        made.append(federation)
        return federation

    yield make
    for federation in made:
        federation.stop()
    left = [pid for federation in made for pid in federation.leftover_processes()]
    assert not left, f"processes outlived their federation's stop(): {left} {flower_processes(left)}"
