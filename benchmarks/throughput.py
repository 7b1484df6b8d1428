"""Training throughput, measured in one run so the ratios compare like with like.

    python benchmarks/throughput.py [--data-dir ../shared/data] [--model resnet20] [--steps 60]

Three figures on CIFAR-10 at batch 128:
  loader     the prunekit TensorLoader alone (pad-4 crop + flip + normalise on whole batches);
  trainer    the prunekit Trainer (its defaults: bf16 autocast + channels_last where fast);
  baseline   a plain fp32 PyTorch loop fed by a torchvision per-image transform pipeline
             (RandomCrop + RandomHorizontalFlip + ToTensor + Normalize) through a DataLoader,
             timed with 0 and with 2 worker processes; the faster one is the baseline.
Targets (issue 2): loader >= 5x trainer; trainer >= 1.5x baseline. Writes
benchmarks/results/throughput.json.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset

from machine import machine_info
from prunekit.data import TensorLoader
from prunekit.data.cifar import CIFAR10, load_cifar
from prunekit.io import write_json
from prunekit.models import build_model
from prunekit.train import TrainConfig, Trainer

BATCH = 128
WARMUP = 10


def loader_images_per_s(images: torch.Tensor, labels: torch.Tensor) -> float:
    loader = TensorLoader(images, labels, batch_size=BATCH, shuffle=True, augment=True,
                          mean=CIFAR10.mean, std=CIFAR10.std)
    for _ in itertools.islice(loader, WARMUP):
        pass
    loader.set_epoch(1)
    began = time.perf_counter()
    count = sum(x.shape[0] for x, _ in loader)
    return count / (time.perf_counter() - began)


def trainer_images_per_s(model_name: str, images: torch.Tensor, labels: torch.Tensor, steps: int,
                         **config) -> float:
    """Images/s of the second epoch of a Trainer run (the first one warms the kernels up)."""
    n = steps * BATCH
    loader = TensorLoader(images[:n], labels[:n], batch_size=BATCH, shuffle=True, augment=True,
                          mean=CIFAR10.mean, std=CIFAR10.std, drop_last=True)
    trainer = Trainer(build_model(model_name), loader, None, TrainConfig(epochs=2, **config))
    result = trainer.fit(resume=False)
    return result.history[-1].images_per_s


class PerImageCifar(Dataset):
    """CIFAR-10 served image by image through PIL, as torchvision's CIFAR10 dataset does."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images.permute(0, 2, 3, 1).numpy()
        self.labels = labels.tolist()
        self.transform = T.Compose([T.ToPILImage(), T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(),
                                    T.ToTensor(), T.Normalize(CIFAR10.mean, CIFAR10.std)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]


def baseline_images_per_s(model_name: str, images: torch.Tensor, labels: torch.Tensor, steps: int,
                          workers: int) -> float:
    """A plain fp32 loop: SGD, cross-entropy, per-image transforms, no autocast, NCHW."""
    torch.manual_seed(0)
    model = build_model(model_name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loader = DataLoader(PerImageCifar(images[: (steps + WARMUP) * BATCH], labels[: (steps + WARMUP) * BATCH]),
                        batch_size=BATCH, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=False)
    model.train()
    began, seen = 0.0, 0
    for i, (x, y) in enumerate(loader):
        if i == WARMUP:
            began, seen = time.perf_counter(), 0
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += y.numel()
    return seen / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--steps", type=int, default=60, help="timed training steps per measurement")
    parser.add_argument("--out", default="benchmarks/results/throughput.json")
    args = parser.parse_args()

    data = load_cifar(CIFAR10, args.data_dir, download=False)
    images, labels = data.train_images, data.train_labels
    loader = loader_images_per_s(images, labels)
    trainer = trainer_images_per_s(args.model, images, labels, args.steps)
    trainer_fp32 = trainer_images_per_s(args.model, images, labels, args.steps, precision="fp32")
    baselines = {w: baseline_images_per_s(args.model, images, labels, args.steps, w) for w in (0, 2)}
    baseline = max(baselines.values())
    result = {
        "model": args.model, "batch_size": BATCH, "timed_steps": args.steps,
        "loader_images_per_s": round(loader, 1),
        "trainer_images_per_s": round(trainer, 1),
        "trainer_fp32_images_per_s": round(trainer_fp32, 1),
        "baseline_fp32_per_image_images_per_s": {f"{w}_workers": round(v, 1) for w, v in baselines.items()},
        "loader_over_trainer": round(loader / trainer, 2),
        "trainer_over_baseline": round(trainer / baseline, 2),
        "machine": machine_info(),
    }
    write_json(args.out, result)
    print(f"loader   {loader:9.0f} img/s  ({loader / trainer:.1f}x the trainer; target >= 5x)")
    print(f"trainer  {trainer:9.0f} img/s  ({trainer / baseline:.2f}x the baseline; target >= 1.5x)")
    print(f"trainer, fp32 {trainer_fp32:6.0f} img/s")
    for w, v in baselines.items():
        print(f"baseline fp32 per-image, {w} workers {v:6.0f} img/s")


if __name__ == "__main__":
    main()
