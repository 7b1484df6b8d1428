"""The AutoBot method: gate training on the frozen network, the baselines, the CLI and the saved model."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cli_runner import run_cli
from prunekit.artifact import ModelSpec, load_artifact, save_artifact
from prunekit.core.gate_costs import GateCosts
from prunekit.core.gate_losses import bool_loss, flops_loss
from prunekit.core.gate_selection import BestGates
from prunekit.core.gates import gate_values, gates, insert_gates
from prunekit.core.scatter import ScatterBlock
from prunekit.data import DataBundle, TensorLoader
from prunekit.experiment.recipe import RecipeError, validate_prune
from prunekit.measure import count_macs
from prunekit.methods import MethodContext
from prunekit.methods.autobot import AutoBot, GateTraining
from prunekit.models import build_model
from prunekit.train import Hook, TrainConfig, Trainer

SHAPE = (3, 16, 16)  # CIFAR ResNets run on any size; 16 px keeps the steps cheap
X = torch.zeros(1, *SHAPE)
SRC = Path(__file__).resolve().parents[2] / "src"


def resnet20() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("resnet20")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model.eval()


def bundle(batch_size: int = 16, n: int = 96) -> DataBundle:
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 255, (n, *SHAPE), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    stats = dict(mean=(0.5,) * 3, std=(0.25,) * 3)
    return DataBundle(TensorLoader(images, labels, batch_size=batch_size, shuffle=True, augment=True, **stats),
                      TensorLoader(images, labels, batch_size=48, shuffle=False, augment=False, **stats), 10, SHAPE,
                      "random")


def context(run_dir: Path, seed: int = 0) -> MethodContext:
    def fit(model, config, hooks, data=None):
        trainer = Trainer(model, data.train, data.test, config, hooks=hooks, run_dir=run_dir, device="cpu")
        return trainer, trainer.fit(resume=True)

    return MethodContext(seed, SHAPE, torch.device("cpu"), data_factory=lambda **changes: bundle(**changes),
                         fit_fn=fit)


def method(**keys) -> AutoBot:
    return validate_prune({"method": "autobot", "target": "macs=0.5", **keys})


# ------------------------------------------------------------------ gate training
class Record(Hook):
    """Gate values at each step's start, its CE (from the logits) and its loss."""

    def __init__(self):
        self.gates, self.ce, self.loss = [], [], []

    def on_step_begin(self, trainer):
        self.gates.append(gate_values(trainer.model))

    def extra_loss(self, trainer, outputs, targets):
        self.ce.append(float(F.cross_entropy(outputs.detach(), targets)))

    def on_step_end(self, trainer, loss):
        self.loss.append(float(loss))


def test_gate_training_loss_and_kept_gates_follow_the_paper(tmp_path):
    model = resnet20()
    costs = GateCosts.build(model, X, scatter=True)
    insert_gates(model, X, residual="scatter")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense, target = costs.dense_macs(), 0.5 * costs.dense_macs()
    hook = GateTraining(costs, target, dense, beta=6.0, gamma=0.2, best=BestGates(0.6), steps=10)
    record = Record()
    config = TrainConfig(steps=10, optimizer="adam", lr=0.5, weight_decay=0.0, lr_plan="constant",
                         trainable=("*.gate.alpha",), eval_mode=True, precision="fp32")
    Trainer(model, bundle().train, None, config, hooks=[record, hook], device="cpu").fit()
    for step in range(10):
        values = record.gates[step]
        expected = (record.ce[step] + 6 * float(flops_loss(costs.soft_macs(values), target, dense))
                    + 0.2 * float(bool_loss(list(values.values()))))
        assert record.loss[step] == pytest.approx(expected, rel=1e-5)
    best = min(range(7, 10), key=lambda i: record.loss[i])  # steps i > 0.6 · 10
    assert hook.best.step == best
    assert all(torch.equal(hook.best.gates[r], v) for r, v in record.gates[best].items())
    assert not all(torch.equal(record.gates[0][r], v) for r, v in record.gates[best].items())
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith(".gate.alpha") for k in changed)  # weights and BN statistics frozen


