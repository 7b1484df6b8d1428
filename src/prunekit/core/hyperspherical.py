"""Hyperspherical layers (METHODS §1.3.1): unit-norm conv filters, optional cosine operator.

* :class:`HSConv2d` keeps the raw weight ``w`` as its parameter and convolves with
  ``ŵ_f = w_f / max(‖w_f‖₂, 1e-12)``, the norm taken per output filter over
  ``(C_in/groups, k_h, k_w)`` (a depthwise filter: its k×k kernel). It has no bias.
  ``normalize_input=True`` makes it SphereNet's cosine operator: each output position is also
  divided by ``max(‖x_p‖₂, input_eps)``, ``x_p`` the receptive-field patch of the filter's group
  of input channels (:func:`patch_norm`).
* :class:`InputNormConv2d` is a plain conv with that input normalisation: what an HSConv2d
  with ``normalize_input`` becomes once baked.
* :func:`effective_weight`: ŵ of an HSConv2d, the row-normalised weight of an ``nn.Linear``
  (the classifier keeps its plain forward; it is only *measured* normalised).

Two registered model transforms (:mod:`prunekit.core.transforms`), so a converted or baked
model saves and reloads as such:

``"hyperspherical"`` swaps every selected ``nn.Conv2d`` for an HSConv2d holding the same raw
weight. A conv's output becomes ``y_f / n_f`` with ``n_f = max(‖w_f‖, 1e-12)``. What is kept,
for a conv whose output goes straight into a BatchNorm (found with one probe forward pass):

* **eval mode: exactly** (up to float rounding): that BN's running statistics are rescaled,
  ``μ ← (μ − b)/n_f`` and ``σ² ← (σ² + ε)/n_f² − ε``, so ``(y/n − μ')/√(σ'² + ε)`` equals
  ``(y + b − μ)/√(σ² + ε)``. Where ``σ² + ε < n_f² ε`` (a near-constant channel, σ² would go
  negative) σ'² is clamped at 0 and that channel is not exact (logged as a warning).
* **train mode: up to BN's ε**: with batch statistics the output is
  ``(y − μ_B)/√(σ_B² + n_f² ε)`` instead of ``(y − μ_B)/√(σ_B² + ε)`` (ε cannot be set per
  channel); relative change ≈ (n_f² − 1)·ε / (2 σ_B²).
* **conv bias**: folded into the BN (exact: batch statistics subtract it; the running mean is
  shifted by it). A conv with a bias and no BN right after it is refused (no bias on HS layers).
* **not kept**: convs with no BN right after them (the output is scaled by 1/n_f; refused
  unless ``require_bn=False``), and every conv with ``normalize_input=True`` (the output is
  divided by the patch norm): recalibrate BN (:func:`recalibrate_bn`) and/or train.

``"bake_hyperspherical"`` replaces every HSConv2d by an ``nn.Conv2d`` whose weight is ŵ (an
:class:`InputNormConv2d` where the input was normalised): the same function, now a plain model
whose entries can be zeroed without the remaining ones being renormalised (§1.3.5).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.importance import following_batchnorms
from prunekit.core.sparsifier import select_layers
from prunekit.core.transforms import register_transform
from prunekit.errors import UserError

log = logging.getLogger(__name__)

WEIGHT_EPS = 1e-12
"""Floor of a filter's norm: an all-zero filter stays zero instead of dividing by 0."""
INPUT_EPS = 1e-6
"""Default floor of a patch norm (an all-zero patch gives output 0)."""


