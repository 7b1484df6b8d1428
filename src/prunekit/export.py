"""ONNX export (``torch.onnx`` dynamo exporter), checked against onnxruntime before it lands.

Needs the ``onnx`` extra: ``onnx``, ``onnxscript`` (the exporter) and ``onnxruntime`` (the check).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from prunekit.errors import UserError
from prunekit.io import atomic_path

log = logging.getLogger(__name__)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; every module's training flag restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


class ExportMismatch(RuntimeError):
    """onnxruntime does not compute what the PyTorch model does."""


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | Path, *,
                dynamic_batch: bool = True, check: bool = True, atol: float = 1e-4) -> Path:
    """Write ``model`` (eval mode) as ONNX to ``path``; with ``check``, only after it matches onnxruntime.

    The batch dimension is dynamic unless ``dynamic_batch`` is False. Weights are stored inside
    the file (models up to 2 GB).
    """
    path = Path(path)
    dynamic = ({0: torch.export.Dim.DYNAMIC},) if dynamic_batch else None
    with _eval_mode(model), atomic_path(path) as tmp:
        try:
            torch.onnx.export(model, (example_input,), str(tmp), dynamo=True, external_data=False,
                              verbose=False, input_names=["input"], output_names=["output"],
                              dynamic_shapes=dynamic)
        except ImportError as exc:
            raise UserError(f"export: ONNX export needs onnx and onnxscript ({exc}); "
                            "pip install 'prunekit[onnx]'") from None
        if check:
            check_onnx(tmp, model, example_input, atol=atol)
    log.info("exported ONNX to %s", path)
    return path


def check_onnx(path: str | Path, model: nn.Module, example_input: torch.Tensor, *, atol: float = 1e-4) -> float:
    """Max |onnxruntime - PyTorch| on ``example_input`` (eval mode); raises :class:`ExportMismatch`
    above ``atol`` times the output scale (when that is above 1)."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("export: the ONNX check needs onnxruntime; pip install 'prunekit[onnx]'") from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: example_input.detach().cpu().numpy()})[0]
    with _eval_mode(model), torch.no_grad():
        want = model(example_input).float().cpu()
    got = torch.from_numpy(got).float()
    if got.shape != want.shape:
        raise ExportMismatch(f"onnxruntime output shape {tuple(got.shape)} != PyTorch {tuple(want.shape)}")
    diff = (got - want).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    if not diff <= atol * scale:
        raise ExportMismatch(f"onnxruntime differs from PyTorch by {diff:.3g} > {atol:g} x output scale {scale:.3g}")
    return diff
