"""Hyperspherical layers: unfold oracles, conversion preserving outputs, transform replay, BN recalibration."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.hyperspherical import (HSConv2d, InputNormConv2d, effective_weight, patch_norm,
                                          recalibrate_bn, unit_rows)
from prunekit.core.transforms import apply_transform, recorded, replay
from prunekit.errors import UserError
from prunekit.models import build_model


def cosine_oracle(conv: nn.Conv2d, weight: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """⟨ŵ_f, x_p⟩ / max(‖x_p‖, eps) from explicit patches (F.unfold), group by group."""
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    else:
        padding = conv.padding
    patches = F.unfold(x, conv.kernel_size, conv.dilation, padding, conv.stride)  # (N, C·kh·kw, L)
    groups, per_in = conv.groups, conv.in_channels // conv.groups
    per_out, size = conv.out_channels // groups, per_in * conv.kernel_size[0] * conv.kernel_size[1]
    unit = weight.flatten(1) / weight.flatten(1).norm(dim=1, keepdim=True)
    outs = []
    for g in range(groups):
        p = patches[:, g * size:(g + 1) * size]
        outs.append(unit[g * per_out:(g + 1) * per_out] @ p / p.norm(dim=1, keepdim=True).clamp_min(eps))
    return torch.cat(outs, 1)  # (N, C_out, L)


@pytest.mark.parametrize("groups, stride, padding, dilation, mode", [
    (1, 1, 1, 1, "zeros"), (1, 2, 1, 1, "zeros"), (2, 1, 2, 2, "zeros"), (4, 1, 1, 1, "zeros"),
    (4, 2, 1, 1, "reflect"), (1, 1, 1, 1, "circular")])
def test_cosine_operator_matches_unfold_oracle(groups, stride, padding, dilation, mode):
    torch.manual_seed(0)
    conv = HSConv2d(4, 8, 3, stride, padding, dilation, groups, mode, normalize_input=True, dtype=torch.float64)
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    x[:, :, :3, :3] = 0  # all-zero patches: output 0 (divided by eps, not by 0)
    out = conv(x)
    oracle = cosine_oracle(conv, conv.weight, x, conv.input_eps)
    torch.testing.assert_close(out.flatten(2), oracle, rtol=1e-12, atol=1e-12)
    assert out.abs().max() <= 1 + 1e-12  # a cosine
    out.sum().backward()
    assert torch.isfinite(conv.weight.grad).all()


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_filters_are_unit_norm_per_output_filter(groups):
    torch.manual_seed(0)
    conv = HSConv2d(4, 8, 3, padding=1, groups=groups, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.mul_(torch.arange(1.0, 9.0, dtype=torch.float64).view(-1, 1, 1, 1))
    unit = effective_weight(conv)
    assert unit.shape == (8, 4 // groups, 3, 3)  # depthwise (groups=4 … in=4): the k×k kernel only
    torch.testing.assert_close(unit.flatten(1).norm(dim=1), torch.ones(8, dtype=torch.float64))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(conv(x), F.conv2d(x, unit, None, 1, 1, 1, groups))
    assert conv.bias is None


def test_patch_norm_of_depthwise_conv_is_per_channel():
    conv = nn.Conv2d(2, 2, 3, padding=1, groups=2, bias=False)
    x = torch.zeros(1, 2, 3, 3)
    x[0, 0, 1, 1], x[0, 1, 0, 0] = 3.0, 4.0
    norm = patch_norm(conv, x, 1e-6)
    assert norm.shape == (1, 2, 3, 3)
    assert torch.all(norm[0, 0] == 3.0)  # every 3×3 patch contains the centre
    assert norm[0, 1, 0, 0] == 4.0 and norm[0, 1, 2, 2] == 1e-6


def test_linear_is_measured_row_normalised_without_changing_its_forward():
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    torch.testing.assert_close(effective_weight(layer), torch.tensor([[0.6, 0.8], [0.0, 0.0]]))
    assert torch.equal(layer(torch.ones(1, 2)), torch.tensor([[7.0, 0.0]]))
    with pytest.raises(UserError, match="layers: expected a hyperspherical conv"):
        effective_weight(nn.Conv2d(1, 1, 1))


# ----------------------------------------------------------------------------- conversion
def randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters, as a trained model has."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g))


def biased_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, stride=2, groups=3), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, groups=6, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


@pytest.mark.parametrize("name", ["small_cnn", "resnet20", "tv:mobilenet_v2", "biased"])
def test_conversion_keeps_eval_outputs_exactly(name):
    torch.manual_seed(0)
    model = biased_net() if name == "biased" else build_model(name, in_channels=3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(torch.rand(m.out_channels, 1, 1, 1) * 3 + 0.2)  # filter norms far from 1
    randomise_bn(model)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    folded = {f"{n}.bias" for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.bias is not None}
    shapes = {k: v.shape for k, v in model.state_dict().items() if k not in folded}
    converted = apply_transform(model, "hyperspherical")
    convs = [m for m in converted.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is HSConv2d for m in convs)
    assert {k: v.shape for k, v in converted.state_dict().items()} == shapes  # names and shapes kept
    torch.testing.assert_close(converted(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["small_cnn", "biased"])
def test_conversion_keeps_train_outputs_up_to_batchnorm_eps(name):
    torch.manual_seed(0)
    model = biased_net() if name == "biased" else build_model(name, in_channels=3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(3.0)
    randomise_bn(model)
    model.double()  # float64: a dead channel's batch variance is rounding noise, amplified by 1/√ε below
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    converted = apply_transform(copy.deepcopy(model), "hyperspherical")
    model.train(), converted.train()
    torch.testing.assert_close(converted(x), model(x), rtol=1e-3, atol=1e-3)  # σ_B² + n²ε vs σ_B² + ε
    for m in [*model.modules(), *converted.modules()]:
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-12  # the only difference, as documented (torch refuses 0 in train mode)
    torch.testing.assert_close(converted(x), model(x), rtol=1e-9, atol=1e-9)


def test_first_conv_can_stay_plain_and_layers_select():
    model = apply_transform(build_model("resnet20"), "hyperspherical", first_conv=False, layers=["*", "!layer3.*"])
    assert type(model.conv1) is nn.Conv2d
    assert type(model.layer1[0].conv1) is HSConv2d and type(model.layer3[0].conv1) is nn.Conv2d


def test_conv_without_batchnorm_is_refused_unless_allowed():
    def net(bias: bool) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1, bias=bias))

    with pytest.raises(UserError, match=r"require_bn: no BatchNorm right after 3"):
        apply_transform(net(False), "hyperspherical")
    model = apply_transform(net(False), "hyperspherical", require_bn=False)
    assert type(model[3]) is HSConv2d
    with pytest.raises(UserError, match=r"layers: conv bias can only be folded .* 3 has none"):
        apply_transform(net(True), "hyperspherical", require_bn=False)
    converted = apply_transform(net(True), "hyperspherical", layers=["*", "!3"])
    assert type(converted[0]) is HSConv2d and type(converted[3]) is nn.Conv2d


@pytest.mark.parametrize("args, field", [({"normalize_input": 1}, "normalize_input"), ({"input_eps": 0}, "input_eps"),
                                         ({"input_size": 0}, "input_size"), ({"layers": "nothing"}, "layers")])
def test_bad_transform_arguments_name_the_field(args, field):
    with pytest.raises(UserError, match=rf"^{field}:"):
        apply_transform(build_model("resnet20"), "hyperspherical", **args)


def test_probe_too_small_for_the_model_asks_for_input_size():
    model = nn.Sequential(nn.Conv2d(3, 4, 5), nn.BatchNorm2d(4))
    with pytest.raises(UserError, match=r"^input_size: the probe pass on a 2x2 image failed"):
        apply_transform(model, "hyperspherical", input_size=2)
    assert type(apply_transform(model, "hyperspherical", input_size=5)[0]) is HSConv2d


def test_near_constant_channel_is_clamped_and_logged(caplog):
    model = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([10.0, 1.0]).view(2, 1, 1, 1))
        model[1].running_var.copy_(torch.tensor([0.0, 2.0]))
    with caplog.at_level(logging.WARNING):
        model = apply_transform(model, "hyperspherical")
    assert "1 near-constant channel" in caplog.text
    assert model[1].running_var[0] == 0
    torch.testing.assert_close(model[1].running_var[1], torch.tensor(2.0))


# ---------------------------------------------------------------------------- replay, bake
@pytest.mark.parametrize("name, normalize_input", [("small_cnn", False), ("small_cnn", True), ("resnet20", True)])
def test_transforms_replay_on_a_fresh_model(name, normalize_input):
    torch.manual_seed(0)
    model = build_model(name, in_channels=3)
    randomise_bn(model)
    model = apply_transform(model, "hyperspherical", normalize_input=normalize_input).eval()
    x = torch.randn(2, 3, 32, 32)

    def reloaded(source: nn.Module) -> nn.Module:
        torch.manual_seed(1)
        fresh = replay(build_model(name, in_channels=3), recorded(source))
        fresh.load_state_dict(source.state_dict())
        return fresh.eval()

    assert torch.equal(reloaded(model)(x), model(x))
    baked = apply_transform(copy.deepcopy(model), "bake_hyperspherical")
    assert [e["name"] for e in recorded(baked)] == ["hyperspherical", "bake_hyperspherical"]
    plain = InputNormConv2d if normalize_input else nn.Conv2d
    assert {type(m) for m in baked.modules() if isinstance(m, nn.Conv2d)} == {plain}
    torch.testing.assert_close(baked(x), model(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(reloaded(baked)(x), baked(x))


def test_bake_stores_the_unit_weight():
    torch.manual_seed(0)
    model = nn.Sequential(HSConv2d(2, 3, 3, groups=1))
    baked = apply_transform(copy.deepcopy(model), "bake_hyperspherical")
    assert type(baked[0]) is nn.Conv2d and baked[0].bias is None
    assert torch.equal(baked[0].weight, unit_rows(model[0].weight).detach())
    with pytest.raises(UserError, match="no hyperspherical conv to bake"):
        apply_transform(baked, "bake_hyperspherical")


# ------------------------------------------------------------------------ BN recalibration
def test_recalibrate_bn_is_an_equal_weight_average_over_the_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.9), nn.Conv2d(2, 3, 1, bias=False), nn.BatchNorm2d(3))
    model.train()
    batches = [(torch.randn(4, 2, 3, 3), torch.zeros(4)) for _ in range(3)]
    assert recalibrate_bn(model, batches, num_batches=2) == 2
    outs = [model[1](x).detach() for x, _ in batches[:2]]  # dropout off during recalibration
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.transpose(0, 1).flatten(1).var(1) for o in outs]).mean(0)
    torch.testing.assert_close(model[2].running_mean, mean)
    torch.testing.assert_close(model[2].running_var, var)
    assert model.training and model[0].training and model[2].momentum == 0.1
    assert model[1].weight.grad is None
    with pytest.raises(UserError, match="num_batches"):
        recalibrate_bn(model, batches, num_batches=0)
    with pytest.raises(UserError, match="batches: expected at least one batch"):
        recalibrate_bn(model, [], num_batches=1)
