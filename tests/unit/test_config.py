"""Config flows one way: Hydra -> frozen dataclass -> flat run-config -> the same dataclass."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.config import (
    ConfigError,
    ExperimentConfig,
    compose,
    from_mapping,
    from_run_config,
    replace,
    to_run_config,
)

ROOT = Path(__file__).resolve().parents[2]


def test_compose_presets_and_overrides() -> None:
    tiny = compose()
    demo = compose(["+experiment=demo", "federation.rounds=7"])
    assert tiny.model.preset == "tiny" and tiny.data.size == 32
    assert demo.model.preset == "demo" and demo.federation.rounds == 7
    assert compose(["model=paper"]).model.d_model == 512


def test_run_config_round_trip_is_identity() -> None:
    cfg = compose(["+experiment=demo", "train.lr=0.01", "model.fusion=experts"])
    flat = to_run_config(cfg)
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert from_run_config(flat) == cfg
    # Flower may add keys of its own; they are ignored
    assert from_run_config({**flat, "num-server-rounds": 3}) == cfg


def test_pyproject_run_config_matches_dataclass_defaults() -> None:
    """Flower rejects run-config keys the app does not declare: pyproject must list them all."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    flat = {f"{s}.{k}": v for s, section in declared.items() for k, v in section.items()}
    assert flat == to_run_config(ExperimentConfig())


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"modle": {}}, "did you mean 'model'"),
        ({"train": {"lrr": 0.1}}, "did you mean 'lr'"),
        ({"train": {"lr": "fast"}}, "train.lr must be a number"),
        ({"model": {"fusion": "expert"}}, "did you mean 'experts'"),
        ({"data": {"size": 30}}, "multiple of 8"),
    ],
)
def test_bad_values_fail_with_actionable_messages(mapping: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_mapping(mapping)


def test_replace_returns_new_frozen_config() -> None:
    cfg = compose()
    changed = replace(cfg, train={"lr": 0.5})
    assert changed.train.lr == 0.5 and cfg.train.lr != 0.5
    with pytest.raises(Exception):
        changed.train.lr = 1.0  # type: ignore[misc]
