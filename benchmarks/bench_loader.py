"""Throughput of the CIFAR-10 training loader (random crop + flip + normalise, batch 128).

Usage: python benchmarks/bench_loader.py [--data-dir ../shared/data]
                                         [--out benchmarks/results/loader.json] [--threads N]

Times one full epoch after a warm-up of a few batches, prints images/s and writes the
figures to ``--out`` atomically.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import time

import torch

from prunekit.data import TensorLoader
from prunekit.data.cifar import CIFAR10, load_cifar
from prunekit.io import write_json

BATCH_SIZE = 128
WARMUP_BATCHES = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="parent of cifar-10-batches-py "
                        "(default: $PRUNEKIT_DATA, else ./data)")
    parser.add_argument("--out", default="benchmarks/results/loader.json")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads before timing (default: leave as is)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    arrays = load_cifar(CIFAR10, args.data_dir, download=False)
    loader = TensorLoader(arrays.train_images, arrays.train_labels, batch_size=BATCH_SIZE,
                          shuffle=True, augment=True, mean=CIFAR10.mean, std=CIFAR10.std)
    for _ in itertools.islice(loader, WARMUP_BATCHES):
        pass
    loader.set_epoch(1)
    start = time.perf_counter()
    images = sum(x.shape[0] for x, _ in loader)
    seconds = time.perf_counter() - start

    result = {
        "benchmark": "cifar10 train TensorLoader, pad-4 crop + flip + normalise, channels_last",
        "batch_size": BATCH_SIZE,
        "batches": len(loader),
        "images": images,
        "seconds": round(seconds, 4),
        "images_per_s": round(images / seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "loader_threads": 1,  # TensorLoader runs its batch ops on one intra-op thread
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    write_json(args.out, result)
    print(f"{result['images_per_s']:.0f} images/s "
          f"({images} images in {seconds:.2f} s, {result['torch_threads']} torch threads)")


if __name__ == "__main__":
    main()
