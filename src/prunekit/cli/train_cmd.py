"""``prunekit train``: train a model from scratch with the fast loop, checkpointing each epoch.

The run's settings are recorded in ``OUT/train_config.json``; ``--resume`` continues with them
and refuses a flag that contradicts them, except a longer ``--epochs`` with ``--extend`` (recorded).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from prunekit.artifact import ModelSpec, save_artifact
from prunekit.cli.common import (add_data_arguments, add_device_argument, add_launch_arguments, console,
                                 key_value_table, launch_line)
from prunekit.cli.parsing import non_negative_int, positive_float, positive_int
from prunekit.cli.progress import ProgressHook
from prunekit.data import build_data
from prunekit.errors import UserError
from prunekit.io import write_json
from prunekit.models import build_model
from prunekit.train import TrainConfig, Trainer
from prunekit.train.config import OPTIMIZERS
from prunekit.train.lr_plans import LR_PLANS, RETRAINING_PLANS
from prunekit.train.trainer import CHECKPOINT_NAME


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train", help="train a model and save it with its metrics")
    parser.add_argument("--model", default=None, help="registered model name, or tv:<torchvision name> "
                                                      "(required unless --resume)")
    add_data_arguments(parser)
    defaults = TrainConfig()
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=positive_int, default=defaults.epochs)
    group.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer)
    group.add_argument("--lr", type=positive_float, default=defaults.lr, help="peak learning rate")
    group.add_argument("--lr-plan", choices=[n for n in LR_PLANS.names() if n not in RETRAINING_PLANS],
                       default=defaults.lr_plan, help="LR plan of the run (retraining plans: prunekit lr-plan)")
    group.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    group.add_argument("--momentum", type=float, default=defaults.momentum)
    group.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing)
    group.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=defaults.precision,
                       help="auto = bf16 autocast where it is fast (AVX-512/AMX CPUs, recent GPUs)")
    group.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                       help="memory format; auto = on with bf16 or CUDA, off for fp32 on a CPU")
    group.add_argument("--seed", type=non_negative_int, default=0)
    add_device_argument(parser)
    add_launch_arguments(parser)
    parser.add_argument("--out", type=Path, default=None, help="run directory (default runs/MODEL-DATA-sSEED)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint, with its recorded settings")
    parser.add_argument("--extend", action="store_true",
                        help="with --resume: train to a larger --epochs (the LR plan is rebuilt for the new total)")
    defaults = {key: parser.get_default(key) for key in RECORDED} | {"scale_lr": "none", "sync_batchnorm": False}
    parser.set_defaults(run=run, flag_defaults=defaults, **dict.fromkeys(RECORDED, UNSET))


UNSET = argparse.Namespace()
"""The value of a recorded flag the user did not give (so that giving its default is seen too)."""


RECORDED = ("model", "data", "batch_size", "subset", "epochs", "optimizer", "lr", "lr_plan", "weight_decay",
            "momentum", "label_smoothing", "precision", "channels_last", "seed", "scale_lr", "sync_batchnorm")
"""The flags a run records in train_config.json (argparse names; channels_last as auto/on/off)."""
RECORD = "train_config.json"
CHANNELS_LAST = {"auto": None, "on": True, "off": False}


def settings(args: argparse.Namespace, recorded: dict | None) -> dict:
    """The run's settings: the flags, or on resume the record, checked against the flags given."""
    given = {key: getattr(args, key) for key in RECORDED if getattr(args, key) is not UNSET}
    flags = {key: given.get(key, args.flag_defaults[key]) for key in RECORDED}
    if recorded is None:
        if flags["model"] is None:
            raise UserError("--model: required (a registered model name, or tv:<torchvision name>)")
        return flags
    out = {key: recorded.get(key, flags[key]) for key in RECORDED}
    for key, value in given.items():
        if value == out[key]:
            continue
        if key == "epochs" and args.extend and value > out[key]:
            out["extended_from"] = out[key]
            out[key] = value
            continue
        hint = " (add --extend to train longer)" if key == "epochs" and value > out[key] else ""
        raise UserError(f"--{key.replace('_', '-')}: {value!r} contradicts the run's recorded {out[key]!r}; "
                        f"--resume continues the recorded settings{hint}")
    if args.extend and "extended_from" not in out:
        raise UserError("--extend: give a --epochs larger than the run's recorded "
                        f"{out['epochs']} to train longer")
    return out


