"""Pruning a trained model at any ratio s′, no retraining (METHODS §1.3.5, the "on the fly" part).

Prunable layers (§1.3.2): every ``nn.Conv2d`` (hyperspherical, baked or plain; 1×1, depthwise
and downsample convs included) but the first one, and the ``nn.Linear`` layers, the classifier
(the last Linear) only with ``prune_classifier`` (default True: the abstract exempts only the
first conv).

Entries are ranked by magnitude (``scores``): ``"effective"`` ranks ŵ of an HSConv2d, the
row-normalised weight of a Linear (§1.3.1) and the stored weight of a plain conv (ŵ itself once
baked); ``"raw"`` ranks the stored weights as they are (conventional magnitude pruning of a
standard model). Exact top-k (§0.4): a layer keeps ``round((1 − s′)·n)`` entries
(:func:`~prunekit.core.selection.keep_count`) and zeros the rest, ties broken by index (the lower
index is kept). That is ``round(s′·n)`` zeros, except that the two can differ by one when
``s′·n`` is a half-integer (half-to-even rounding of s′·n vs (1 − s′)·n, and float error).

``scope="global"`` ranks all prunable entries together (``round((1 − s′)·Σn)`` kept in total).
Caveat (§1.3.2): with unit-norm filters an entry's typical magnitude is ~1/√fan-in, so a global
threshold over-prunes the layers of large fan-in; layer-wise is the default for that reason.

Zeroing the raw weight of an HSConv2d renormalises the kept entries of each filter (by
1/√(1 − E_f)); to evaluate the trained ŵ with its small entries removed, bake first
(``"bake_hyperspherical"``). Masks are weight-shaped bool tensors (True = kept) keyed by the
layer's module name, as the mask enforcement of the fine-tuning variant (§1.3.7) takes them.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence

import torch
from torch import nn

from prunekit.core.hyperspherical import HSConv2d, effective_weight
from prunekit.core.selection import global_masks, local_masks
from prunekit.core.sparsifier import SCOPES, select_layers
from prunekit.errors import UserError

log = logging.getLogger(__name__)

SCORES = ("effective", "raw")


def prunable_layers(model: nn.Module, prune_classifier: bool = True,
                    layers: str | Sequence[str] = "*") -> dict[str, nn.Module]:
    """Convs but the first and Linears (the classifier only with ``prune_classifier``), by module name."""
    if not isinstance(prune_classifier, bool):
        raise UserError(f"prune_classifier: expected true or false, got {prune_classifier!r}")
    found = select_layers(model, layers, (nn.Conv2d, nn.Linear), include_first_conv=False,
                          include_classifier=prune_classifier)
    if not found:
        raise UserError(f"layers: no prunable conv or Linear layer matches {layers!r} (the first conv is exempt)")
    return found


def magnitudes(layer: nn.Module, scores: str = "effective") -> torch.Tensor:
    """|values| the entries of ``layer`` are ranked by (see the module doc), detached."""
    if scores not in SCORES:
        raise UserError(f"scores: expected one of {', '.join(SCORES)}, got {scores!r}")
    effective = scores == "effective" and isinstance(layer, (HSConv2d, nn.Linear))
    with torch.no_grad():
        return (effective_weight(layer) if effective else layer.weight).detach().abs()


def ratio_masks(model: nn.Module, sparsity: float, *, prune_classifier: bool = True, scope: str = "local",
                scores: str = "effective", layers: str | Sequence[str] = "*") -> dict[str, torch.Tensor]:
    """Kept-entry masks at sparsity ``sparsity`` for every prunable layer; the model is unchanged."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0 <= sparsity <= 1:
        raise UserError(f"sparsity: expected a fraction in [0, 1], got {sparsity!r}")
    if scope not in SCOPES:
        raise UserError(f"scope: expected local or global, got {scope!r}")
    values = {name: magnitudes(layer, scores) for name, layer in
              prunable_layers(model, prune_classifier, layers).items()}
    if scope == "global":
        return global_masks(values, float(sparsity))
    return local_masks(values, dict.fromkeys(values, float(sparsity)))


def prune_at_ratio(model: nn.Module, sparsity: float, *, prune_classifier: bool = True, scope: str = "local",
                   scores: str = "effective", layers: str | Sequence[str] = "*") -> dict[str, torch.Tensor]:
    """Zero the entries :func:`ratio_masks` drops, in place; returns the masks (True = kept)."""
    masks = ratio_masks(model, sparsity, prune_classifier=prune_classifier, scope=scope, scores=scores,
                        layers=layers)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            modules[name].weight.mul_(mask)
    zeroed = sum(int((~m).sum()) for m in masks.values())
    log.info("pruned %d of %d entries in %d layers at sparsity %g (%s)", zeroed,
             sum(m.numel() for m in masks.values()), len(masks), sparsity, scope)
    return masks
