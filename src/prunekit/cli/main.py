"""The ``prunekit`` command: one subcommand per module of this package."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from prunekit.device import resolve_device
from prunekit.distributed import init_from_env, shutdown
from prunekit.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage dump) and exits with 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def build_parser() -> Parser:
    from prunekit.cli import (compact_cmd, compare_cmd, demo_cmd, eval_cmd, export_cmd, inspect_cmd, lr_plan_cmd,
                              macs_cmd, prune_cmd, report_cmd, run_cmd, runs_cmd, schedule_cmd, train_cmd)

    parser = Parser(prog="prunekit", description="Prune PyTorch models and measure what you got.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (run_cmd, runs_cmd, compare_cmd, report_cmd, train_cmd, eval_cmd, prune_cmd, compact_cmd,
                   inspect_cmd, export_cmd, macs_cmd, schedule_cmd, lr_plan_cmd, demo_cmd):
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    previous = signal.signal(signal.SIGTERM, _interrupt)  # torchrun stops the other ranks with SIGTERM
    try:
        init_from_env(resolve_device(getattr(args, "device", "auto")))
        return args.run(args) or 0
    except UserError as exc:
        sys.stderr.write(f"prunekit {args.command}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutdown()


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM as a KeyboardInterrupt: a run records itself as interrupted (resumable) before exiting."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
