"""DistributedDataParallel under torchrun: 2 CPU processes with gloo, against one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cli_runner import run_cli
import yaml
from prunekit.data.loader import TensorLoader
from prunekit.distributed import DistContext, current, init_from_env
from prunekit.errors import UserError
from prunekit.train import TrainConfig, Trainer
from prunekit.train.parallel import from_sync_batchnorm, to_sync_batchnorm

HERE = Path(__file__).parent
WORKER = HERE / "worker.py"
AUDITED_CLI = HERE / "cli.py"
LAUNCH_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launch(script: Path, *args: object, nproc: int | None = 2, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``script ARGS`` under ``torchrun --standalone --nproc-per-node nproc`` (None: plain python)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV} | {"OMP_NUM_THREADS": "1"}
    runner = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.run([sys.executable, *runner, str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=cwd)


def report(folder: Path, rank: int) -> dict:
    return torch.load(folder / f"rank{rank}.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The gradual-pruning worker: one process with batch 16, two ranks with batch 8 each, and two
    ranks killed (rank 1 at the start of epoch 2) then resumed."""
    root = tmp_path_factory.mktemp("ddp")
    single = launch(WORKER, "--run-dir", root / "single", "--report", root / "r1", "--batch", 16, nproc=None)
    assert single.returncode == 0, single.stderr
    ddp = launch(WORKER, "--run-dir", root / "ddp", "--report", root / "r2", "--batch", 8)
    assert ddp.returncode == 0, ddp.stderr
    killed = launch(WORKER, "--run-dir", root / "killed", "--report", root / "rk", "--kill-rank", 1, "--kill-epoch", 2)
    assert killed.returncode != 0 and not (root / "rk").exists()
    resumed = launch(WORKER, "--run-dir", root / "killed", "--report", root / "rk")
    assert resumed.returncode == 0, resumed.stderr
    return root


def test_ranks_hold_identical_masks_and_weights_after_gradual_pruning(runs):
    rank0, rank1 = report(runs / "r2", 0), report(runs / "r2", 1)
    for name, mask in rank0["masks"].items():
        assert torch.equal(mask, rank1["masks"][name])
        assert 0 < int((mask == 0).sum()) < mask.numel()
    for name, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][name])


def test_ddp_equals_one_process_with_the_same_global_batch(runs):
    one, ddp = report(runs / "r1", 0), report(runs / "r2", 0)
    for name, mask in one["masks"].items():
        assert torch.equal(mask, ddp["masks"][name])
    for name, value in one["state"].items():
        torch.testing.assert_close(ddp["state"][name], value, rtol=1e-5, atol=1e-6)
    for (loss1, acc1, test1), (loss2, acc2, test2) in zip(one["history"], ddp["history"], strict=True):
        assert loss2 == pytest.approx(loss1, rel=1e-5) and acc2 == acc1 and test2 == test1  # summed over ranks


def test_resume_under_torchrun_after_one_rank_was_killed_equals_the_uninterrupted_run(runs):
    uninterrupted, resumed = report(runs / "r2", 0), report(runs / "rk", 0)
    for name, value in uninterrupted["state"].items():
        assert torch.equal(resumed["state"][name], value)
    assert resumed["history"] == uninterrupted["history"]