def read_record(out: Path) -> dict:
    try:
        record = json.loads((out / RECORD).read_text())
    except (OSError, ValueError):
        raise UserError(f"--resume: {str(out / RECORD)!r} is missing or unreadable; it records the run's "
                        "settings") from None
    # records before this one kept TrainConfig's channels_last (None/True/False)
    record["channels_last"] = {v: k for k, v in CHANNELS_LAST.items()}.get(record.get("channels_last"),
                                                                           record.get("channels_last"))
    return record


def run(args: argparse.Namespace) -> int:
    if args.extend and not args.resume:
        raise UserError("--extend: only with --resume (it lengthens a recorded run)")
    if args.resume and args.out is None:
        raise UserError("--resume: give the run directory with --out")
    flags = {key: args.flag_defaults[key] if getattr(args, key) is UNSET else getattr(args, key) for key in RECORDED}
    if args.out is None and flags["model"] is None:
        raise UserError("--model: required (a registered model name, or tv:<torchvision name>)")
    out = args.out or Path("runs") / f"{flags['model'].replace(':', '_')}-{flags['data']}-s{flags['seed']}"
    has_checkpoint = (out / CHECKPOINT_NAME).exists()
    if has_checkpoint and not args.resume:
        raise UserError(f"--out: {str(out)!r} already holds a run; pass --resume to continue it or choose another --out")
    if args.resume and not has_checkpoint:
        raise UserError(f"--resume: {str(out)!r} has no checkpoint to resume from")
    run_settings = settings(args, read_record(out) if args.resume else None)
    s = argparse.Namespace(**run_settings)
    config = TrainConfig(epochs=s.epochs, optimizer=s.optimizer, lr=s.lr, lr_plan=s.lr_plan,
                         weight_decay=s.weight_decay, momentum=s.momentum, label_smoothing=s.label_smoothing,
                         precision=s.precision, channels_last=CHANNELS_LAST[s.channels_last], seed=s.seed,
                         scale_lr=s.scale_lr, sync_batchnorm=s.sync_batchnorm)

    data = build_data(s.data, data_dir=args.data_dir, batch_size=s.batch_size, seed=s.seed, subset=s.subset)
    torch.manual_seed(s.seed)
    model = build_model(s.model, num_classes=data.num_classes, in_channels=data.input_shape[0])
    if not args.resume or args.extend:
        write_json(out / RECORD, {**run_settings, "trainer": config.to_dict()})
    out_console = console()
    trainer = Trainer(model, data.train, data.test, config, hooks=[ProgressHook(out_console)],
                      run_dir=out, device=args.device)
    out_console.print(f"training {s.model} on {s.data} for {config.epochs} epochs "
                      f"({trainer.device}, {trainer.precision}{', channels_last' if trainer.channels_last else ''})"
                      f" -> {out}")
    if (line := launch_line(s.batch_size, vars(s))) is not None:
        out_console.print(line)
    result = trainer.fit(resume=args.resume)
    spec = ModelSpec(model=s.model, num_classes=data.num_classes, in_channels=data.input_shape[0],
                     input_shape=data.input_shape, data=s.data)
    save_artifact(trainer.model, spec, out)
    summary = result.summary()
    write_json(out / "result.json", summary)
    out_console.print(key_value_table("result", [
        ("final test accuracy", f"{summary['final_test_acc']:.4f}"),
        ("best test accuracy (optimistic)", f"{summary['best_test_acc_optimistic']:.4f} (epoch {summary['best_epoch']})"),
        ("epochs", str(summary["epochs"])),
        ("wall time (training + eval)", f"{summary['wall_time_s']:.0f} s"),
        ("model", str(out / "model.safetensors")),
    ]))
    return 0
