"""Shared helpers of the experiment tests (a plain module: a second conftest.py would clash)."""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from prunekit.errors import UserError

TINY: dict[str, Any] = {
    "name": "tiny",
    "model": {"name": "small_cnn"},
    "data": {"name": "digits", "batch_size": 64},
    "train": {"epochs": 2, "optimizer": "adamw", "lr": 3.0e-3, "weight_decay": 1.0e-4, "precision": "fp32"},
    "prune": {"method": "oneshot", "target": "weights=0.5"},
    "retrain": {"epochs": 3, "optimizer": "adamw", "lr": 1.0e-3, "lr_plan": "cosine", "precision": "fp32"},
}


def recipe(base: dict[str, Any] = TINY, **sections: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with whole sections replaced (None removes a section)."""
    out = copy.deepcopy(base)
    for key, value in sections.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def write_recipe(path: Path, data: dict[str, Any] | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def _parser() -> argparse.ArgumentParser:
    """prunekit's own parser when it registers the experiment commands, else one with just them."""
    from prunekit.cli import compare_cmd, main, report_cmd, run_cmd, runs_cmd

    parser = main.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "run" in commands.choices:
        return parser
    parser = main.Parser(prog="prunekit")
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (run_cmd, runs_cmd, compare_cmd, report_cmd):
        module.register(commands)
    return parser


def cli(capsys, *args: Any) -> tuple[int, str, str]:
    """Run ``prunekit ARGS`` in this process as prunekit.cli.main.main does: (exit code, stdout, stderr)."""
    argv = [str(a) for a in args]
    try:
        parsed = _parser().parse_args(argv)
        try:
            code = parsed.run(parsed) or 0
        except UserError as exc:
            sys.stderr.write(f"prunekit {parsed.command}: error: {exc}\n")
            code = 2
    except SystemExit as exc:  # argparse's own exit for a malformed argument
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