def unit_rows(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with each slice along dim 0 (a filter, a Linear row) divided by max(its L2 norm, 1e-12)."""
    norms = weight.flatten(1).norm(dim=1).clamp_min(WEIGHT_EPS)
    return weight / norms.view(-1, *[1] * (weight.dim() - 1))


def patch_norm(conv: nn.Conv2d, x: torch.Tensor, eps: float) -> torch.Tensor:
    """max(‖x_p‖₂, eps) per output position and group of ``conv``, shaped ``(N, groups, H', W')``.

    ``Σ_c x_c²`` over each group's input channels, box-filtered with an all-ones k×k kernel at
    the conv's stride, padding (mode included) and dilation.
    """
    groups = conv.groups
    squares = x.square().reshape(*x.shape[:-3], groups, x.shape[-3] // groups, *x.shape[-2:]).sum(-3)
    ones = squares.new_ones(groups, 1, *conv.kernel_size)
    padding: Any = conv.padding
    if conv.padding_mode != "zeros":
        squares = F.pad(squares, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    sums = F.conv2d(squares, ones, None, conv.stride, padding, conv.dilation, groups)
    return sums.clamp_min(eps * eps).sqrt()


def _divide_by_patch_norm(conv: nn.Conv2d, x: torch.Tensor, out: torch.Tensor, eps: float) -> torch.Tensor:
    norm = patch_norm(conv, x, eps)
    groups = conv.groups
    grouped = out.reshape(*out.shape[:-3], groups, out.shape[-3] // groups, *out.shape[-2:])
    return (grouped / norm.unsqueeze(-3)).reshape(out.shape)


class HSConv2d(nn.Conv2d):
    """Conv with unit-norm filters ŵ = w / max(‖w_f‖, 1e-12); no bias; optional cosine operator."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, padding_mode: str = "zeros", *,
                 normalize_input: bool = False, input_eps: float = INPUT_EPS,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias=False, padding_mode=padding_mode, device=device, dtype=dtype)
        self.normalize_input = normalize_input
        self.input_eps = input_eps

    def unit_weight(self) -> torch.Tensor:
        """ŵ, differentiable with respect to the raw weight."""
        return unit_rows(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._conv_forward(x, self.unit_weight(), None)
        return _divide_by_patch_norm(self, x, out, self.input_eps) if self.normalize_input else out

    def extra_repr(self) -> str:
        extra = f", normalize_input=True, input_eps={self.input_eps:g}" if self.normalize_input else ""
        return super().extra_repr() + extra


class InputNormConv2d(nn.Conv2d):
    """A plain conv whose output at each position is divided by max(‖x_p‖₂, eps) (baked cosine operator)."""

    def __init__(self, *args: Any, input_eps: float = INPUT_EPS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.input_eps = input_eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _divide_by_patch_norm(self, x, super().forward(x), self.input_eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", input_eps={self.input_eps:g}"


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """ŵ of an HSConv2d; the row-normalised weight of an ``nn.Linear`` (its forward is unchanged)."""
    if isinstance(layer, HSConv2d):
        return layer.unit_weight()
    if isinstance(layer, nn.Linear):
        return unit_rows(layer.weight)
    raise UserError(f"layers: expected a hyperspherical conv or a Linear layer, got {type(layer).__name__} "
                    "(apply the 'hyperspherical' transform first)")


# --------------------------------------------------------------------------- transforms
def _conv_like(cls: type[nn.Conv2d], conv: nn.Conv2d, weight: torch.Tensor, **kwargs: Any) -> nn.Conv2d:
    """A ``cls`` with ``conv``'s geometry (no bias), device and dtype, holding ``weight``."""
    new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
              conv.groups, padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
              **kwargs)
    with torch.no_grad():
        new.weight.copy_(weight)
    new.weight.requires_grad_(conv.weight.requires_grad)
    new.train(conv.training)
    return new


def _swap(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``name`` in ``root``; returns the root (``new`` itself when ``name`` is '')."""
    if not name:
        return new
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent), leaf, new)
    return root


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{name}: expected true or false, got {value!r}")
    return value


def _rescale_statistics(bn: nn.modules.batchnorm._BatchNorm, norms: torch.Tensor, bias: torch.Tensor | None,
                        name: str) -> None:
    """Running statistics of the BN after a conv whose output is now (y + b)/n, so eval outputs stay."""
    if bn.running_mean is None or bn.running_var is None:
        return
    with torch.no_grad():
        norms = norms.to(bn.running_mean.dtype)
        mean = bn.running_mean - (bias.to(bn.running_mean.dtype) if bias is not None else 0)
        var = (bn.running_var + bn.eps) / norms.square() - bn.eps
        clamped = int((var < 0).sum())
        bn.running_mean.copy_(mean / norms)
        bn.running_var.copy_(var.clamp_min(0))
    if clamped:
        log.warning("hyperspherical: %s: %d near-constant channel(s) cannot keep their eval output exactly "
                    "(running_var clamped at 0)", name, clamped)


@register_transform("hyperspherical")
def to_hyperspherical(model: nn.Module, normalize_input: bool = False, first_conv: bool = True,
                      layers: str | Sequence[str] = "*", input_eps: float = INPUT_EPS, require_bn: bool = True,
                      input_size: int = 32) -> nn.Module:
    """Swap every ``nn.Conv2d`` matching ``layers`` (globs, ``!`` excludes) for an HSConv2d.

    ``first_conv=False`` leaves the first conv plain. ``require_bn=False`` converts convs with no
    BatchNorm right after them too (their function changes). ``input_size`` is the side of the
    zero image of the probe pass that finds each conv's BatchNorm. See the module doc for what
    the conversion preserves.
    """
    normalize_input = _flag("normalize_input", normalize_input)
    first_conv, require_bn = _flag("first_conv", first_conv), _flag("require_bn", require_bn)
    if isinstance(input_eps, bool) or not isinstance(input_eps, (int, float)) or not input_eps > 0:
        raise UserError(f"input_eps: expected a number > 0, got {input_eps!r}")
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise UserError(f"input_size: expected the probe image side as an integer >= 1, got {input_size!r}")
    convs = {name: m for name, m in select_layers(model, layers, (nn.Conv2d,), include_first_conv=first_conv,
                                                   include_classifier=True).items() if type(m) is nn.Conv2d}
    if not convs:
        raise UserError(f"layers: no plain nn.Conv2d matches {layers!r}")
    for name, conv in convs.items():
        if conv._buffers or hasattr(conv, "weight_orig"):
            raise UserError(f"layers: {name!r} carries buffers or pruning masks; convert before pruning")
    followers = _probe_followers(model, convs, input_size)
    biased = [name for name, conv in convs.items() if conv.bias is not None and name not in followers]
    if biased:
        raise UserError(f"layers: conv bias can only be folded into a BatchNorm right after the conv; "
                        f"{', '.join(biased)} has none (exclude it: layers ['*', '!{biased[0]}'])")
    alone = [name for name in convs if name not in followers]
    if alone and require_bn:
        raise UserError(f"require_bn: no BatchNorm right after {', '.join(alone)}, so converting changes the "
                        "model's function; exclude them in layers or set require_bn to false")
    for name, conv in convs.items():
        if name in followers:
            norms = conv.weight.detach().flatten(1).norm(dim=1).clamp_min(WEIGHT_EPS)
            _rescale_statistics(followers[name], norms, None if conv.bias is None else conv.bias.detach(), name)
        model = _swap(model, name, _conv_like(HSConv2d, conv, conv.weight.detach(), normalize_input=normalize_input,
                                              input_eps=float(input_eps)))
    if alone:
        log.warning("hyperspherical: no BatchNorm after %s; their outputs are now scaled by 1/‖w_f‖",
                    ", ".join(alone))
    log.info("hyperspherical: %d conv(s) converted, normalize_input=%s", len(convs), normalize_input)
    return model


def _probe_followers(model: nn.Module, convs: dict[str, nn.Conv2d], input_size: int) -> dict[str, nn.Module]:
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    probe = first.weight.new_zeros(1, first.in_channels, input_size, input_size)
    try:
        return following_batchnorms(model, convs, probe)
    except RuntimeError as exc:
        raise UserError(f"input_size: the probe pass on a {input_size}x{input_size} image failed "
                        f"({str(exc).splitlines()[0]}); give the model's input side") from None


@register_transform("bake_hyperspherical")
def bake_hyperspherical(model: nn.Module) -> nn.Module:
    """Replace every HSConv2d by a plain conv with weight ŵ (an InputNormConv2d if it normalised its input)."""
    baked = [(name, m) for name, m in model.named_modules() if isinstance(m, HSConv2d)]
    if not baked:
        raise UserError("model: no hyperspherical conv to bake (apply the 'hyperspherical' transform first)")
    for name, conv in baked:
        weight = conv.unit_weight().detach()
        if conv.normalize_input:
            new = _conv_like(InputNormConv2d, conv, weight, bias=False, input_eps=conv.input_eps)
        else:
            new = _conv_like(nn.Conv2d, conv, weight, bias=False)
        model = _swap(model, name, new)
    log.info("bake_hyperspherical: %d conv(s) baked", len(baked))
    return model


# ------------------------------------------------------------------- BN recalibration
def recalibrate_bn(model: nn.Module, batches: Iterable[Any], num_batches: int) -> int:
    """Recompute every BatchNorm's running statistics from up to ``num_batches`` batches.

    Statistics are reset, then averaged with equal weight over the batches (``momentum=None``),
    with the BatchNorms in train mode and every other module in eval mode (dropout off: the
    statistics are those of the eval-time activations), without gradients. A batch is a tensor
    or a sequence whose first item is the input; it is moved to the model's device. Training
    flags and momenta are restored. Returns the number of batches used.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise UserError(f"num_batches: expected an integer >= 1, got {num_batches!r}")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        log.warning("recalibrate_bn: the model has no BatchNorm with running statistics; nothing to do")
        return 0
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise UserError("batches: expected at least one batch to recalibrate BatchNorm on, got none")
    device = next(model.parameters()).device
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    used = 0
    try:
        model.eval()
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        with torch.no_grad():
            for batch in itertools.chain([first], batches):
                x = batch if isinstance(batch, torch.Tensor) else batch[0]
                model(x.to(device))
                used += 1
                if used == num_batches:
                    break
    finally:
        for module, training in modes.items():
            module.training = training
        for bn, momentum in momenta.items():
            bn.momentum = momentum
    if used < num_batches:
        log.warning("recalibrate_bn: only %d of %d batches available", used, num_batches)
    log.info("recalibrate_bn: %d BatchNorm(s) recalibrated on %d batch(es)", len(norms), used)
    return used
