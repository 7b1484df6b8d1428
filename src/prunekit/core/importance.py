"""Importance criteria: plain functions that score the units of one layer.

A criterion is ``fn(layer: LayerView, granularity: Granularity) -> Tensor`` returning one score
per unit (the shape of ``granularity.reduce(weight)``); higher means more important. Register
your own with ``@CRITERIA.register("name")``. Criteria that need data read
``LayerView.evidence``, gathered beforehand by the helpers here:

* ``taylor``: evidence from :func:`taylor_evidence` (mean |w·∂L/∂w| over a few batches).
* ``movement``: evidence from the :class:`~prunekit.train.masking.MovementScores` training hook.
* ``bn_scale``: evidence from :func:`batchnorm_scales` (γ of the BN after each conv).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunekit.core.granularity import Filter, Granularity
from prunekit.errors import UserError
from prunekit.registry import Registry
from prunekit.tracing import probe_forward

_FILTER = Filter()


@dataclass(frozen=True)
class LayerView:
    """What a criterion may look at for one layer."""

    name: str
    weight: torch.Tensor
    evidence: torch.Tensor | None = None
    generator: torch.Generator | None = None


Criterion = Callable[[LayerView, Granularity], torch.Tensor]
CRITERIA: Registry[Criterion] = Registry("criterion")


def _evidence(layer: LayerView, criterion: str, helper: str) -> torch.Tensor:
    if layer.evidence is None:
        raise UserError(f"criterion {criterion}: no evidence for layer {layer.name!r}; "
                        f"gather it with {helper} and pass it as evidence=")
    return layer.evidence


@CRITERIA.register("l1")
def l1(layer: LayerView, granularity: Granularity) -> torch.Tensor:
    """Sum of |w| over the unit (|w| itself for unstructured)."""
    return granularity.reduce(layer.weight.detach().abs())


@CRITERIA.register("l2")
def l2(layer: LayerView, granularity: Granularity) -> torch.Tensor:
    """L2 norm of the unit (|w| itself for unstructured)."""
    return granularity.reduce(layer.weight.detach().square()).sqrt()


@CRITERIA.register("random")
def random_scores(layer: LayerView, granularity: Granularity) -> torch.Tensor:
    """I.i.d. U[0, 1) scores from the sparsifier's seeded generator."""
    shape = granularity.reduce(layer.weight.detach()).shape
    return torch.rand(shape, generator=layer.generator).to(layer.weight.device)


@CRITERIA.register("taylor")
def taylor(layer: LayerView, granularity: Granularity) -> torch.Tensor:
    """First-order Taylor: accumulated |w·∂L/∂w| summed over the unit."""
    return granularity.reduce(_evidence(layer, "taylor", "taylor_evidence(...)"))


@CRITERIA.register("movement")
def movement(layer: LayerView, granularity: Granularity) -> torch.Tensor:
    """Movement (Sanh et al. 2020): accumulated −w·∂L/∂w summed over the unit."""
    return granularity.reduce(_evidence(layer, "movement", "the MovementScores hook"))


@CRITERIA.register("bn_scale")
def bn_scale(layer: LayerView, granularity: Granularity) -> torch.Tensor:
    """|γ| of the BatchNorm following the conv (network slimming); filter granularity only."""
    if not isinstance(granularity, Filter):
        raise UserError(f"criterion bn_scale: needs granularity 'filter', got {granularity.name!r}")
    return _evidence(layer, "bn_scale", "batchnorm_scales(...)").detach().abs()


def get_criterion(spec: str | Criterion) -> Criterion:
    """A registered criterion by name, or a criterion function as is."""
    return spec if callable(spec) else CRITERIA.get(spec)


def score_units(layers: Mapping[str, nn.Module], criterion: str | Criterion, granularity: Granularity,
                generator: torch.Generator | None = None, evidence: Mapping[str, torch.Tensor] | None = None,
                alive: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One float score per unit of every layer; units not ``alive`` (unit masks) score ``-inf``."""
    score = get_criterion(criterion)
    out = {}
    for name, layer in layers.items():
        view = LayerView(name, layer.weight, None if evidence is None else evidence.get(name), generator)
        scores = score(view, granularity).float()
        expected = granularity.reduce(layer.weight.detach()).shape
        if scores.shape != expected:
            raise UserError(f"criterion: returned shape {tuple(scores.shape)} for layer {name!r}, "
                            f"expected {tuple(expected)} (one score per {granularity.name})")
        out[name] = scores.masked_fill(~alive[name], float("-inf")) if alive is not None else scores
    return out


def l1_filter_scores(weight: torch.Tensor) -> torch.Tensor:
    """Sum of |w| over everything but the output-channel dimension (PFEC, Li et al. 2017)."""
    return l1(LayerView("", weight), _FILTER)


# ------------------------------------------------------------------ evidence
def taylor_evidence(layers: Mapping[str, nn.Module], batches: Iterable[Any],
                    loss_fn: Callable[[Any], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean over ``batches`` of |w·∂L/∂w| per weight element, ``L = loss_fn(batch)``.

    Gradients come from ``torch.autograd.grad``: ``.grad`` fields are left untouched. Put the
    model in the mode you want first (eval keeps BN statistics frozen).
    """
    weights = [layer.weight for layer in layers.values()]
    totals = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    count = 0
    for batch in batches:
        grads = torch.autograd.grad(loss_fn(batch), weights, allow_unused=True)
        for total, w, g in zip(totals, weights, grads):
            if g is not None:
                total.add_((w.detach() * g).abs())
        count += 1
    if count == 0:
        raise UserError("batches: taylor_evidence needs at least one batch")
    return {name: total.div_(count) for name, total in zip(layers, totals)}


def following_batchnorms(model: nn.Module, layers: Mapping[str, nn.Module],
                         example_input: torch.Tensor) -> dict[str, nn.Module]:
    """The BatchNorm that directly consumes each layer's output, per layer name (absent: none).

    Found with one forward pass (eval mode, no grad; training flags restored): a BN follows a
    layer when its input is the very tensor that layer returned.
    """
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    follower: dict[str, nn.Module] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            produced[id(output)] = (name, output)  # holding the tensor keeps its id unique

        return hook

    def match(module: nn.Module, args: tuple) -> None:
        hit = produced.get(id(args[0]))
        if hit is not None and hit[1] is args[0]:
            follower.setdefault(hit[0], module)

    handles = [layer.register_forward_hook(record(name)) for name, layer in layers.items()]
    handles += [m.register_forward_pre_hook(match) for m in model.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    probe_forward(model, example_input, handles)
    return follower


def batchnorm_scales(model: nn.Module, layers: Mapping[str, nn.Module],
                     example_input: torch.Tensor) -> dict[str, torch.Tensor]:
    """γ of the BatchNorm that directly consumes each layer's output (:func:`following_batchnorms`)."""
    follower = following_batchnorms(model, layers, example_input)
    missing = [name for name in layers if name not in follower]
    if missing:
        raise UserError(f"criterion bn_scale: no BatchNorm directly after layer(s) {', '.join(missing)}; "
                        "exclude them from the pruned layers")
    return {name: follower[name].weight.detach().clone() for name in layers}
