"""Model zoo: CIFAR-sized networks by prunekit name, any torchvision classifier as ``tv:<name>``."""

from __future__ import annotations

from functools import partial
from typing import Callable

import torchvision
from torch import nn

from prunekit.errors import UserError
from prunekit.models.cifar_resnet import cifar_resnet
from prunekit.models.cifar_vgg import vgg16_bn
from prunekit.models.mobilenetv2 import mobilenetv2
from prunekit.models.resnet18_cifar import resnet18
from prunekit.models.small_cnn import small_cnn
from prunekit.registry import Registry

ModelFactory = Callable[..., nn.Module]
"""Called as ``factory(num_classes=..., in_channels=...)``."""

TV_PREFIX = "tv:"

MODELS: Registry[ModelFactory] = Registry("model")
for _depth in (20, 32, 56, 110):
    MODELS.register(f"resnet{_depth}")(partial(cifar_resnet, _depth, "A"))
    MODELS.register(f"resnet{_depth}_b")(partial(cifar_resnet, _depth, "B"))
MODELS.register("vgg16_bn")(vgg16_bn)
MODELS.register("mobilenetv2")(mobilenetv2)
MODELS.register("resnet18")(resnet18)
MODELS.register("small_cnn")(small_cnn)


def _positive_int(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{field}: expected an integer >= 1, got {value!r}")
    return value


def _torchvision_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise UserError(
            f"model: unknown torchvision classification model {name!r} in '{TV_PREFIX}{name}'; "
            "see torchvision.models.list_models(module=torchvision.models)"
        )
    if in_channels != 3:
        raise UserError(f"in_channels: torchvision models take 3 input channels, got {in_channels}")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def build_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Build a freshly initialised model by name (never downloads weights).

    ``name`` is a prunekit name (see ``list_models()``) or ``tv:<torchvision name>`` for any
    torchvision classification model, e.g. ``tv:resnet18``, ``tv:mobilenet_v2``.
    """
    num_classes = _positive_int("num_classes", num_classes)
    in_channels = _positive_int("in_channels", in_channels)
    if not isinstance(name, str):
        raise UserError(f"model: expected a model name string, got {name!r}")
    if name.startswith(TV_PREFIX):
        return _torchvision_model(name[len(TV_PREFIX) :], num_classes, in_channels)
    try:
        factory = MODELS.get(name)
    except UserError as err:
        raise UserError(f"{err}, or {TV_PREFIX}<torchvision name>") from None
    return factory(num_classes=num_classes, in_channels=in_channels)


def list_models() -> list[str]:
    """prunekit model names, plus the ``tv:<torchvision name>`` pattern."""
    return [*MODELS.names(), f"{TV_PREFIX}<torchvision name>"]


__all__ = ["MODELS", "ModelFactory", "build_model", "list_models"]
