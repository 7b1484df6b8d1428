"""One training run of the distributed tests: gradual pruning of a small BN-free CNN on random
tensors, launched under torchrun (or alone, as the single-process reference).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed/worker.py \
        --run-dir RUN --report REPORT [--batch 8] [--kill-rank 1 --kill-epoch 2] [--disagree]

Every rank saves its final weights and masks to REPORT/rank<R>.pt (outside the run directory);
ranks other than 0 also record every write they attempted inside RUN (an audit hook) in
REPORT/writes<R>.json. ``--disagree`` gives rank 1 another sparsity target, which the masks
check must catch. ``--compact-after E`` prunes half the filters of both convs up front and
removes them from the model in training after epoch E (``Trainer.compact``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from prunekit.core.schedules import build_schedule
from prunekit.core.sparsifier import Sparsifier
from prunekit.data.loader import TensorLoader
from prunekit.distributed import current, init_from_env, shutdown
from prunekit.methods.gradual import GradualPruning
from prunekit.train import TrainConfig, Trainer
from prunekit.train.hooks import Hook
from prunekit.train.masking import EnforceMasks

sys.path.insert(0, str(Path(__file__).parent))
from audit import audit_writes  # noqa: E402


class CompactAfter(Hook):
    """After epoch ``epoch`` (1-based), remove the masked filters from the model in training."""

    def __init__(self, epoch: int, enforce: EnforceMasks, example: torch.Tensor) -> None:
        self.epoch, self.enforce, self.example = epoch, enforce, example
        self.widths: list[int] = []

    def on_epoch_end(self, trainer: Trainer, metrics) -> None:
        if metrics.epoch == self.epoch:
            trainer.compact(self.enforce.masks.mask_set, self.example)
            trainer.hooks.remove(self.enforce)  # the masks are gone: the filters are
            self.widths = [trainer.model[0].out_channels, trainer.model[2].out_channels]


class KillAt(Hook):
    """Exit this process abruptly at the start of ``epoch`` (0-based), as a kill would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_begin(self, trainer: Trainer, epoch: int) -> None:
        if epoch == self.epoch:
            os._exit(17)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=8, help="per rank")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--kill-rank", type=int, default=None)
    parser.add_argument("--kill-epoch", type=int, default=1)
    parser.add_argument("--disagree", action="store_true")
    parser.add_argument("--compact-after", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ranks = init_from_env(torch.device("cpu"))
    writes: list[str] = []
    if not ranks.is_main:
        audit_writes(args.run_dir, writes)
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 4, (64,), generator=generator)
    loader = TensorLoader(images, labels, batch_size=args.batch, shuffle=True, augment=False, mean=(0.5,) * 3,
                          std=(0.25,) * 3, seed=3, **ranks.shard)
    net = model()
    final = 0.6 if args.disagree and ranks.rank == 1 else 0.5
    compactor = None
    if args.compact_after is None:
        sparsifier = Sparsifier(net, "weight", "l1", "local", layers=["0", "2"])
        hooks: list[Hook] = [GradualPruning(sparsifier, build_schedule("agp", final), every=2)]
    else:
        sparsifier = Sparsifier(net, "filter", "l1", "local", layers=["0", "2"])
        sparsifier.update(0.5)
        enforce = EnforceMasks(sparsifier)
        compactor = CompactAfter(args.compact_after, enforce, torch.zeros(1, 3, 8, 8))
        hooks = [enforce, compactor]
    if args.kill_rank == ranks.rank:
        hooks.append(KillAt(args.kill_epoch))
    config = TrainConfig(epochs=args.epochs, optimizer="sgd", lr=0.05, momentum=0.9, nesterov=False,
                         weight_decay=5e-4, lr_plan="cosine", precision="fp32", seed=0)
    trainer = Trainer(net, loader, loader, config, hooks=hooks, run_dir=args.run_dir, device="cpu")
    result = trainer.fit(resume=True)
    args.report.mkdir(parents=True, exist_ok=True)
    torch.save({"state": {k: v.clone() for k, v in net.state_dict().items()},
                "masks": {} if compactor else {k: v.clone() for k, v in sparsifier.masks().items()},
                "widths": compactor.widths if compactor else None,
                "history": [(m.train_loss, m.train_acc, m.test_acc) for m in result.history]},
               args.report / f"rank{ranks.rank}.pt")
    (args.report / f"writes{ranks.rank}.json").write_text(json.dumps(writes))
    current().barrier()
    shutdown()


if __name__ == "__main__":
    main()
