"""The ``fedglioma`` command. Each subcommand lives in its own module that exposes
``add_arguments(parser)`` and ``run(args) -> int``; modules import heavy libraries (torch, flwr)
inside ``run`` so that ``fedglioma --help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

#: subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("synth.cli", "write a synthetic multi-center glioma cohort"),
    "check-site": ("client.check_site", "report which cases of a site folder are usable and why not"),
    "train": ("fedglioma.baselines", "centralized or single-site baseline training"),
    "evaluate": ("fedglioma.evaluate", "score a checkpoint on a site folder (e.g. the held-out center)"),
    "predict": ("fedglioma.predict", "segment and classify new cases with a checkpoint (masks, report.html)"),
    "certs": ("deploy.certs", "create the CA, SuperLink certificate and per-site keys"),
    "demo": ("deploy.demo", "run a real local federation (TLS SuperLink + one SuperNode per site)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedglioma",
        description="Federated multi-center multi-task glioma MRI training on Flower.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def parse_args_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``, accepting Hydra overrides anywhere on the line.

    argparse fills a ``nargs="*"`` positional the first time it meets positionals, so
    ``train DATA --device cuda +experiment=demo`` would reject the override after the option.
    Left-over words that are not options are appended (in order) to ``args.overrides``; a
    left-over option is still an error, as with ``parse_args``.
    """
    args, extra = parser.parse_known_args(argv)
    if not extra:
        return args
    options = [word for word in extra if word.startswith("-")]
    if options or not hasattr(args, "overrides"):
        parser.error(f"unrecognized arguments: {' '.join(options or extra)}")
    args.overrides = [*(args.overrides or []), *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    # `fedglioma check-site DIR | head` should just stop, not print a BrokenPipeError traceback
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = parse_args_with_overrides(build_parser(), argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