def test_autobot_prunes_to_the_target_and_the_pruned_model_is_the_zero_one_gated_one(tmp_path):
    model = resnet20()
    original = copy.deepcopy(model)
    result = method(batches=6, batch_size=16).prune(model, context(tmp_path))
    summary, pruned = result.summary, result.model
    target = 0.5 * count_macs(original, X).total
    assert summary["gate_steps"] == 6 and summary["kept_step"] in (4, 5)
    assert summary["residual"] == "scatter" and summary["target_macs"] == round(target)
    assert summary["macs_internal"] == count_macs(pruned, X).total <= target
    assert summary["max_abs_diff_vs_gated"] < 1e-4
    assert not gates(pruned) and all(isinstance(b, ScatterBlock) for s in (1, 2, 3)
                                     for b in pruned.get_submodule(f"layer{s}"))
    assert torch.equal(pruned.conv1.weight, original.conv1.weight) and torch.equal(pruned.fc.weight, original.fc.weight)
    kept = summary["kept_channels"]
    assert set(kept) == {f"layer{s}.{b}.conv{c}" for s in (1, 2, 3) for b in range(3) for c in (1, 2)}
    block = pruned.layer2[1]
    assert [block.conv1.out_channels, block.conv2.out_channels] == [kept["layer2.1.conv1"][0], kept["layer2.1.conv2"][0]]
    assert torch.equal(block.conv2.weight, original.layer2[1].conv2.weight[block.scatter.index][:, _kept_rows(
        original.layer2[1].conv1.weight, block.conv1.weight)])


def test_gate_training_reports_its_passes_and_warns_when_it_repeats_images(tmp_path, caplog):
    one_pass = method(batches=6, batch_size=16).prune(resnet20(), context(tmp_path / "a")).summary
    assert one_pass["gate_training_passes"] == 1.0 and "no repetition" not in caplog.text
    repeated = method(batches=9, batch_size=16).prune(resnet20(), context(tmp_path / "b")).summary
    assert repeated["gate_training_passes"] == 1.5 and repeated["gate_steps"] == 9
    assert "batches: 9 gate-training batches are 1.50 passes over the 6 batches" in caplog.text


