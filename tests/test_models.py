"""Model zoo: every name builds and runs, parameter counts, option-A shortcut, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from sklearn import datasets
from torch import nn

from prunekit.errors import UserError
from prunekit.measure import count_params
from prunekit.models import MODELS, build_model, list_models
from prunekit.models.cifar_resnet import BasicBlock, PadShortcut


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_builds_and_runs(name: str) -> None:
    in_channels, size = (1, 8) if name == "small_cnn" else (3, 32)
    model = build_model(name, num_classes=5, in_channels=in_channels)
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 5)


def test_list_models() -> None:
    names = list_models()
    expected = ["resnet20", "resnet56", "resnet110_b", "vgg16_bn", "mobilenetv2", "resnet18"]
    assert set(expected) <= set(names)
    assert "tv:<torchvision name>" in names


@pytest.mark.parametrize(
    ("name", "params"),
    [
        # akamaster/HRank option-A counts (the 272,474 sometimes quoted for ResNet-20 is option B).
        ("resnet20", 269_722),
        ("resnet32", 464_154),
        ("resnet56", 853_018),
        ("resnet110", 1_727_962),
        ("resnet20_b", 272_474),
        ("vgg16_bn", 14_991_946),
        ("mobilenetv2", 2_236_682),  # same as torchvision mobilenet_v2 with 10 classes
        ("resnet18", 11_173_962),
    ],
)
def test_param_counts(name: str, params: int) -> None:
    assert count_params(build_model(name)) == params


def test_count_params_trainable_only() -> None:
    model = build_model("small_cnn", in_channels=1)
    model.fc.requires_grad_(False)
    assert count_params(model, trainable_only=True) == count_params(model) - (64 * 10 + 10)


def test_option_a_shortcut_is_parameter_free_and_zero_pads() -> None:
    model = build_model("resnet20")
    pads = [m for m in model.modules() if isinstance(m, PadShortcut)]
    assert [(p.in_channels, p.out_channels) for p in pads] == [(16, 32), (32, 64)]
    assert all(not list(p.parameters()) and not list(p.buffers()) for p in pads)

    pad = PadShortcut(4, 8, stride=2)
    x = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4, 4)
    y = pad(x)
    assert y.shape == (2, 8, 2, 2)
    assert pad.offset == 2
    assert torch.equal(y[:, 2:6], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, :2]) == 0 and torch.count_nonzero(y[:, 6:]) == 0


def test_resnet_block_layout_matches_conv_numbering() -> None:
    model = build_model("resnet56")
    block = model.layer2[0]
    assert isinstance(block, BasicBlock)
    for attr in ("conv1", "bn1", "conv2", "bn2", "shortcut"):
        assert hasattr(block, attr)
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 55
    # METHODS §2.3.1: stem = 1, even ids are block-first convs.
    assert convs[0] == "conv1"
    assert convs[1] == "layer1.0.conv1" and convs[2] == "layer1.0.conv2"
    assert convs[20 - 1] == "layer2.0.conv1" and convs[38 - 1] == "layer3.0.conv1"
    assert all(name.endswith("conv1") for name in convs[1::2])
    assert isinstance(build_model("resnet20_b").layer2[0].shortcut[0], nn.Conv2d)


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(UserError, match="unknown model 'resnet99'; known: .*resnet56.*tv:"):
        build_model("resnet99")


def test_torchvision_by_name() -> None:
    model = build_model("tv:resnet18", num_classes=7)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_unknown_torchvision_name() -> None:
    with pytest.raises(UserError, match=r"torchvision\.models\.list_models"):
        build_model("tv:not_a_model")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 2.5}, "num_classes"),
        ({"num_classes": True}, "num_classes"),
        ({"in_channels": 0}, "in_channels"),
        ({"name": "tv:resnet18", "in_channels": 1}, "in_channels"),
    ],
)
def test_bad_arguments(kwargs: dict, field: str) -> None:
    name = kwargs.pop("name", "resnet20")
    with pytest.raises(UserError, match=field):
        build_model(name, **kwargs)


def test_small_cnn_learns_digits() -> None:
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    perm = torch.randperm(len(x))
    train, test = perm[:1000], perm[1400:]
    model = build_model("small_cnn", in_channels=1)
    epochs, batch = 3, 64
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    steps = epochs * -(-len(train) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.2, total_steps=steps)
    for _ in range(epochs):
        order = train[torch.randperm(len(train))]
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    assert acc > 0.9


def test_small_cnn_compacts_with_torch_pruning() -> None:
    model = build_model("small_cnn", in_channels=1).eval()
    before = count_params(model)
    example = torch.randn(1, 1, 8, 8)
    pruner = tp.pruner.MagnitudePruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=0.5, ignored_layers=[model.fc],
    )  # fmt: skip
    pruner.step()
    assert count_params(model) < before / 2
    assert model.fc.in_features == 32
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
