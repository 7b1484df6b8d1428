"""``prunekit export``: a saved (compacted) model as ONNX, checked against onnxruntime."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from prunekit.artifact import load_artifact
from prunekit.cli.common import console
from prunekit.export import export_onnx


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("export", help="export a saved model to ONNX (checked against onnxruntime)")
    parser.add_argument("model_dir", type=Path, help="directory with model.json + model.safetensors")
    parser.add_argument("--onnx", type=Path, required=True, help="output .onnx file")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model, spec = load_artifact(args.model_dir)
    example = torch.randn(2, *spec.input_shape)
    path = export_onnx(model, example, args.onnx)  # written only once onnxruntime reproduces PyTorch
    console().print(f"wrote {path} (onnxruntime output checked against PyTorch, atol 1e-4)")
    return 0