def test_multi_node_arguments_two_agents_of_one_process_each_train_alike(runs, tmp_path):
    """``--nnodes 2`` through a c10d rendezvous (both "nodes" on this machine) = the 2-process run."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV} | {"OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
                                "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                                "--rdzv-id=prunekit-test", str(WORKER), "--run-dir", tmp_path / "run", "--report",
                                tmp_path / "r"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
              for node in (0, 1)]
    for agent in agents:
        assert agent.wait(timeout=600) == 0, agent.stderr.read()
    two_nodes, one_node = report(tmp_path / "r", 1), report(runs / "r2", 0)
    for name, value in one_node["state"].items():
        assert torch.equal(two_nodes["state"][name], value)


def test_only_rank_0_writes(runs):
    assert json.loads((runs / "r2" / "writes1.json").read_text()) == []
    listing = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*"))  # noqa: E731
    assert listing(runs / "ddp") == listing(runs / "single")


def test_compaction_in_the_middle_of_ddp_training_rebuilds_the_wrapper_and_optimizer(tmp_path):
    """Filters removed after epoch 1 of 3: both ranks keep training alike, as one process does."""
    one = launch(WORKER, "--run-dir", tmp_path / "one", "--report", tmp_path / "r1", "--batch", 16, "--compact-after", 1,
                 nproc=None)
    assert one.returncode == 0, one.stderr
    two = launch(WORKER, "--run-dir", tmp_path / "two", "--report", tmp_path / "r2", "--compact-after", 1)
    assert two.returncode == 0, two.stderr
    single, rank0, rank1 = report(tmp_path / "r1", 0), report(tmp_path / "r2", 0), report(tmp_path / "r2", 1)
    assert single["widths"] == rank0["widths"] == rank1["widths"] == [4, 8]
    assert rank0["state"]["0.weight"].shape == (4, 3, 3, 3)
    for name, value in single["state"].items():
        assert torch.equal(rank0["state"][name], rank1["state"][name])
        torch.testing.assert_close(rank0["state"][name], value, rtol=1e-5, atol=1e-6)
    assert rank0["history"][-1] != rank0["history"][0]  # it trained after the compaction


def test_ranks_that_disagree_on_the_masks_stop_the_run(tmp_path):
    done = launch(WORKER, "--run-dir", tmp_path / "run", "--report", tmp_path / "r", "--disagree")
    assert done.returncode != 0
    assert "RankMismatch: masks differ between the 2 ranks" in done.stderr


def test_prunekit_run_of_a_recipe_under_torchrun(tmp_path, capsys):
    """A gradual-pruning recipe + retraining: same files and result columns as one process, rank 1 writes nothing."""
    path = tmp_path / "gradual.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "model": {"name": "small_cnn"}, "data": {"name": "digits", "batch_size": 32, "subset": 256},
        "prune": {"method": "gradual", "target": "filters=0.5", "granularity": "filter",
                  "train": {"epochs": 1, "optimizer": "adamw", "lr": 3.0e-3, "precision": "fp32"}},
        "compact": True,
        "retrain": {"epochs": 1, "optimizer": "adamw", "lr": 1.0e-3, "lr_plan": "cosine", "precision": "fp32"}}))
    done = launch(AUDITED_CLI, tmp_path / "two", tmp_path / "report", "--", "run", path, "--out", tmp_path / "two",
                  cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "torchrun: 2 processes, batch 32 per rank = 64 global, LR scaling none" in done.stdout
    assert json.loads((tmp_path / "report" / "writes1.json").read_text()) == []
    code, _, err = run_cli(capsys, "run", path, "--out", tmp_path / "one")
    assert code == 0, err
    (two,), (one,) = (list((tmp_path / d).glob("tiny-*/s0")) for d in ("two", "one"))
    assert json.loads((two / "run.json").read_text())["launch"] == {"world_size": 2, "scale_lr": "none",
                                                                     "sync_batchnorm": False}
    listing = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".lock" not in p.name)  # noqa: E731
    assert listing(two) == listing(one)
    result_two, result_one = (json.loads((d / "result.json").read_text()) for d in (two, one))
    assert result_two.keys() == result_one.keys() and result_two["status"] == "done"
    assert result_two["macs"] == result_one["macs"]  # the same channels survive on both launches
    assert 0 <= result_two["final_test_acc"] <= 1


TINY_RESNET = {"model": {"name": "resnet20"}, "data": {"name": "digits", "batch_size": 32, "subset": 256}}
PATHS = {
    "hyperspherical": {"train": {"epochs": 1, "optimizer": "sgd", "lr": 0.05, "precision": "fp32"},
                       "prune": {"method": "hyperspherical", "lam": 1.0, "sparsity": 0.5, "ratio": 0.5}},
    "autobot": {"train": {"epochs": 1, "optimizer": "sgd", "lr": 0.05, "precision": "fp32"},
                "prune": {"method": "autobot", "target": "macs=0.5", "batches": 6, "batch_size": 16}, "compact": True,
                "retrain": {"epochs": 1, "optimizer": "sgd", "lr": 0.01, "precision": "fp32"}},
    "weight_rewind": {"train": {"epochs": 3, "optimizer": "sgd", "lr": 0.05, "precision": "fp32", "lr_plan": "step",
                                "lr_plan_args": {"milestones": [2]}, "rewind_points": [2]},
                      "prune": {"method": "filter_config", "config": "resnet20-B", "criterion": "l1"},
                      "retrain": {"epochs": 1, "optimizer": "sgd", "lr": 0.05, "precision": "fp32",
                                  "lr_plan": "weight_rewind",
                                  "lr_plan_args": {"original_epochs": 3, "original_milestones": [2]}}},
}


@pytest.mark.parametrize("path", PATHS)
def test_every_training_path_runs_under_torchrun(tmp_path, path):
    """The hyperspherical penalty, AutoBot's gates (+ fine-tune), weight rewinding: done, rank 1 wrote nothing."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": path, **TINY_RESNET, **PATHS[path]}))
    done = launch(AUDITED_CLI, tmp_path / "runs", tmp_path / "report", "--", "run", recipe, "--out", tmp_path / "runs",
                  cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "report" / "writes1.json").read_text()) == []
    (run,) = (tmp_path / "runs").glob(f"{path}-*/s0")
    assert json.loads((run / "result.json").read_text())["status"] == "done"


# ------------------------------------------------------------------ in-process checks (no launch)
def loader(rank: int = 0, world_size: int = 1, batch_size: int = 4) -> TensorLoader:
    images = torch.zeros(16, 3, 4, 4, dtype=torch.uint8)
    return TensorLoader(images, torch.zeros(16, dtype=torch.long), batch_size=batch_size, shuffle=True,
                        augment=False, mean=(0.0,) * 3, std=(1.0,) * 3, rank=rank, world_size=world_size)


def tiny() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 2))


