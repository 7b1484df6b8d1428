"""scikit-learn's bundled handwritten digits: a demo data set that needs no download.

1,797 grayscale 8x8 images, values 0..16 rescaled to uint8 0..255, split 80/20 stratified
with a fixed seed. Augmentation is a random shift of up to one pixel (zero padding 1); no
flip, since a mirrored digit is a different or invalid digit.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from prunekit.data.loader import DataBundle, LoaderOptions, tensor_bundle

NUM_CLASSES = 10
SPLIT_SEED = 0
TEST_FRACTION = 0.2
SHIFT = 1


@lru_cache(maxsize=1)
def load_digits_split() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(train_images, train_labels, test_images, test_labels)``; images uint8 N x 1 x 8 x 8."""
    # Imported here: scikit-learn takes about a second to import and only this demo needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.data * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels
    )
    arrays = (train_x, train_y, test_x, test_y)
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


def build_digits(opts: LoaderOptions, data_dir: str | None, download: bool) -> DataBundle:
    """Loaders for the digits demo; normalised with the training split's own mean and std."""
    train_x, train_y, test_x, test_y = load_digits_split()
    pixels = train_x.float() / 255.0
    return tensor_bundle(
        "digits", (train_x, train_y), (test_x, test_y),
        num_classes=NUM_CLASSES, mean=(pixels.mean().item(),), std=(pixels.std().item(),),
        opts=opts, pad=SHIFT, flip=False,
    )
