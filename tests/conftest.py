"""Shared fixtures: tiny synthetic sites written into tmp_path (see tests/helpers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# `from tests.helpers import write_case` must work however pytest is started (`pytest`,
# `python -m pytest`, from another folder): put the repository root on the import path.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.helpers import write_site  # noqa: E402


@pytest.fixture
def site_dir(tmp_path: Path) -> Path:
    """A valid six-case 16^3 site (``tests.helpers.SITE_CASES``) at ``tmp_path/site-a``."""
    return write_site(tmp_path / "site-a")


@pytest.fixture(autouse=True)
def _site_state_in_tmp(tmp_path_factory, monkeypatch) -> None:
    """Sites without a state-path keep their state under $XDG_CACHE_HOME: never the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``long`` first (stable sort: the rest keep their order). Under ``make test``'s
    ``pytest -n 2`` the two workers then start them at once, and their minutes of waiting on Flower
    (heartbeat lapses, restarts) overlap each other and the short tests, instead of ending the run
    one after another."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