def _kept_rows(dense: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Indices of the dense filters the pruned weight kept (kept filters keep their weights)."""
    return [next(i for i in range(len(dense)) if torch.equal(dense[i], row)) for row in pruned]


def test_a_resumed_prune_stage_keeps_the_same_gates_without_training_again(tmp_path):
    first = method(batches=5, batch_size=16).prune(resnet20(), context(tmp_path)).summary
    second = method(batches=5, batch_size=16).prune(resnet20(), context(tmp_path)).summary
    assert second["kept_channels"] == first["kept_channels"] and second["kept_step"] == first["kept_step"]
    assert second["gate_training_wall_time_s"] == first["gate_training_wall_time_s"]  # restored, not re-run


# --------------------------------------------------------------------- baselines
@pytest.mark.parametrize("threshold", ["closest", "counter"])
@pytest.mark.parametrize("scores", ["l1", "l1_uniform", "random"])
def test_baselines_meet_the_target_through_the_same_bisection(scores, threshold):
    model = resnet20()
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    summary = (result := method(scores=scores, threshold=threshold).prune(model, context(Path("unused")))).summary
    target = 0.5 * count_macs(resnet20(), X).total
    assert count_macs(result.model, X).total == summary["macs_internal"] <= target
    assert target - summary["macs_internal"] < 0.01 * target
    assert "gate_steps" not in summary and summary["max_abs_diff_vs_gated"] < 1e-4
    kept = {root: k / c for root, (k, c) in summary["kept_channels"].items()}
    if scores == "l1_uniform":  # the same fraction of every vector, up to one filter of the smallest
        assert max(kept.values()) - min(kept.values()) <= 1 / 16
    if scores == "l1":  # kept: normalised L1 above the threshold
        for root, (k, c) in summary["kept_channels"].items():
            norms = weights[root].abs().flatten(1).sum(1)
            assert k == max(1, int((norms / norms.max() > summary["threshold"]).sum()))


def test_official_threshold_mode_returns_the_last_threshold_tried():
    summary = method(scores="l1", threshold="official").prune(resnet20(), context(Path("unused"))).summary
    last_threshold, last_macs = summary["threshold_history"][-1]
    assert (summary["threshold"], summary["macs_internal"]) == (last_threshold, last_macs)
    target = summary["target_macs"]
    assert summary["threshold_iterations"] == 50 or abs(last_macs - target) <= 50_000


def test_random_scores_follow_the_seed():
    def kept(seed):
        return method(scores="random").prune(resnet20(), context(Path("unused"), seed)).summary["kept_channels"]

    assert kept(0) == kept(0) != kept(1)


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize("keys, message", [
    ({"target": "filters=0.5"}, "prune.target: autobot prunes to a MACs target; write macs=F"),
    ({"target": "macs=1"}, "prune.target: expected macs=F with F strictly between 0 and 1"),
    ({"target": 0.5}, "prune.target: needs the unit: write macs=0.5"),
    ({"init": 1.0}, "prune.init: expected a number in (0, 1), got 1.0"),
    ({"keep_after": 1.0}, "prune.keep_after: expected a number in [0, 1), got 1.0"),
    ({"batches": 2}, "prune.batches: 2 batches leave no step after keep_after = 0.6"),
    ({"lr": 0.0}, "prune.lr: expected a number > 0"),
    ({"residual": "shared"}, "prune.residual:"),
    ({"threshold": "last"}, "prune.threshold:"),
    ({"scores": "l2"}, "prune.scores:"),
    ({"betta": 6}, "prune.betta: unknown key; did you mean 'beta'?"),
])
def test_bad_keys_are_one_problem_naming_the_key(keys, message):
    with pytest.raises(RecipeError) as error:
        validate_prune({"method": "autobot", "target": "macs=0.5", **keys})
    assert len(error.value.problems) == 1 and str(error.value).startswith(message)


def test_defaults_are_the_papers_cifar_settings():
    m = method()
    assert (m.lr, m.beta, m.gamma, m.batches, m.batch_size, m.init, m.keep_after) == (0.5, 6, 0.2, 200, 64, 0.9, 0.6)
    assert (m.threshold, m.tolerance, m.iterations, m.residual, m.scores) == ("closest", 50_000, 50, "auto", "gates")


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def digits_models(tmp_path_factory):
    """An (untrained) ResNet-20 and small CNN saved for the digits data set (1 × 8 × 8)."""
    out = tmp_path_factory.mktemp("models")
    for name in ("resnet20", "small_cnn"):
        torch.manual_seed(0)
        save_artifact(build_model(name, in_channels=1).eval(),
                      ModelSpec(name, 10, in_channels=1, input_shape=(1, 8, 8), data="digits"), out / name)
    return out


@pytest.mark.slow
def test_cli_prunes_saves_and_a_new_process_loads_the_same_model(capsys, tmp_path, digits_models):
    code, out, err = run_cli(capsys, "prune", digits_models / "resnet20", "--method", "autobot", "--target", "macs=0.5",
                             "--batches", "4", "--batch-size", "16", "--data-dir", tmp_path, "--device", "cpu",
                             "--out", tmp_path / "p")
    assert code == 0, err
    summary = json.loads((tmp_path / "p" / "prune.json").read_text())
    assert summary["method"] == "autobot" and summary["compacted"] and summary["residual"] == "scatter"
    assert summary["macs_after"] == summary["macs_internal"] <= 0.5 * summary["macs_before"]
    assert 0 <= summary["test_acc_after_prune"] <= 1 and summary["gate_steps"] == 4
    model, spec = load_artifact(tmp_path / "p")
    assert [t["name"] for t in spec.transforms] == ["scatter_residual"] and spec.manifest is not None
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys, torch; from prunekit.artifact import load_artifact; m, _ = load_artifact(sys.argv[1]); "
              "torch.save(m.eval()(torch.load(sys.argv[2])).detach(), sys.argv[3])")
    subprocess.run([sys.executable, "-c", script, tmp_path / "p", tmp_path / "x.pt", tmp_path / "y.pt"], check=True,
                   env={"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"})
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "y.pt"), model.eval()(x))
    code, _, err = run_cli(capsys, "export", tmp_path / "p", "--onnx", tmp_path / "m.onnx")
    assert code == 0 and (tmp_path / "m.onnx").is_file(), err


@pytest.mark.parametrize("model, args, message", [
    ("resnet20", ["--target", "filters=0.5"], "--target: autobot prunes to a MACs target"),
    ("resnet20", ["--target", "macs=0.5", "--batches", "2"], "--batches: 2 batches leave no step"),
    ("resnet20", ["--target", "macs=0.5"], "--data-dir: this method needs the data set"),
    ("small_cnn", ["--target", "macs=0.5", "--residual", "scatter", "--scores", "l1"],
     "residual: 'scatter' needs a CIFAR ResNet"),
])
def test_bad_cli_values_are_one_line_errors(capsys, tmp_path, digits_models, model, args, message):
    code, _, err = run_cli(capsys, "prune", digits_models / model, "--method", "autobot", *args,
                           "--out", tmp_path / "o")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err
