"""Optimizers built from a TrainConfig over the parameters that train."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

import torch
from torch import nn

from prunekit.errors import UserError
from prunekit.train.config import TrainConfig


def frozen_parameters(model: nn.Module, patterns: tuple[str, ...] | None) -> list[nn.Parameter]:
    """Parameters that require gradients but match none of ``patterns`` (glob patterns of the
    names in ``model.named_parameters()``); none when ``patterns`` is None."""
    if patterns is None:
        return []
    named = dict(model.named_parameters())
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in named):
            raise UserError(f"trainable: pattern {pattern!r} matches no parameter name of the model "
                            f"(such as {next(iter(named), '')!r})")
    return [p for name, p in named.items()
            if p.requires_grad and not any(fnmatchcase(name, pattern) for pattern in patterns)]


def parameter_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool,
                     frozen: Sequence[nn.Parameter] = ()) -> list[dict]:
    """One group with weight decay; norm weights and biases in a second, undecayed group if asked.
    Parameters that do not require gradients, or are in ``frozen``, are left out."""
    skip = {id(p) for p in frozen}
    decayed, undecayed = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in skip:
                continue
            is_norm_or_bias = name == "bias" or isinstance(module, nn.modules.batchnorm._NormBase | nn.LayerNorm | nn.GroupNorm)
            (undecayed if is_norm_or_bias and not decay_norm_and_bias else decayed).append(param)
    if not decayed and not undecayed:
        raise UserError("model: no parameter requires a gradient, so there is nothing to train")
    groups = [{"params": decayed, "weight_decay": weight_decay}]
    if undecayed:
        groups.append({"params": undecayed, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, config: TrainConfig,
                    frozen: Sequence[nn.Parameter] = ()) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.weight_decay, config.decay_norm_and_bias, frozen)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0)
    adam = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return adam(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def set_lr_and_momentum(optimizer: torch.optim.Optimizer, lr: float, momentum: float | None) -> None:
    """Write the plan's values into every group (``betas[0]`` is Adam's momentum)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if momentum is None:
            continue
        if "betas" in group:
            group["betas"] = (momentum, group["betas"][1])
        elif "momentum" in group:
            group["momentum"] = momentum
