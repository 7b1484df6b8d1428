"""The recipes of the Network Pruning That Matters experiment (METHODS §2.7) say what the paper's arms are."""

from pathlib import Path

import pytest

from prunekit.experiment.recipe import load_recipe
from prunekit.methods import plugins_for
from prunekit.train.lr_plans import build_lr_plan, epoch_table

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes" / "nptm"
STEPS = 391  # CIFAR-10 at batch 128

# per-epoch LR of each arm with t = 10 after T = 30 (drops after epochs 15 and 22), METHODS §2.4
EXPECTED = {
    "finetune": [0.001] * 10,
    "lr_rewind": [0.01, 0.01] + [0.001] * 8,          # original epochs 20, 21 at 0.01; 22-29 at 0.001
    "weight_rewind": [0.01, 0.01] + [0.001] * 8,
    "scaled_restart": [0.001] + [0.1] * 4 + [0.01] * 2 + [0.001] * 3,  # W = 1, m1 = 4, m2 = 6
}


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipes name the committed checkpoint relative to the repository


def arm(plan: str):
    return load_recipe(RECIPES / f"{plan}.yaml")


def plan_of(recipe, steps: int = STEPS):
    spec = recipe.retrain
    return build_lr_plan(spec.lr_plan, lr=spec.lr, epochs=spec.epochs, steps_per_epoch=steps, **spec.lr_plan_args)


def test_dense_recipe_is_the_compressed_step_schedule():
    dense = arm("dense")
    plan = build_lr_plan(dense.train.lr_plan, lr=dense.train.lr, epochs=dense.train.epochs, steps_per_epoch=STEPS,
                         **dense.train.lr_plan_args)
    lrs = [row["lr"] for row in epoch_table(plan, STEPS)]
    assert lrs == pytest.approx([0.1] * 15 + [0.01] * 7 + [0.001] * 8, rel=1e-12)
    assert (dense.train.momentum, dense.train.nesterov, dense.train.weight_decay) == (0.9, False, 1e-4)
    assert dense.train.rewind_points == [15, 20, 22]


@pytest.mark.parametrize("plan", sorted(EXPECTED))
def test_arm_lr_per_epoch_matches_the_worked_rule(plan):
    lrs = [row["lr"] for row in epoch_table(plan_of(arm(plan)), STEPS)]
    assert lrs == pytest.approx(EXPECTED[plan], rel=1e-12)


def test_one_cycle_arm_start_peak_end_and_momentum():
    recipe = arm("one_cycle")
    assert recipe.retrain.lr_plan == "cyclic_restart"  # the 1-cycle arm's plan (CLR, METHODS §2.4.5)
    plan = plan_of(recipe)
    total = 10 * STEPS
    peak = int(0.1 * total - 1)
    assert plan.lr(0) == pytest.approx(0.001) and plan.lr(peak) == pytest.approx(0.1)
    assert plan.lr(total - 1) == pytest.approx(1e-5)
    assert (plan.momentum(0), plan.momentum(peak), plan.momentum(total - 1)) == pytest.approx((0.95, 0.85, 0.95))


@pytest.mark.parametrize("plan", ["finetune", "lr_rewind", "weight_rewind", "scaled_restart", "one_cycle"])
def test_arms_share_everything_but_the_lr_plan(plan):
    recipe, reference = arm(plan), arm("finetune")
    dense = arm("dense")
    assert recipe.train.checkpoint == "benchmarks/checkpoints/resnet20_cifar10_step30"
    assert (recipe.prune.method, recipe.prune.config, recipe.prune.criterion) == ("filter_config", "resnet20-B", "l1")
    ignore = {"lr", "lr_plan", "lr_plan_args"}
    assert recipe.retrain.model_dump(exclude=ignore) == reference.retrain.model_dump(exclude=ignore)
    assert recipe.retrain.epochs == 10 and recipe.data == dense.data
    shared = ("optimizer", "momentum", "nesterov", "weight_decay", "precision")
    assert [getattr(recipe.retrain, k) for k in shared] == [getattr(dense.train, k) for k in shared]
    if plan in ("lr_rewind", "weight_rewind"):  # the plan replays exactly the dense run's schedule
        args = recipe.retrain.lr_plan_args
        assert args["original_epochs"] == dense.train.epochs
        assert args["original_milestones"] == dense.train.lr_plan_args["milestones"]
        assert recipe.retrain.lr == dense.train.lr


def test_weight_rewind_arm_finds_its_rewind_point_in_the_checkpoint():
    recipe = arm("weight_rewind")
    assert plugins_for(recipe)[-1].epoch == 20
    assert (ROOT / recipe.train.checkpoint / "rewind" / "epoch-0020.safetensors").is_file()
