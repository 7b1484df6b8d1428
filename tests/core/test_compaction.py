"""Compaction: channel groups, masks = removal, optimizer re-binding, manifest reload, ONNX, report.

Every model of issue 4 compacts, with these groups blocked (asserted in ``test_blocked``):

* CIFAR ResNet-20/56 (option A): the residual width (stem conv and every block's conv2),
  coupled to the zero-padding ``PadShortcut``; block-internal channels (conv1) compact.
* tv:regnet_x_400mf: each block's ``f.a``/``f.b`` channels, coupled to the grouped 3x3 conv;
  the residual width compacts.
* tv:convnext_tiny: the residual width of each stage, coupled to LayerNorm (normalises across
  channels, so a mask cannot reproduce removal); the MLP hidden channels compact.
* every model: the classifier's output channels (the model's output).

Also blocked anywhere: channels that pass through a permute/transpose and a reshape (e.g. a
channels-last flatten into a Linear), a pixel/channel shuffle, or an unsupported layer type.
"""

from __future__ import annotations

import copy
import math
import statistics
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.artifact import ModelSpec, save_artifact
from prunekit.core.compaction import apply_manifest, compact
from prunekit.core.groups import channel_groups, group_masks
from prunekit.core.importance import l1_filter_scores
from prunekit.core.manifest import Manifest
from prunekit.core.report import compaction_report
from prunekit.core.selection import top_k_indices
from prunekit.errors import UserError
from prunekit.measure.macs import count_macs
from prunekit.measure.params import count_params
from prunekit.models import build_model

REMOVED = 0.4


