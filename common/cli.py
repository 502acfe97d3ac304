"""The ``fedglioma`` command. Each subcommand lives in its own module that exposes
``add_arguments(parser)`` and ``run(args) -> int``; modules import heavy libraries (torch, flwr)
inside ``run`` so that ``fedglioma --help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("common.synth.cli", "write a synthetic multi-center glioma cohort"),
    "check-site": ("common.site_check", "report which cases of a site folder are usable and why not"),
    "train": ("common.baselines", "centralized or single-site baseline training"),
    "evaluate": ("common.evaluate_cli", "score a checkpoint on a site folder (e.g. the held-out center)"),
    "certs": ("common.certs", "create the CA, SuperLink certificate and per-site keys"),
    "demo": ("common.demo", "run a real local federation (TLS SuperLink + one SuperNode per site)"),
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


def main(argv: list[str] | None = None) -> int:
    import signal

    # `fedglioma check-site DIR | head` should just stop, not print a BrokenPipeError traceback
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
