"""AutoBot (Castells & Yeom, AAAI 2023; METHODS §4): trainable filter gates pulled to a MACs
target on a frozen network, then a global threshold and physical removal.

``prune`` inserts gates λ = sigmoid(α) at ``init`` (:mod:`prunekit.core.gates`), trains only
the α's on the frozen network in eval mode (Adam at ``lr``, no LR schedule, weight decay 0,
fp32) for one pass over ``batches`` batches of ``batch_size`` augmented training images with the
loss CE + β·L_flops + γ·L_bool (:mod:`prunekit.core.gate_losses`) on the differentiable MACs of
:mod:`prunekit.core.gate_costs`, keeps the gates of the lowest-loss step after ``keep_after`` of
the steps (:class:`~prunekit.core.gate_selection.BestGates`), bisects one global threshold for
the target (:mod:`prunekit.core.gate_threshold`), removes the gates and the pruned filters
(:func:`~prunekit.core.scatter.prune_channels`). Kept filters keep their weights (no folding).

Defaults are the paper's CIFAR logs: lr 0.5, β = 6, γ = 0.2, 200 × 64. The official code's
parser defaults differ: lr 0.6, β = 6, γ = 0.4 (METHODS §4.5).

``target: macs=F`` removes the fraction F of the dense MACs (thop convention): the pruned model
may keep ``T = (1 − F) · dense``. ``residual`` places the gates: ``scatter`` (the paper on CIFAR
ResNets: every block's conv2 gated after bn2, its kept outputs added into the full-width
residual), ``keep`` (block-internal channels only), ``coupled`` (residual partners share one
vector: other models); ``auto`` is ``scatter`` where the model has CIFAR basic blocks, else
``coupled``. ``threshold``: ``closest`` returns the closest tried mask at or below T (MACs from
the cost table), ``official`` the last one tried (the official loop: may end off target or up
to ``tolerance`` above it), ``counter`` bisects like ``closest`` against ``count_macs`` on the
physically pruned model. The MACs reported by the prune stage are always re-measured on the
pruned model.

``scores`` other than ``gates`` are the baselines "at the same MACs through the same
bisection" (METHODS §4.9), no gate training: ``l1`` — per-filter L1 norms (summed over the
producers of a coupled vector) divided by the vector's largest, one global threshold;
``l1_uniform`` — rank scores (C − r)/C by L1 within each vector, so the threshold keeps the same
fraction of every vector (up to one filter: the i-th vector's scores are lowered by i·ε, ε below
half the finest rank step, so vectors whose fractions tie lose their filters one at a time and the
MACs move in single-filter steps, not all vectors at once); ``random`` — U[0, 1) scores seeded by the run's seed.

The result is always compacted (the recipe's ``compact`` applies to masks, which this method
does not leave).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import field_validator, model_validator
from torch import nn

from prunekit.core.gate_costs import GateCosts
from prunekit.core.gate_losses import bool_loss, flops_loss
from prunekit.core.gate_selection import BestGates
from prunekit.core.gate_threshold import ITERATIONS, TOLERANCE, ThresholdResult, threshold_gates
from prunekit.core.gates import INIT, gates, insert_gates, remove_gates, set_gates
from prunekit.core.scatter import basic_blocks, prune_channels, pruned_macs
from prunekit.core.targets import parse_target
from prunekit.errors import UserError
from prunekit.methods.base import Method, MethodContext, PruneResult, register_method
from prunekit.schema import NonNegativeFloat, PositiveFloat, PositiveInt, reword
from prunekit.train.config import TrainConfig
from prunekit.train.hooks import Hook

if TYPE_CHECKING:
    from prunekit.train.trainer import Trainer

log = logging.getLogger(__name__)

TRAINABLE = ("*.gate.alpha",)
"""The gate parameters: the only ones gate training updates."""
PROBE = 8
"""Random inputs on which the pruned model is compared with the 0/1-gated one."""


@register_method("autobot")
class AutoBot(Method):
    """AutoBot gates (or a baseline's scores) to a ``macs=`` target; see the module doc."""

    method: Literal["autobot"]
    target: str
    residual: Literal["auto", "scatter", "keep", "coupled"] = "auto"
    scores: Literal["gates", "l1", "l1_uniform", "random"] = "gates"
    batches: PositiveInt = 200
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 0.5
    beta: NonNegativeFloat = 6.0
    gamma: NonNegativeFloat = 0.2
    init: float = INIT
    keep_after: float = 0.6
    threshold: Literal["closest", "official", "counter"] = "closest"
    tolerance: NonNegativeFloat = float(TOLERANCE)
    iterations: PositiveInt = ITERATIONS

    @field_validator("target", mode="before")
    @classmethod
    def _macs_target(cls, value: Any) -> str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise ValueError(f"needs the unit: write macs={value:g} (the fraction of the dense MACs removed)")
        try:
            target = parse_target(value)
        except UserError as exc:
            raise ValueError(reword(str(exc), "target")) from None
        if target.unit != "macs":
            raise ValueError(f"autobot prunes to a MACs target; write macs=F (the fraction removed), got {value!r}")
        if not 0 < target.fraction < 1:
            raise ValueError(f"expected macs=F with F strictly between 0 and 1, got {value!r}")
        return str(target)

    @field_validator("init", "keep_after")
    @classmethod
    def _open_fraction(cls, value: float, info: Any) -> float:
        low_ok = value > 0 if info.field_name == "init" else value >= 0
        if not (low_ok and value < 1):
            span = "(0, 1)" if info.field_name == "init" else "[0, 1)"
            raise ValueError(f"expected a number in {span}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _a_step_to_keep(self) -> AutoBot:
        if self.scores == "gates" and not (self.batches - 1) > self.keep_after * self.batches:
            raise ValueError(f"batches: {self.batches} batches leave no step after keep_after = "
                             f"{self.keep_after:g} of them to keep the gates of; use more batches")
        return self

    @property
    def fraction(self) -> float:
        return parse_target(self.target).fraction

    def describe(self) -> dict[str, Any]:
        return {"target": self.target, "granularity": "filter"}

    def placement(self, model: nn.Module) -> str:
        if self.residual != "auto":
            return self.residual
        return "scatter" if basic_blocks(model) else "coupled"

    # ---------------------------------------------------------------- prune
    def prune(self, model: nn.Module, ctx: MethodContext) -> PruneResult:
        x = ctx.example_input()
        model = model.to("cpu").eval()
        residual = self.placement(model)
        scatter = residual == "scatter"
        costs = GateCosts.build(model, x, scatter=scatter)
        dense = costs.dense_macs()
        target = (1 - self.fraction) * dense
        insert_gates(model, x, residual=residual, init=self.init)
        summary: dict[str, Any] = {"residual": residual, "scores": self.scores, "threshold_mode": self.threshold,
                                   "target_macs": round(target), "dense_macs_internal": dense}
        plain = remove_gates(copy.deepcopy(model))  # gate training changes no weight
        if self.scores == "gates":
            scores, figures = self._train_gates(model, costs, target, dense, ctx)
            summary.update(figures)
            model.to("cpu")
        else:
            vectors = {root: gate.alpha.numel() for root, gate in gates(model).items()}
            producers = {g.root: g.out_layers for g in costs.costs.groups if g.root not in costs.scattered}
            scores = baseline_scores(plain, vectors, producers, self.scores, ctx.seed)
        macs_of = pruned_macs(plain, x, scatter=scatter) if self.threshold == "counter" else costs.macs
        chosen = threshold_gates(scores, target, macs_of, tolerance=self.tolerance, iterations=self.iterations,
                                 official_last=self.threshold == "official")
        summary.update(_threshold_summary(chosen))
        probe = torch.randn(PROBE, *ctx.input_shape, generator=torch.Generator().manual_seed(ctx.seed))
        set_gates(model, {root: mask.float() for root, mask in chosen.keep.items()})
        with torch.no_grad():
            reference = model(probe)
        model, manifest = prune_channels(remove_gates(model),
                                         {root: mask.nonzero().flatten() for root, mask in chosen.keep.items()},
                                         x, scatter=scatter)
        with torch.no_grad():
            summary["max_abs_diff_vs_gated"] = float((model(probe) - reference).abs().max())
        return PruneResult(model, manifest=manifest, summary=summary)

    def _train_gates(self, model: nn.Module, costs: GateCosts, target: float, dense: float,
                     ctx: MethodContext) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Train the gates; the kept gate values and the training's figures."""
        config = TrainConfig(steps=self.batches, optimizer="adam", lr=self.lr, weight_decay=0.0, lr_plan="constant",
                             trainable=TRAINABLE, eval_mode=True, precision="fp32", seed=ctx.seed)
        data = replace(ctx.data_with(batch_size=self.batch_size), test=None)  # no test pass of the soft gates
        passes = self.batches / len(data.train)
        if passes > 1:
            log.warning("batches: %d gate-training batches are %.2f passes over the %d batches of the training "
                        "split; METHODS §4.5 makes one pass with no repetition", self.batches, passes, len(data.train))
        hook = GateTraining(costs, target, dense, beta=self.beta, gamma=self.gamma,
                            best=BestGates(self.keep_after), steps=self.batches)
        began = time.perf_counter()
        trainer, result = ctx.fit(model, config, [hook], data=data)
        elapsed = time.perf_counter() - began
        best = hook.best
        if best.gates is None:  # resumed runs restore it; a fresh run always has one (validated)
            raise RuntimeError("gate training kept no gates")
        soft = float(costs.soft_macs(best.gates))
        log.info("gate training: %d steps in %.1f s; kept step %d (loss %.4f, soft MACs %s)", trainer.global_step,
                 result.wall_time_s, best.step, best.loss, f"{soft:,.0f}")
        return best.gates, {"gate_training_wall_time_s": result.wall_time_s, "gate_training_call_s": elapsed,
                            "gate_steps": trainer.global_step, "gate_batch_size": self.batch_size,
                            "gate_training_passes": passes,
                            "kept_step": best.step, "kept_loss": best.loss, "kept_soft_macs": soft,
                            "final_soft_macs": hook.last_macs}


def _threshold_summary(chosen: ThresholdResult) -> dict[str, Any]:
    return {"threshold": chosen.threshold, "threshold_iterations": chosen.iterations,
            "macs_internal": chosen.macs, "threshold_history": [list(entry) for entry in chosen.history],
            "kept_channels": {root: [int(mask.sum()), mask.numel()] for root, mask in chosen.keep.items()}}


class GateTraining(Hook):
    """Adds β·L_flops + γ·L_bool to the CE loss and offers every step to :class:`BestGates`
    (with the gate values that step's loss was computed with, before its update)."""

    def __init__(self, costs: GateCosts, target: float, dense: float, *, beta: float, gamma: float,
                 best: BestGates, steps: int) -> None:
        self.costs, self.target, self.dense = costs, target, dense
        self.beta, self.gamma, self.best, self.steps = beta, gamma, best, steps
        self._values: dict[str, torch.Tensor] = {}
        self.last_macs: float | None = None

    def extra_loss(self, trainer: Trainer, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        values = {root: gate.value() for root, gate in gates(trainer.model).items()}
        self._values = {root: value.detach().cpu().clone() for root, value in values.items()}
        macs = self.costs.soft_macs(values)
        self.last_macs = float(macs.detach())
        term = self.beta * flops_loss(macs, self.target, self.dense) + self.gamma * bool_loss(list(values.values()))
        return term.to(device=outputs.device, dtype=torch.float32)

    def on_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        if trainer.dist.distributed:  # the loss of the global batch, so every rank keeps the same step
            loss = trainer.dist.sum(loss) / trainer.dist.world_size
        self.best.update(trainer.global_step, self.steps, loss, self._values)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best.state_dict(), "last_macs": self.last_macs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best.load_state_dict(state["best"])
        self.last_macs = state["last_macs"]


# -------------------------------------------------------------------- baselines
def baseline_scores(model: nn.Module, vectors: Mapping[str, int], producers: Mapping[str, Sequence[str]], kind: str,
                    seed: int) -> dict[str, torch.Tensor]:
    """Scores in (0, 1] (``random``: [0, 1)) for the gate ``vectors`` ``{root: channels}`` of the gate-free
    ``model`` (see the module doc); ``producers``: the layers whose filters a vector gates (default: its root)."""
    if kind == "random":
        generator = torch.Generator().manual_seed(seed)
        return {root: torch.rand(n, generator=generator) for root, n in vectors.items()}
    out = {}
    offset = 1 / (2 * len(vectors) * max(vectors.values()))  # < half the finest rank step
    for i, (root, n) in enumerate(vectors.items()):
        norms = sum(_filter_l1(model.get_submodule(layer).weight) for layer in producers.get(root, (root,)))
        if kind == "l1":
            out[root] = norms / norms.max()
        else:  # l1_uniform: rank r (0 = largest norm) scores (C − r) / C, less i · offset for the i-th vector
            ranks = torch.empty(n, dtype=torch.long)
            ranks[torch.argsort(norms, descending=True, stable=True)] = torch.arange(n)
            out[root] = (n - ranks).to(torch.float64) / n - i * offset
    return out


def _filter_l1(weight: torch.Tensor) -> torch.Tensor:
    """Sum of |w| per output channel (dim 0)."""
    return weight.detach().abs().flatten(1).sum(1).cpu()
