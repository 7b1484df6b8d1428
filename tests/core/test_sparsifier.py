"""The Sparsifier: enforcement invariants, monotone vs recompute, persistence, layers, criteria."""

from __future__ import annotations

import copy
import io
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.importance import CRITERIA, LayerView, batchnorm_scales, taylor_evidence
from prunekit.core.selection import keep_count
from prunekit.core.layers import select_layers
from prunekit.core.sparsifier import Sparsifier
from prunekit.train.masking import EnforceMasks, MovementScores
from prunekit.errors import UserError


def conv_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 4, (4,), generator=g)


def loss_of(model: nn.Module, seed: int) -> torch.Tensor:
    x, y = batch(seed)
    return F.cross_entropy(model(x), y)


# --------------------------------------------------------------- invariant
@pytest.mark.parametrize("granularity", ["weight", "filter"])
@pytest.mark.parametrize("make_optimizer,state_keys", [
    (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4), ("momentum_buffer",)),
    (lambda p: torch.optim.AdamW(p, lr=0.01), ("exp_avg", "exp_avg_sq")),
])
def test_pruned_entries_stay_zero_with_their_optimizer_state(granularity, make_optimizer, state_keys):
    model = conv_net()
    sparsifier = Sparsifier(model, granularity, include_classifier=True)
    sparsifier.update(0.5 if granularity == "filter" else 0.7)
    masks = {name: mask.clone() for name, mask in sparsifier.masks().items()}
    before = {name: layer.weight.detach().clone() for name, layer in sparsifier.layers.items()}
    optimizer = make_optimizer(model.parameters())
    for step in range(100):
        optimizer.zero_grad()
        loss_of(model, step).backward()
        optimizer.step()
        sparsifier.enforce(optimizer)
        for name, layer in sparsifier.layers.items():
            pruned = masks[name] == 0
            assert not layer.weight[pruned].any()
            assert not layer.weight.grad[pruned].any()
            for key in state_keys:
                assert not optimizer.state[layer.weight][key][pruned].any()
    for name, layer in sparsifier.layers.items():
        assert (layer.weight.detach() != before[name])[masks[name] == 1].all()
        assert torch.equal(sparsifier.masks()[name], masks[name])


