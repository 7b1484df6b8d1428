"""``prunekit train``: train a model from scratch with the fast loop, checkpointing each epoch."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from prunekit.artifact import ModelSpec, save_artifact
from prunekit.cli.common import add_data_arguments, add_device_argument, console, key_value_table
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
    parser.add_argument("--model", required=True, help="registered model name, or tv:<torchvision name>")
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
    parser.add_argument("--out", type=Path, default=None, help="run directory (default runs/MODEL-DATA-sSEED)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = TrainConfig(epochs=args.epochs, optimizer=args.optimizer, lr=args.lr, lr_plan=args.lr_plan,
                         weight_decay=args.weight_decay, momentum=args.momentum,
                         label_smoothing=args.label_smoothing, precision=args.precision,
                         channels_last={"auto": None, "on": True, "off": False}[args.channels_last], seed=args.seed)
    out = args.out or Path("runs") / f"{args.model.replace(':', '_')}-{args.data}-s{args.seed}"
    has_checkpoint = (out / CHECKPOINT_NAME).exists()
    if has_checkpoint and not args.resume:
        raise UserError(f"--out: {str(out)!r} already holds a run; pass --resume to continue it or choose another --out")
    if args.resume and not has_checkpoint:
        raise UserError(f"--resume: {str(out)!r} has no checkpoint to resume from")

    data = build_data(args.data, data_dir=args.data_dir, batch_size=args.batch_size, seed=args.seed,
                      subset=args.subset)
    torch.manual_seed(args.seed)
    model = build_model(args.model, num_classes=data.num_classes, in_channels=data.input_shape[0])
    write_json(out / "train_config.json", {"model": args.model, "data": args.data, "batch_size": args.batch_size,
                                          "subset": args.subset, **config.to_dict()})
    out_console = console()
    trainer = Trainer(model, data.train, data.test, config, hooks=[ProgressHook(out_console)],
                      run_dir=out, device=args.device)
    out_console.print(f"training {args.model} on {args.data} for {config.epochs} epochs "
                      f"({trainer.device}, {trainer.precision}{', channels_last' if trainer.channels_last else ''})"
                      f" -> {out}")
    result = trainer.fit(resume=args.resume)
    spec = ModelSpec(model=args.model, num_classes=data.num_classes, in_channels=data.input_shape[0],
                     input_shape=data.input_shape, data=args.data)
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
