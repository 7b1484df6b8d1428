import subprocess
import sys

import pytest
import torch
from torch import nn

from prunekit.artifact import ModelSpec, load_artifact, save_artifact
from prunekit.errors import UserError
from prunekit.measure.latency import Latency, LatencyComparison, compare_latency, latency_grid, measure_latency
from prunekit.measure.sparsity import weight_sparsity
from prunekit.models import build_model


def test_latency_is_a_median_and_restores_training_mode():
    model = build_model("small_cnn", num_classes=10, in_channels=1).train()
    result = measure_latency(model, (1, 8, 8), batch_size=4, warmup=2, repeats=9)
    assert model.training
    assert 0 < result.p10_ms <= result.median_ms <= result.p90_ms
    assert result.images_per_s == pytest.approx(4 / (result.median_ms / 1000))


class _Recorder(nn.Module):
    """A conv that records, per call, what it was run with: batch, channels-last input, output dtype, mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.calls = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        self.calls.append((x.shape[0], x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
                           y.dtype, self.training))
        return y


def test_latency_grid_measures_each_batch_size_and_precision_as_labelled():
    model = _Recorder().train()
    grid = latency_grid(model, (3, 8, 8), warmup=1, repeats=3)
    assert [(r.batch_size, r.precision, r.repeats) for r in grid] == [
        (1, "fp32", 3), (1, "bf16", 3), (32, "fp32", 3), (32, "bf16", 3)]
    # 1 warm-up + 3 timed calls per cell, in eval mode; fp32 NCHW, bf16 autocast on channels-last input
    cells = [(1, False, torch.float32), (1, True, torch.bfloat16), (32, False, torch.float32), (32, True, torch.bfloat16)]
    assert model.calls == [(*cell, False) for cell in cells for _ in range(4)]
    assert model.training
    for r in grid:
        assert 0 < r.p10_ms <= r.median_ms <= r.p90_ms
        assert r.images_per_s == pytest.approx(r.batch_size / (r.median_ms / 1000))


def two_layer_net():
    net = nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.Conv2d(4, 4, 1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        for m in net:
            if hasattr(m, "weight"):
                m.weight.fill_(1.0)
        net[0].weight[0].zero_()          # 18 of 72 first-conv weights
        net[1].weight[:, :2].zero_()      # 8 of 16 second-conv weights
        net[3].weight[0].zero_()          # 4 of 12 linear weights
    return net


def test_compared_latency_times_both_in_rounds_and_finds_the_cheaper_model():
    heavy = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2048), nn.ReLU(), nn.Linear(2048, 2048))
    light = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 8))
    heavy.train()
    result = compare_latency(heavy, light, (3, 32, 32), batch_size=8, rounds=4, repeats=3, warmup=1)
    assert heavy.training  # restored
    assert len(result.ratios) == 4 and result.before.repeats == result.after.repeats == 12
    assert result.conclusive and result.speedup > 1 and result.spread[0] > 1  # dozens of times the MACs
    assert result.speedup == sorted(result.ratios)[1] / 2 + sorted(result.ratios)[2] / 2


def test_a_comparison_whose_rounds_disagree_is_inconclusive():
    lat = Latency(batch_size=1, precision="fp32", median_ms=1.0, p10_ms=0.9, p90_ms=1.1, repeats=3)
    mixed, clear = LatencyComparison(lat, lat, (0.9, 1.2, 1.1)), LatencyComparison(lat, lat, (1.3, 1.2, 1.4))
    assert not mixed.conclusive and mixed.describe() == ("1.10x (rounds 0.90-1.20x, 3 rounds); inconclusive: "
                                                         "the rounds disagree on which is faster")
    assert clear.conclusive and clear.describe() == "1.30x (rounds 1.20-1.40x, 3 rounds)"


def test_sparsity_states_what_it_covers():
    net = two_layer_net()
    conv = weight_sparsity(net, covers="conv")
    assert (conv.zeros, conv.total, conv.layers) == (26, 88, 2)
    no_first = weight_sparsity(net, covers="conv", include_first_conv=False)
    assert (no_first.zeros, no_first.total) == (8, 16)
    both = weight_sparsity(net, covers="conv+linear")
    assert both.fraction == pytest.approx(30 / 100)
    assert "conv+linear" in both.describe() and "first conv included" in both.describe()
    with pytest.raises(UserError, match="covers: expected one of"):
        weight_sparsity(net, covers="everything")


def test_saved_model_reloads_in_a_new_process_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10).eval()
    save_artifact(model, ModelSpec(model="resnet20", num_classes=10), tmp_path)
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(x), tmp_path / "expected.pt")
    code = (
        "import sys, torch; from prunekit.artifact import load_artifact;"
        "d = sys.argv[1]; m, _ = load_artifact(d); m.eval();"
        "x = torch.load(d + '/x.pt', weights_only=True);"
        "torch.save(m(x).detach(), d + '/actual.pt')"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=120)
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    actual = torch.load(tmp_path / "actual.pt", weights_only=True)
    assert torch.equal(expected, actual)


def test_loading_weights_into_the_wrong_architecture_is_a_user_error(tmp_path):
    save_artifact(build_model("resnet20"), ModelSpec(model="resnet20", num_classes=10), tmp_path)
    spec = (tmp_path / "model.json").read_text().replace('"resnet20"', '"resnet32"')
    (tmp_path / "model.json").write_text(spec)
    with pytest.raises(UserError, match="do not fit 'resnet32'"):
        load_artifact(tmp_path)