def test_enforce_masks_hook_uses_the_trainer_optimizer():
    model = conv_net()
    sparsifier = Sparsifier(model)
    sparsifier.update(0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_of(model, 0).backward()
    optimizer.step()
    hook = EnforceMasks(sparsifier)
    hook.after_optimizer_step(SimpleNamespace(optimizer=optimizer))
    first = model[0]
    assert not optimizer.state[first.weight]["momentum_buffer"][first.weight_mask == 0].any()
    assert hook.state_dict()["masks"].keys() == sparsifier.state_dict()["masks"].keys()


# ------------------------------------------------------ monotone / recompute
def test_monotone_never_revives_and_recompute_follows_magnitudes():
    for monotone in (True, False):
        model = conv_net()
        sparsifier = Sparsifier(model, monotone=monotone)
        sparsifier.update(0.6)
        first = {name: mask.clone() for name, mask in sparsifier.masks().items()}
        torch.manual_seed(5)
        for layer in sparsifier.layers.values():
            nn.init.normal_(layer.weight)  # pruned entries get large values again
        sparsifier.update(0.4)
        for name, layer in sparsifier.layers.items():
            mask = sparsifier.masks()[name]
            if monotone:
                assert torch.equal(mask, first[name])  # 0.4 asked, 0.6 already pruned: nothing returns
            else:
                k = keep_count(mask.numel(), 0.4)
                expected = torch.zeros(mask.numel())
                expected[layer.weight.detach().abs().flatten().topk(k).indices] = 1
                assert torch.equal(mask.flatten(), expected)


def test_monotone_keeps_pruning_further():
    sparsifier = Sparsifier(conv_net())
    sparsifier.update(0.3)
    first = {name: mask.clone() for name, mask in sparsifier.masks().items()}
    sparsifier.update(0.8)
    for name, mask in sparsifier.masks().items():
        assert not mask[first[name] == 0].any()
        assert int(mask.sum()) == round(0.2 * mask.numel())


# ------------------------------------------------------------- persistence
def test_state_dict_round_trip_into_a_fresh_model():
    model = conv_net(0)
    sparsifier = Sparsifier(model, "kernel", "random", seed=3)
    sparsifier.update(0.5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "masks": sparsifier.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert not any(key.endswith("weight_mask") for key in saved["model"])  # plain model state
    conv_net(1).load_state_dict(saved["model"])  # strict: loads into a model without masks

    fresh = conv_net(1)
    restored = Sparsifier(fresh, "kernel", "random", seed=99)
    fresh.load_state_dict(saved["model"])
    restored.load_state_dict(saved["masks"])
    for name, mask in sparsifier.masks().items():
        assert torch.equal(restored.masks()[name], mask)
    sparsifier.update(0.8)
    restored.update(0.8)  # the random generator state came back too
    for name, mask in sparsifier.masks().items():
        assert torch.equal(restored.masks()[name], mask)


def test_load_state_dict_rejects_other_layers():
    state = Sparsifier(conv_net()).state_dict()
    with pytest.raises(UserError, match="saved layers"):
        Sparsifier(conv_net(), include_classifier=True).load_state_dict(state)


def test_deepcopy_keeps_masks_and_a_new_sparsifier_adopts_them():
    model = conv_net()
    sparsifier = Sparsifier(model, "filter")
    sparsifier.update(0.5)
    clone = copy.deepcopy(model)
    adopted = Sparsifier(clone, "filter")
    for name, mask in sparsifier.masks().items():
        assert torch.equal(adopted.masks()[name], mask)
        assert adopted.masks()[name].data_ptr() != mask.data_ptr()
    twin = copy.deepcopy(sparsifier)
    twin.update(0.75)
    assert sparsifier.realised_sparsity().total == pytest.approx(0.5)
    assert twin.realised_sparsity().total == pytest.approx(0.75)


def test_squash_removes_the_buffers():
    model = conv_net()
    sparsifier = Sparsifier(model)
    sparsifier.update(0.5)
    sparsifier.squash()
    assert not any("weight_mask" in name for name, _ in model.named_buffers())
    assert (model[0].weight == 0).float().mean() == pytest.approx(0.5, abs=0.01)


def test_refuses_layers_under_torch_prune():
    layer = nn.Conv2d(2, 2, 1)
    torch.nn.utils.prune.random_unstructured(layer, "weight", amount=0.5)
    with pytest.raises(UserError, match="torch.nn.utils.prune"):
        Sparsifier(layer)


# --------------------------------------------------------- layer selection
def test_layer_selection_defaults_patterns_and_types():
    model = conv_net()
    assert list(select_layers(model)) == ["0", "3"]  # first conv in, classifier out
    assert list(select_layers(model, include_first_conv=False, include_classifier=True)) == ["3", "8"]
    assert list(select_layers(model, ["*", "!3"], include_classifier=True)) == ["0", "8"]
    assert list(select_layers(model, types=(nn.Linear,), include_classifier=True)) == ["8"]
    with pytest.raises(UserError, match="no Conv2d/Linear layer matches"):
        Sparsifier(model, layers="features.*")


def test_overrides_pin_layers():
    sparsifier = Sparsifier(conv_net(), scope="global", overrides={"0": 0.0})
    sparsifier.update(0.9)
    realised = sparsifier.realised_sparsity().per_layer
    assert realised["0"] == 0 and realised["3"] == pytest.approx(0.9, abs=1e-2)
    with pytest.raises(UserError, match="matches none"):
        Sparsifier(conv_net(), overrides={"fc": 0.5})
    with pytest.raises(UserError, match=r"in \[0, 1\]"):
        Sparsifier(conv_net(), overrides={"0": 50})


def test_bad_options():
    with pytest.raises(UserError, match="scope: expected local or global"):
        Sparsifier(conv_net(), scope="layer")
    with pytest.raises(UserError, match="unknown criterion 'l3'"):
        Sparsifier(conv_net(), criterion="l3")


# ---------------------------------------------------------------- criteria
def test_builtin_criteria_are_registered():
    assert {"l1", "l2", "random", "taylor", "bn_scale", "movement"} <= set(CRITERIA.names())


def test_random_criterion_is_seeded():
    masks = []
    for seed in (1, 1, 2):
        sparsifier = Sparsifier(conv_net(), "weight", "random", seed=seed)
        sparsifier.update(0.5)
        masks.append(sparsifier.masks()["3"].clone())
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


def test_custom_criterion_function():
    def first_filters(layer: LayerView, granularity) -> torch.Tensor:
        return -torch.arange(layer.weight.shape[0], dtype=torch.float32)

    sparsifier = Sparsifier(conv_net(), "filter", first_filters)
    sparsifier.update(0.25)
    assert sparsifier.unit_masks()["3"].tolist() == [True] * 6 + [False] * 2


def test_taylor_criterion():
    model = conv_net()
    sparsifier = Sparsifier(model, "filter", "taylor")
    with pytest.raises(UserError, match="taylor_evidence"):
        sparsifier.update(0.5)
    evidence = taylor_evidence(sparsifier.layers, range(3), lambda seed: loss_of(model, seed))
    assert model[0].weight.grad is None
    best = evidence["3"].flatten(1).sum(1).argsort(descending=True)[:4]
    sparsifier.update(0.5, evidence=evidence)
    assert sparsifier.unit_masks()["3"].nonzero().flatten().tolist() == sorted(best.tolist())


def test_bn_scale_criterion():
    model = conv_net()
    with torch.no_grad():
        model[4].weight.copy_(torch.tensor([0.1, -3.0, 0.2, 2.0, -0.05, 1.0, 0.3, 0.0]))
    sparsifier = Sparsifier(model, "filter", "bn_scale", include_first_conv=False)
    sparsifier.update(0.5, evidence=batchnorm_scales(model, sparsifier.layers, batch(0)[0]))
    assert sparsifier.unit_masks()["3"].tolist() == [False, True, False, True, False, True, True, False]
    assert model.training
    with pytest.raises(UserError, match="needs granularity 'filter'"):
        Sparsifier(model, "weight", "bn_scale").update(0.5, evidence={})
    with pytest.raises(UserError, match="no BatchNorm directly after layer"):
        batchnorm_scales(model, select_layers(model, include_classifier=True), batch(0)[0])


def test_movement_hook_accumulates():
    model = conv_net()
    sparsifier = Sparsifier(model, "weight", "movement")
    movement = MovementScores(sparsifier.layers)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = torch.zeros_like(model[3].weight)
    for step in range(3):
        optimizer.zero_grad()
        loss_of(model, step).backward()
        expected -= model[3].weight.detach() * model[3].weight.grad
        movement.before_optimizer_step(SimpleNamespace())
        optimizer.step()
    assert torch.allclose(movement.evidence["3"], expected)
    sparsifier.update(0.5, evidence=movement.evidence)
    kept = sparsifier.masks()["3"] == 1
    assert expected[kept].min() >= expected[~kept].max()
    restored = MovementScores(sparsifier.layers)
    restored.load_state_dict(movement.state_dict())
    assert torch.equal(restored.evidence["3"], movement.evidence["3"])


# ----------------------------------------------------------------- trainer
class TinyLoader:
    def __init__(self, batches: int) -> None:
        self.batches = [batch(seed) for seed in range(batches)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None: ...


def test_trainer_enforces_and_resumes_masks(tmp_path):
    from prunekit.train import TrainConfig, Trainer

    def run(epochs: int, prune: bool) -> Sparsifier:
        model = conv_net()
        sparsifier = Sparsifier(model, "weight", include_classifier=True)
        if prune:
            sparsifier.update(0.8)
        config = TrainConfig(epochs=epochs, lr=0.05, precision="fp32", channels_last=False)
        trainer = Trainer(model, TinyLoader(3), None, config, hooks=[EnforceMasks(sparsifier)], run_dir=tmp_path,
                          device="cpu")
        trainer.fit(resume=True)
        for layer in sparsifier.layers.values():
            state = trainer.optimizer.state[layer.weight]["momentum_buffer"]
            assert not layer.weight[layer.weight_mask == 0].any() and not state[layer.weight_mask == 0].any()
        return sparsifier

    trained = run(1, prune=True)
    resumed = run(2, prune=False)  # a fresh model whose masks come back from the checkpoint
    assert resumed.realised_sparsity().total == pytest.approx(0.8, abs=1e-3)
    for name, mask in trained.masks().items():
        assert torch.equal(resumed.masks()[name], mask)
