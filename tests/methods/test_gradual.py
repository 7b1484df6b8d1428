import pytest
import torch
from torch import nn

from prunekit.core.schedules import build_schedule
from prunekit.core.selection import keep_count
from prunekit.core.sparsifier import Sparsifier
from prunekit.data import TensorLoader
from prunekit.methods.gradual import GradualPruning
from prunekit.train import Hook, TrainConfig, Trainer


def loaders(n=120, batch_size=20):
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 3, (n,), generator=g)
    images = torch.randint(0, 255, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    stats = dict(mean=(0.5,) * 3, std=(0.25,) * 3)
    train = TensorLoader(images, labels, batch_size=batch_size, shuffle=True, augment=False, **stats)
    test = TensorLoader(images, labels, batch_size=60, shuffle=False, augment=False, **stats)
    return train, test


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 3))


class EpochSparsity(Hook):
    """Records, at each epoch end, the pruned count of every pruned layer."""

    def __init__(self, sparsifier):
        self.sparsifier, self.counts = sparsifier, []

    def on_epoch_end(self, trainer, metrics):
        self.counts.append({n: int((m == 0).sum()) for n, m in self.sparsifier.masks().items()})


def expected_pruned(weight_count, sparsity):
    return weight_count - keep_count(weight_count, sparsity)


@pytest.mark.parametrize("name, start", [("one_cycle", 0.0), ("agp", 0.2), ("iterative", 0.2), ("one_shot", 0.4)])
@pytest.mark.parametrize("monotone", [True, False])
def test_realised_sparsity_follows_the_schedule_at_every_epoch_end(name, start, monotone):
    epochs, final = 5, 0.9
    net = model()
    sparsifier = Sparsifier(net, "weight", "l1", "local", types=(nn.Conv2d,), monotone=monotone)
    schedule = build_schedule(name, final, start=start)
    recorder = EpochSparsity(sparsifier)
    hook = GradualPruning(sparsifier, schedule)
    trainer = Trainer(net, *loaders(), TrainConfig(epochs=epochs, lr=0.05, precision="fp32"),
                      hooks=[hook, recorder])
    trainer.fit()
    sizes = {n: m.numel() for n, m in sparsifier.masks().items()}
    for epoch, counts in enumerate(recorder.counts, start=1):
        target = schedule(epoch / epochs)
        assert counts == {n: expected_pruned(size, target) for n, size in sizes.items()}, (epoch, target)
    assert hook.applied == final
    for layer in sparsifier.layers.values():  # exactly s_f at the end, and the weights obey the masks
        assert int((layer.weight == 0).sum()) >= expected_pruned(layer.weight.numel(), final)
        assert int((layer.weight_mask == 0).sum()) == expected_pruned(layer.weight.numel(), final)
    assert trainer.history[-1].extra["sparsity_target"] == final


def test_gradual_pruning_resumes_exactly(tmp_path):
    def run(run_dir, kill_at=None):
        net = model()
        sparsifier = Sparsifier(net, "weight", "l1", "local", types=(nn.Conv2d,))
        hooks = [GradualPruning(sparsifier, build_schedule("agp", 0.8, start=0.2))]
        if kill_at is not None:
            hooks.append(Kill(kill_at))
        trainer = Trainer(net, *loaders(), TrainConfig(epochs=4, lr=0.05, precision="fp32"), hooks=hooks,
                          run_dir=run_dir)
        return trainer

    class Kill(Hook):
        def __init__(self, step):
            self.step = step

        def on_step_begin(self, trainer):
            if trainer.global_step == self.step:
                raise KeyboardInterrupt

    reference = run(tmp_path / "a")
    reference.fit()
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", kill_at=15).fit()
    resumed = run(tmp_path / "b")
    resumed.fit(resume=True)
    for (name, a), b in zip(reference.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_gradual_filter_pruning_trains_a_model_equal_to_its_compacted_form():
    from prunekit.core.compaction import compact
    from prunekit.core.layers import filter_prunable_layers

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 3))
    example = torch.zeros(1, 3, 8, 8)
    sparsifier = Sparsifier(net, "filter", "l1", "local", filter_prunable_layers(net, example))
    sparsifier.couple_channels(net, example)
    hook = GradualPruning(sparsifier, build_schedule("agp", 0.5, start=0.2))
    Trainer(net, *loaders(), TrainConfig(epochs=3, lr=0.05, precision="fp32"), hooks=[hook]).fit()
    assert hook.applied == 0.5
    # the BN of every pruned channel was held at zero, so removing the channels changes nothing
    bn = net[1]
    pruned = ~sparsifier.unit_masks()["0"]
    assert pruned.sum() == 8 and torch.all(bn.weight[pruned] == 0) and torch.all(bn.bias[pruned] == 0)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        before = net.eval()(x)
    keep = {name: mask.nonzero().flatten() for name, mask in sparsifier.unit_masks().items()}
    sparsifier.squash()
    compacted = compact(net, keep, example).model
    with torch.no_grad():
        assert torch.allclose(compacted.eval()(x), before, atol=1e-5)
