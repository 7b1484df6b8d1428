"""One-shot pruning: prune a model once to a target (``weights=``, ``filters=``, ``macs=``).

Magnitude (``l1``, ``l2``) or ``random`` scores, layer-wise (``local``) or in one ranking
(``global``). Filter masks are compacted by the runner when the recipe's ``compact`` is true,
so retraining runs on the smaller model; other masks stay in place and are enforced.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from prunekit.core.prune_once import prune_once
from prunekit.methods.base import MethodContext, PruneResult, register_method
from prunekit.methods.common import TargetedMethod


@register_method("oneshot")
class OneShot(TargetedMethod):
    """Prune once to ``target``, then (optionally) retrain in the recipe's ``retrain`` stage."""

    method: Literal["oneshot"]

    def prune(self, model: nn.Module, ctx: MethodContext) -> PruneResult:
        sparsifier = prune_once(model, ctx.example_input(), target=self.target, granularity=self.granularity,
                                criterion=self.criterion, scope=self.scope, round_to=self.round_to, seed=ctx.seed,
                                **({} if self.structured else self.layer_choice()))
        return PruneResult(model, masks=sparsifier.mask_set)
