"""The ``fedglioma`` command line: Hydra overrides may stand anywhere after the subcommand."""

from __future__ import annotations

import pytest

from fedglioma.cli import build_parser, parse_args_with_overrides


def test_overrides_after_options_are_kept_in_order() -> None:
    argv = ["train", "--mode", "centralized", "DATA", "+experiment=demo", "--device", "cpu", "federation.rounds=2"]
    args = parse_args_with_overrides(build_parser(), argv)
    assert str(args.data) == "DATA"
    assert args.device == "cpu"
    assert args.overrides == ["+experiment=demo", "federation.rounds=2"]


def test_overrides_only_after_options() -> None:
    args = parse_args_with_overrides(build_parser(), ["train", "--mode", "local", "--site", "a", "DATA", "--out", "o", "x=1"])
    assert (args.site, str(args.out), args.overrides) == ("a", "o", ["x=1"])


@pytest.mark.parametrize(
    "argv, bad",
    [
        (["train", "--mode", "centralized", "DATA", "--no-such-flag", "x=1"], "--no-such-flag"),
        (["synth", "OUT", "stray-word"], "stray-word"),  # synth takes no overrides
    ],
)
def test_unknown_options_and_stray_words_are_still_errors(argv, bad, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args_with_overrides(build_parser(), argv)
    assert exc.value.code == 2
    assert f"unrecognized arguments: {bad}" in capsys.readouterr().err


def test_demo_progress_names_sites_that_sat_a_round_out(tmp_path, capsys) -> None:
    import json  # only this test reads a metrics file

    from deploy.demo import _progress_printer  # the launcher's module; the other tests need only the parser

    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"rounds": [{
        "round": 1, "stage": "pretrain_imputer", "heldout": {"dice_wt": 0.25},
        "train": {"site-a": {"loss_impute": 1.5, "num-examples": 24.0, "seconds": 27.54},
                  "site-b": {"num-examples": 0.0}},
    }]}))
    _progress_printer(metrics, 6)("RUNNING")
    out = capsys.readouterr().out
    assert "round 1/6 (pretrain_imputer) held-out: dice_wt=0.250" in out
    assert "site-a: loss=1.500 cases=24 time=27.540 s" in out
    assert "site-b: no training this round" in out
    assert "(no complete case to pre-train the imputer on: site-b)" in out
    assert "n/as" not in out
