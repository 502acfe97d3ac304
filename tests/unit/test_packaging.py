"""The installed package is complete: a wheel carries the config tree and composes without the
source tree (no editable install), and the Flower app bundle holds only what the apps import."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The working tree as git sees it (tracked and new files; ignored ones such as .venv left
    out), copied so that building leaves nothing behind in the checkout."""
    tree = tmp_path_factory.mktemp("source") / "fedglioma"
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=True).stdout.split("\n")
    for path in filter(None, listed):
        if (ROOT / path).is_file():
            (tree / path).parent.mkdir(parents=True, exist_ok=True)
            (tree / path).write_bytes((ROOT / path).read_bytes())
    return tree


@pytest.fixture(scope="module")
def wheel(source: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: build with this environment's setuptools (no download)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (path,) = out.glob("fedglioma-*.whl")
    return path


def test_the_wheel_ships_every_config_and_every_room(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "common/configs").rglob("*.yaml")}
    assert configs and configs <= names, sorted(configs - names)
    for module in ("common/config.py", "common/model/network.py", "server/app.py", "client/app.py",
                   "deploy/federation.py", "deploy/start-superlink.sh", "synth/cohort.py", "fedglioma/cli.py"):
        assert module in names
    assert not any(n.startswith("tests/") for n in names)


def test_a_config_composes_from_the_built_wheel_alone(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    zipfile.ZipFile(wheel).extractall(site)
    # A fresh interpreter that sees the wheel's files, not the source tree: the editable finder
    # of this checkout is removed and the repository root is kept off sys.path.
    code = f"""
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
sys.path[:] = [{str(site)!r}] + [p for p in sys.path if p not in ("", {str(ROOT)!r})]
import common.config as config
assert config.__file__.startswith({str(site)!r}), config.__file__
cfg = config.compose(["+experiment=tiny"])
print(cfg.model.preset, cfg.data.size)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["tiny", "32"]


def test_the_app_bundle_holds_only_what_the_apps_import(source: Path, tmp_path: Path) -> None:
    flwr = Path(sys.executable).parent / "flwr"
    app = source
    done = subprocess.run([str(flwr), "build", "--app", str(app)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    (fab,) = tmp_path.glob("*.fab")
    rooms = {n.split("/")[0] for n in zipfile.ZipFile(fab).namelist() if "/" in n}
    assert rooms <= {"common", "server", "client", ".info"}, rooms
    assert {"common", "server", "client"} <= rooms
    names = zipfile.ZipFile(fab).namelist()
    assert not any(n.startswith("common/configs/") for n in names)
