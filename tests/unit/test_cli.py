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