def test_world_size_without_a_process_group_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="WORLD_SIZE=2 is set but no process group is initialised"):
        Trainer(tiny(), loader(), None, TrainConfig(epochs=1), device="cpu")
    with pytest.raises(UserError, match="WORLD_SIZE=2 but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not set"):
        init_from_env()


def test_inconsistent_launch_is_one_line_exit_2(monkeypatch, capsys, tmp_path):
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "5"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "29999")):
        monkeypatch.setenv(name, value)
    code, _, err = run_cli(capsys, "train", "--model", "small_cnn", "--data", "digits", "--out", tmp_path / "r")
    assert code == 2
    assert err == "prunekit train: error: RANK='5', LOCAL_RANK='0': expected integers with 0 <= RANK < WORLD_SIZE=2\n"
    assert not (tmp_path / "r").exists()


def test_a_loader_of_another_shard_is_refused():
    with pytest.raises(UserError, match="a data loader is shard 1 of 2, but this is rank 0 of 1"):
        Trainer(tiny(), loader(rank=1, world_size=2), None, TrainConfig(epochs=1), device="cpu")


def test_linear_lr_scaling_multiplies_the_peak_by_the_world_size():
    ranks = DistContext(rank=1, world_size=2)
    config = TrainConfig(epochs=1, lr=0.1, lr_plan="constant")
    plain = Trainer(tiny(), loader(1, 2), None, config, device="cpu", dist=ranks)
    scaled = Trainer(tiny(), loader(1, 2), None, TrainConfig(epochs=1, lr=0.1, lr_plan="constant", scale_lr="linear"),
                     device="cpu", dist=ranks)
    assert plain.lr_plan.lr(0) == pytest.approx(0.1) and scaled.lr_plan.lr(0) == pytest.approx(0.2)
    assert len(plain.train_loader) == 2  # 8 of the 16 images per rank, batches of 4


def test_resume_with_another_world_size_is_refused(tmp_path):
    config = TrainConfig(epochs=2, lr=0.1, lr_plan="constant", precision="fp32")
    Trainer(tiny(), loader(), None, TrainConfig(epochs=1, lr=0.1, lr_plan="constant", precision="fp32"),
            run_dir=tmp_path, device="cpu").fit()
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    torch.save({**state, "world_size": 2}, tmp_path / "checkpoints" / "last.pt")
    with pytest.raises(UserError, match="written by a run of 2 process"):
        Trainer(tiny(), loader(), None, config, run_dir=tmp_path, device="cpu").fit(resume=True)


def test_run_resume_keeps_the_recorded_launch_options_and_refuses_others(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "model": {"name": "small_cnn"},
                                    "data": {"name": "digits", "batch_size": 64, "subset": 128},
                                    "train": {"epochs": 1, "optimizer": "adamw", "lr": 3.0e-3, "precision": "fp32"}}))
    code, _, err = run_cli(capsys, "run", path, "--out", tmp_path / "runs", "--scale-lr", "linear")
    assert code == 0, err
    (run,) = (tmp_path / "runs").glob("tiny-*/s0")
    assert json.loads((run / "run.json").read_text())["launch"]["scale_lr"] == "linear"
    assert run_cli(capsys, "run", "--resume", run)[0] == 0  # no flag: the recorded linear
    code, _, err = run_cli(capsys, "run", "--resume", run, "--scale-lr", "none")
    assert code == 2 and "was started with scale_lr linear, sync_batchnorm False, world_size 1" in err


def test_sync_batchnorm_on_a_cpu_is_refused_and_its_swap_shares_the_trained_tensors():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    with pytest.raises(UserError, match="SyncBatchNorm runs on CUDA only"):
        to_sync_batchnorm(model, torch.device("cpu"))
    before = {name: tensor for name, tensor in model.state_dict(keep_vars=True).items()}
    originals = to_sync_batchnorm(model, torch.device("cuda"))  # the swap itself needs no GPU
    assert sorted(originals) == ["1", "2.0"]
    assert isinstance(model[1], nn.SyncBatchNorm) and isinstance(model[2][0], nn.SyncBatchNorm)
    assert all(model.state_dict(keep_vars=True)[n] is t for n, t in before.items())
    from_sync_batchnorm(model, originals)
    assert type(model[1]) is nn.BatchNorm2d and type(model[2][0]) is nn.BatchNorm2d
    assert all(model.state_dict(keep_vars=True)[n] is t for n, t in before.items())
    to_sync_batchnorm(model, torch.device("cuda"))
    sync = model[1]  # as a compaction would leave it: 2 of 4 channels
    sync.weight, sync.bias = nn.Parameter(sync.weight[:2].detach()), nn.Parameter(sync.bias[:2].detach())
    sync.running_mean, sync.running_var = sync.running_mean[:2], sync.running_var[:2]
    from_sync_batchnorm(model, originals)
    assert type(model[1]) is nn.BatchNorm2d and model[1].num_features == 2 and model[1].weight is sync.weight


def test_check_identical_is_a_no_op_in_one_process():
    current().check_identical("masks", torch.tensor([1.0]))  # no process group: nothing to compare, no error
    current().check_same("kept channels", [("a", (1, 2))])
