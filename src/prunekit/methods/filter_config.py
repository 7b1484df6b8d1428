"""One-shot pruning as Network Pruning That Matters ran it (METHODS §2.3.1-§2.3.2): the method
``filter_config`` and the configurations and magnitude rules it is made of.

Structured: L1-norm filter pruning (PFEC, Li et al. 2017) with predefined configurations.

* ResNet-56/110 A–D: only block-first convs are pruned; convs are numbered 1, 2, … in module
  order with the stem = 1 (shortcut convs of option-B models are not numbered, so the ids mean
  the same there), so even ids are block-first convs. A layer id in ``skip`` keeps all its
  filters; the others keep ``int(C_out · (1 − p))`` (truncation) of their highest-scoring
  filters, p the ratio of the conv's stage.
* VGG-16 A–C: a target width per conv; a conv already at its target is left alone.
* ``resnet20-B`` [PROPOSED, METHODS §2.7]: the ResNet-56-B rule on ResNet-20 (ratios
  0.6/0.3/0.1; skip the first block of stages 2 and 3, conv ids 8 and 14, and the last block,
  id 18).

:func:`filter_keep` returns ``{layer name: kept filter indices}`` for
:func:`prunekit.core.compaction.compact`; :func:`prune_filters` also compacts. The criterion is
``l1`` (the paper) or ``random`` (i.i.d. uniform scores from a seeded generator: the same
per-layer counts, a random choice); any data-free criterion in ``CRITERIA`` works.

Unstructured: :func:`global_magnitude` masks all Conv2d weights (first conv in, FC out) with
one global ranking by |w| (``l1``) or at random (``random``: every surviving weight gets a
uniform score, the same global rule applies, giving about uniform layer-wise random sparsity).
It keeps the toolkit's exact top-k ``round((1 − P)·N)`` weights (METHODS §0.4) where the
authors keep ``|w| >`` the value at sorted index ``⌊P·N⌋`` (one weight fewer, ties aside).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from typing import Annotated, Literal

from prunekit.core.compaction import CompactionResult, compact
from prunekit.core.granularity import Filter
from prunekit.core.importance import LayerView, get_criterion
from prunekit.core.masks import MaskSet
from prunekit.core.selection import top_k_indices
from prunekit.core.sparsifier import Sparsifier
from prunekit.errors import UserError
from prunekit.methods.base import Method, MethodContext, PruneResult, register_method
from prunekit.models.cifar_resnet import BasicBlock, CifarResNet
from prunekit.models.cifar_vgg import CifarVGG
from prunekit.registry import Registry
from prunekit.schema import registered

log = logging.getLogger(__name__)

_FILTER = Filter()


@dataclass(frozen=True)
class ResNetConfig:
    """Per-stage ratios p for block-first convs of a CIFAR ResNet-``depth``; ``skip``: conv ids kept whole."""

    depth: int
    skip: frozenset[int]
    ratios: tuple[float, ...]
    note: str = ""


@dataclass(frozen=True)
class VGGConfig:
    """Target width per conv (``"M"`` marks a max-pool, as in the paper's lists)."""

    widths: tuple[int | str, ...]
    note: str = ""

    @property
    def conv_widths(self) -> tuple[int, ...]:
        return tuple(int(w) for w in self.widths if w != "M")


WidthConfig = ResNetConfig | VGGConfig
FILTER_CONFIGS: Registry[WidthConfig] = Registry("filter-pruning configuration")

_R56_B_SKIP = frozenset({16, 18, 20, 34, 38, 54})
_R110_B_SKIP = frozenset({36, 38, 74})
for _name, _config in {
    "resnet56-A": ResNetConfig(56, frozenset({16, 20, 38, 54}), (0.1, 0.1, 0.1), "Li et al. A"),
    "resnet56-B": ResNetConfig(56, _R56_B_SKIP, (0.6, 0.3, 0.1), "Li et al. B (≈14% params removed)"),
    "resnet56-C": ResNetConfig(56, _R56_B_SKIP, (0.6, 0.5, 0.4), "NPTM's harder variant"),
    "resnet56-D": ResNetConfig(56, _R56_B_SKIP, (0.6, 0.6, 0.6), "NPTM's harder variant"),
    "resnet110-A": ResNetConfig(110, frozenset({36}), (0.5, 0.0, 0.0), "Li et al. A"),
    "resnet110-B": ResNetConfig(110, _R110_B_SKIP, (0.5, 0.4, 0.3), "Li et al. B (≈32% params removed)"),
    "resnet110-C": ResNetConfig(110, _R110_B_SKIP, (0.5, 0.5, 0.5), "NPTM"),
    "resnet110-D": ResNetConfig(110, _R110_B_SKIP, (0.5, 0.6, 0.7), "NPTM"),
    "resnet20-B": ResNetConfig(20, frozenset({8, 14, 18}), (0.6, 0.3, 0.1),
                               "[PROPOSED] ResNet-56-B rule mapped to ResNet-20 (METHODS §2.7)"),
    "vgg16-A": VGGConfig((32, 64, "M", 128, 128, "M", 256, 256, 256, "M", 256, 256, 256, "M", 256, 256, 256),
                         "Li et al. A (≈64% params removed)"),
    "vgg16-B": VGGConfig((32, 64, "M", 128, 128, "M", 196, 196, 196, "M", 196, 196, 256, "M", 256, 256, 256),
                         "NPTM"),
    "vgg16-C": VGGConfig((32, 64, "M", 64, 128, "M", 128, 128, 128, "M", 196, 196, 196, "M", 196, 196, 196),
                         "NPTM"),
}.items():
    FILTER_CONFIGS.register(_name)(_config)


def _config(config: str | WidthConfig) -> WidthConfig:
    return FILTER_CONFIGS.get(config) if isinstance(config, str) else config


def conv_ids(model: nn.Module) -> dict[str, int]:
    """NPTM's conv numbering: every Conv2d in module order from 1 (stem = 1), shortcut convs skipped."""
    ids: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and ".shortcut" not in f".{name}":
            ids[name] = len(ids) + 1
    return ids


def kept_counts(model: nn.Module, config: str | WidthConfig) -> dict[str, tuple[int, int]]:
    """``{conv name: (filters kept, filters before)}`` for every conv the configuration prunes
    (skipped and untouched convs are absent)."""
    config = _config(config)
    if isinstance(config, ResNetConfig):
        return _resnet_counts(model, config)
    return _vgg_counts(model, config)


def _resnet_counts(model: nn.Module, config: ResNetConfig) -> dict[str, tuple[int, int]]:
    if not isinstance(model, CifarResNet):
        raise UserError(f"model: a ResNet configuration needs a CIFAR ResNet, got {type(model).__name__}")
    stages = [getattr(model, f"layer{i + 1}") for i in range(model.num_stages)]
    depth = 2 + 2 * sum(len(stage) for stage in stages)
    if depth != config.depth or len(stages) != len(config.ratios):
        raise UserError(f"config: made for ResNet-{config.depth} with {len(config.ratios)} stages, "
                        f"the model is ResNet-{depth} with {len(stages)}")
    ids = conv_ids(model)
    names = {m: n for n, m in model.named_modules()}
    out = {}
    for stage, (ratio, blocks) in enumerate(zip(config.ratios, stages)):
        for block in blocks:
            if not isinstance(block, BasicBlock):
                raise UserError(f"model: expected basic blocks in stage {stage + 1}, got {type(block).__name__}")
            name = names[block.conv1]
            if ids[name] % 2:  # the numbering must put block-first convs on even ids
                raise UserError(f"model: block-first conv {name!r} has odd id {ids[name]}; unexpected layout")
            if ids[name] in config.skip or ratio == 0:
                continue
            channels = block.conv1.out_channels
            kept = int(channels * (1 - ratio))  # truncation, as the authors' code
            if kept < 1:
                raise UserError(f"config: ratio {ratio} leaves no filter of {name!r}")
            if kept < channels:
                out[name] = (kept, channels)
    return out


def _vgg_counts(model: nn.Module, config: VGGConfig) -> dict[str, tuple[int, int]]:
    if not isinstance(model, CifarVGG):
        raise UserError(f"model: a VGG configuration needs the CIFAR VGG (vgg16_bn), got {type(model).__name__}")
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    targets = config.conv_widths
    if len(convs) != len(targets):
        raise UserError(f"config: lists {len(targets)} conv widths, the model has {len(convs)} convs")
    out = {}
    for (name, conv), target in zip(convs, targets):
        if target > conv.out_channels:
            raise UserError(f"config: target width {target} of {name!r} exceeds its {conv.out_channels} filters")
        if target < conv.out_channels:
            out[name] = (target, conv.out_channels)
    return out


def filter_keep(model: nn.Module, config: str | WidthConfig, criterion: str = "l1",
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Kept filter indices (sorted LongTensor) per pruned conv, for :func:`compact`.

    ``l1``: the highest sums of |w| over (C_in, k, k), ties by lower index. ``random``: i.i.d.
    U[0, 1) scores drawn from ``torch.Generator().manual_seed(seed)`` in module order: the same
    counts per layer, a random choice.
    """
    score = get_criterion(criterion)
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    keep = {}
    for name, (kept, _) in kept_counts(model, config).items():
        weight = modules[name].weight
        view = LayerView(name, weight.detach().cpu(), None, generator)
        keep[name] = top_k_indices(score(view, _FILTER), kept).long()
    if log.isEnabledFor(logging.INFO):
        log.info("filter configuration %s (%s): %d convs pruned", config if isinstance(config, str) else "custom",
                 criterion, len(keep))
    return keep


def keep_masks(model: nn.Module, keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weight-shaped boolean masks (True = kept) with the rows of the kept filters set."""
    modules = dict(model.named_modules())
    masks = {}
    for name, kept in keep.items():
        mask = torch.zeros_like(modules[name].weight, dtype=torch.bool)
        mask[kept] = True
        masks[name] = mask
    return masks


def prune_filters(model: nn.Module, config: str | WidthConfig, criterion: str = "l1", seed: int = 0, *,
                  example_input: torch.Tensor | None = None, verify: bool = True) -> CompactionResult:
    """Select with :func:`filter_keep` and remove the filters for good (in place); the result's
    ``manifest`` rebuilds (and rewinds) the pruned model. ``example_input`` defaults to one
    32×32 image."""
    if example_input is None:
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        example_input = torch.zeros(1, first.in_channels, 32, 32)
    return compact(model, filter_keep(model, config, criterion, seed), example_input, verify=verify)


def global_magnitude(model: nn.Module, sparsity: float, criterion: str = "l1", seed: int = 0) -> Sparsifier:
    """Mask ``sparsity`` of all Conv2d weights (first conv included, Linear excluded) with one
    global ranking; returns the Sparsifier (its :class:`~prunekit.core.sparsifier.EnforceMasks`
    hook keeps the masks during retraining)."""
    if criterion not in ("l1", "random"):
        raise UserError(f"criterion: expected l1 or random for global magnitude pruning, got {criterion!r}")
    sparsifier = Sparsifier(model, "weight", criterion, "global", types=(nn.Conv2d,), include_first_conv=True,
                            seed=seed)
    sparsifier.update(sparsity)
    return sparsifier


@register_method("filter_config")
class FilterConfig(Method):
    """One-shot filter pruning with a predefined per-layer configuration: ``config`` names one of
    ``FILTER_CONFIGS`` (ResNet-56/110 A–D, VGG-16 A–C, the [PROPOSED] ``resnet20-B``);
    ``criterion: l1`` keeps the filters with the largest L1 norms, ``random`` the same number per
    layer chosen at random (seeded by the run's seed). The configuration fixes how much goes, so
    there is no ``target``. The runner compacts the result when the recipe's ``compact`` is true.
    """

    method: Literal["filter_config"]
    config: Annotated[str, registered(FILTER_CONFIGS)]
    criterion: Literal["l1", "l2", "random"] = "l1"

    def describe(self) -> dict:
        return {"target": f"config={self.config} ({self.criterion})", "granularity": "filter"}

    def prune(self, model: nn.Module, ctx: MethodContext) -> PruneResult:
        keep = filter_keep(model, self.config, self.criterion, seed=ctx.seed)
        removed = sum(m.out_channels - len(keep[n]) for n, m in model.named_modules() if n in keep)
        return PruneResult(model, masks=MaskSet.attach(model, keep_masks(model, keep), "filter"),
                           summary={"config": self.config, "criterion": self.criterion, "filters_removed": removed})