def _model(name: str) -> nn.Module:
    """A seeded model whose BN statistics, biases and layer scales are far from their init."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=10)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
        for name_, p in model.named_parameters():
            if name_.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "layer_scale" in name_:
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g))
    return model


def _batch(name: str) -> torch.Tensor:
    size = 64 if name.startswith("tv:") else 32
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))


def _l1_keep(model: nn.Module, groups, removed: float = REMOVED, round_to: int = 1) -> dict[str, torch.Tensor]:
    """Local L1 (PFEC): each unblocked group keeps the filters of its root with the largest L1 norm."""
    modules = dict(model.named_modules())
    return {g.root: top_k_indices(l1_filter_scores(modules[g.root].weight), g.keep_count(removed, round_to))
            for g in groups if not g.blocked}


def _eval(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    model.train()
    optimizer.zero_grad()
    F.cross_entropy(model(x), torch.tensor([1, 7])).backward()
    optimizer.step()


def _assert_step_changes_every_parameter(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_step(model, optimizer, x)
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing[:5]}"
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"the optimizer step left {len(unchanged)} parameters unchanged, e.g. {unchanged[:5]}"


slow = pytest.mark.slow
MODELS = ["resnet20", "resnet56", "vgg16_bn", "mobilenetv2", "tv:resnet18", "tv:resnet50", "tv:mobilenet_v2",
          pytest.param("tv:vgg16_bn", marks=slow), pytest.param("tv:densenet121", marks=slow),
          "tv:efficientnet_b0", "tv:regnet_x_400mf", "tv:convnext_tiny"]


@pytest.mark.parametrize("name", MODELS)
def test_compaction_equals_masking_and_trains(name: str) -> None:
    model, x = _model(name), _batch(name)
    example = x[:1]
    groups = channel_groups(model, example)
    keep = _l1_keep(model, groups)
    assert keep, "no compactable group"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3)
    macs, params = count_macs(model, example).total, count_params(model)
    with torch.no_grad():  # the masked model, as the Sparsifier leaves it
        weights = dict(model.named_parameters())
        for param, mask in group_masks(groups, keep).items():
            weights[param].mul_(mask)
    masked = _eval(model, x)

    result = compact(model, keep, example, optimizer=optimizer)

    out = _eval(model, x)
    assert torch.allclose(out, masked, rtol=1e-4, atol=1e-4), (out - masked).abs().max()
    assert result.max_abs_diff is not None
    modules = dict(model.named_modules())
    for root, kept in keep.items():
        layer = modules[root]
        assert getattr(layer, "out_channels", getattr(layer, "out_features", None)) == len(kept)
    assert count_macs(model, example).total < macs and count_params(model) < params
    _assert_step_changes_every_parameter(model, optimizer, x)


@pytest.mark.parametrize(("name", "layer", "op"), [
    ("resnet56", "conv1", "PadShortcut"),
    ("resnet20", "layer2.1.conv2", "PadShortcut"),
    ("tv:regnet_x_400mf", "trunk_output.block1.block1-0.f.a.0", "grouped conv"),
    ("tv:regnet_x_400mf", "trunk_output.block1.block1-0.f.b.0", "grouped conv"),
    ("tv:convnext_tiny", "features.0.0", "LayerNorm"),
    ("tv:resnet18", "fc", "model's output"),
])
def test_blocked(name: str, layer: str, op: str) -> None:
    model, example = _model(name), _batch(name)[:1]
    with pytest.raises(UserError, match=op) as error:
        compact(model, {layer: torch.tensor([0])}, example)
    assert repr(layer) in str(error.value)


class _FlattenNet(nn.Module):
    """conv -> BN -> flatten of a 4x4 map (channel-major, or channels-last after a permute) -> Linear."""

    def __init__(self, permute: bool) -> None:
        super().__init__()
        self.permute = permute
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return self.fc(x.permute(0, 2, 3, 1).flatten(1) if self.permute else x.flatten(1))


def test_flatten_into_linear() -> None:
    """Torch-Pruning maps a channel-major flatten (spatial > 1) correctly, not one after a permute."""
    x = torch.randn(2, 3, 4, 4)
    model = _FlattenNet(permute=False)
    compact(model, {"conv": torch.tensor([0, 2, 5])}, x[:1])
    assert model.fc.in_features == 3 * 16
    model = _FlattenNet(permute=True)
    assert "permute" in channel_groups(model, x[:1], layers=["conv"])[0].blocked
    with pytest.raises(UserError, match="'conv'.*permute"):
        compact(model, {"conv": torch.tensor([0, 2, 5])}, x[:1])


def test_resnet56_option_a_keeps_the_residual_width() -> None:
    """Regression: Torch-Pruning treats PadShortcut as element-wise; the classifier once got 63 != 60 inputs."""
    model, x = _model("resnet56"), _batch("resnet56")
    groups = channel_groups(model, x[:1])
    prunable = sorted(g.root for g in groups if not g.blocked)
    block_conv1 = sorted(f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(9))
    assert prunable == block_conv1
    result = compact(model, _l1_keep(model, groups, removed=0.1), x[:1])
    assert model.fc.in_features == 64 and _eval(model, x).shape == (2, 10)
    assert len(result.manifest.kept) == 27
    widths = {b.conv2.in_channels for stage in (model.layer1, model.layer2, model.layer3) for b in stage}
    assert widths == {14, 29, 58}  # int(0.9 x 16/32/64) rounded: 14.4, 28.8, 57.6


def test_keep_by_any_coupled_layer() -> None:
    model, example = _model("tv:resnet18"), _batch("tv:resnet18")[:1]
    group = next(g for g in channel_groups(model, example) if "layer1.0.conv2" in g.out_layers)
    assert group.root == "conv1" and {"layer1.1.conv2"} <= set(group.out_layers)
    with pytest.raises(UserError, match="different keep sets"):
        compact(model, {"conv1": torch.arange(32), "layer1.1.conv2": torch.arange(1, 33)}, example)
    compact(model, {"layer1.1.conv2": torch.arange(32)}, example)
    assert model.conv1.out_channels == model.layer1[0].conv2.out_channels == model.layer2[0].conv1.in_channels == 32


def test_keep_is_validated() -> None:
    model, example = _model("resnet20"), _batch("resnet20")[:1]
    for bad, match in [(torch.tensor([], dtype=torch.long), "no channel"), (torch.tensor([0, 16]), r"\[0, 16\)"),
                       (torch.tensor([1, 1]), "distinct"), (torch.tensor([0.5]), "indices")]:
        with pytest.raises(UserError, match=match):
            compact(model, {"layer1.0.conv1": bad}, example)
    with pytest.raises(UserError, match="not a Conv/Linear"):
        compact(model, {"layer1.0.bn1": torch.tensor([0])}, example)


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    lambda ps: torch.optim.AdamW(ps, lr=1e-3),
], ids=["sgd-momentum", "adamw"])
def test_optimizer_rebound_mid_training(make) -> None:
    model, x = _model("tv:resnet18"), _batch("resnet20")  # 32x32 inputs keep it light
    optimizer = make(model.parameters())
    for _ in range(2):
        _train_step(model, optimizer, x)
    groups = channel_groups(model, x[:1])
    keep = _l1_keep(model, groups, removed=0.5)
    masks = group_masks(groups, keep)
    old = {n: dict(optimizer.state[p]) for n, p in model.named_parameters()}

    compact(model, keep, x[:1], optimizer=optimizer)

    params = dict(model.named_parameters())
    assert [id(p) for g in optimizer.param_groups for p in g["params"]] == [id(p) for p in params.values()]
    assert set(map(id, optimizer.state)) == set(map(id, params.values()))
    assert masks.keys() < params.keys()
    for name, p in params.items():
        for key, value in optimizer.state[p].items():
            expected = old[name][key]
            if value.shape == p.shape and name in masks:
                expected = expected[masks[name]].reshape(p.shape)  # the kept entries, in order
            assert torch.equal(value, expected), (name, key)
    _assert_step_changes_every_parameter(model, optimizer, x)


def test_save_new_process_load_identical(tmp_path) -> None:
    x = _batch("resnet20")
    outputs = {}
    for name in ("resnet20", "mobilenetv2"):
        model = _model(name)
        groups = channel_groups(model, x[:1])
        result = compact(model, _l1_keep(model, groups, round_to=8), x[:1])
        save_artifact(model, ModelSpec(model=name, num_classes=10), tmp_path / name, manifest=result.manifest)
        outputs[name] = _eval(model, x)
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch; torch.set_num_threads(1); from pathlib import Path;"
            "from prunekit.artifact import load_artifact; d = Path(sys.argv[1]);"
            "x = torch.load(d / 'x.pt', weights_only=True); out = {}\n"
            "for n in ('resnet20', 'mobilenetv2'):\n"
            "    m, spec = load_artifact(d / n); m.eval(); assert spec.manifest\n"
            "    with torch.no_grad(): out[n] = m(x)\n"
            "torch.save(out, d / 'out.pt')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=120)
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    for name, out in outputs.items():
        assert torch.equal(loaded[name], out), name
    assert sorted(p.name for p in (tmp_path / "resnet20").iterdir()) == ["model.json", "model.safetensors"]


def test_manifest_composes_and_round_trips() -> None:
    x = _batch("resnet20")
    model = _model("resnet20")
    first = compact(model, _l1_keep(model, channel_groups(model, x[:1]), removed=0.25), x[:1]).manifest
    second = compact(model, _l1_keep(model, channel_groups(model, x[:1]), removed=0.5), x[:1]).manifest
    both = Manifest.from_dict(first.then(second).to_dict())
    rebuilt = apply_manifest(build_model("resnet20", num_classes=10), both, x[:1])
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(_eval(rebuilt, x), _eval(model, x))
    with pytest.raises(UserError, match="sorted distinct"):
        Manifest.from_dict({**both.to_dict(), "layers": {"layer1.0.conv1": {"channels": 16, "kept": [3, 1]}}})
    with pytest.raises(UserError, match="manifest expects 99"):
        apply_manifest(build_model("resnet20"), Manifest({"layer1.0.conv1": 99}, {"layer1.0.conv1": (0,)}), x[:1])


def test_onnx_export_matches_onnxruntime(tmp_path) -> None:
    import onnxruntime  # a dev dependency (prunekit[onnx]): the test fails rather than skips without it

    from prunekit.export import export_onnx

    model, x = _model("resnet20"), _batch("resnet20")
    compact(model, _l1_keep(model, channel_groups(model, x[:1])), x[:1])
    path = export_onnx(model, x[:1], tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])  # batch 2: the batch dim is dynamic
    assert torch.allclose(got, _eval(model, x), atol=1e-4, rtol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_round_to_and_report() -> None:
    model, x = _model("mobilenetv2"), _batch("mobilenetv2")
    dense = copy.deepcopy(model)
    groups = channel_groups(model, x[:1])
    assert all(g.keep_count(0.4, round_to=8) % 8 == 0 for g in groups if g.channels >= 8)
    assert [g.keep_count(0.5, round_to=8) for g in groups[:1]] == [16]  # 32 channels
    compact(model, _l1_keep(model, groups, removed=0.37), x[:1])

    report = compaction_report(dense, model, (3, 32, 32), repeats=2, warmup=1)

    before, after = dict(dense.named_modules()), dict(model.named_modules())
    rows = {r.name: r for r in report.layers}
    assert list(rows) == [n for n, m in before.items() if isinstance(getattr(m, "weight", None), nn.Parameter)]
    for name, row in rows.items():
        assert (row.shape_before, row.shape_after) == (tuple(before[name].weight.shape), tuple(after[name].weight.shape))
        assert row.kept == math.prod(row.shape_after) / math.prod(row.shape_before)
        # at unchanged spatial sizes a conv's (no bias), a Linear's and a BN's MACs scale with its weight's size
        assert row.macs_after * math.prod(row.shape_before) == row.macs_before * math.prod(row.shape_after), name
    stem = rows["features.0.0"]  # 3x3 conv, stride 1, 32x32 outputs: 27 MACs per output element
    assert (stem.shape_after, stem.macs_before, stem.macs_after) == ((20, 3, 3, 3), 32 * 1024 * 27, 20 * 1024 * 27)
    assert report.macs_before == 91_278_080 and report.params_before == 2_236_682  # dense MobileNetV2 (CIFAR)
    # besides the weighted layers, only the global 4x4 average pool counts: 16 + 1 MACs per channel
    assert report.macs_before == sum(r.macs_before for r in rows.values()) + 17 * 1280
    assert report.macs_after == sum(r.macs_after for r in rows.values()) + 17 * after["classifier"].in_features
    assert report.params_after == sum(p.numel() for p in model.parameters())
    assert report.macs_ratio == report.macs_before / report.macs_after
    assert report.latency_before.batch_size == report.latency_after.batch_size == 1
    assert report.speedup == statistics.median(report.latency.ratios) and len(report.latency.ratios) == 5
    odd = report.hints[-2]  # removing 37% of 8k channels leaves widths like 20 and 10
    assert odd.startswith("48 compacted layers have output widths not a multiple of 8 (e.g. features.0.0 (20), "
                          "features.1.conv.0.0 (20), features.1.conv.1 (10)): choose keep counts with round_to=8")
    depthwise = [r for r in rows.values() if isinstance(after[r.name], nn.Conv2d) and after[r.name].groups > 1]
    share = sum(r.macs_after for r in depthwise) / report.macs_after
    assert len(depthwise) == 17 and report.hints[-1].startswith(f"depthwise convs carry {share:.0%} of the remaining")
