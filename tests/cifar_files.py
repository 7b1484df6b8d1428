"""CIFAR batch files for tests: well-formed fakes, the official archive's Python 2 layout, and
crafted payloads that run code when read by a plain ``pickle.load``."""

from __future__ import annotations

import builtins
import os
import pickle
import struct
from pathlib import Path

import numpy as np

from prunekit.data import cifar


def write_fake_cifar(root: Path, spec: cifar.CifarSpec, per_file: int = 20) -> Path:
    """Write a small, well-formed copy of ``spec``'s files under ``root / spec.folder``."""
    folder = root / spec.folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in spec.train_files + spec.test_files:
        batch = {
            "data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
            spec.label_key: (np.arange(per_file) % spec.num_classes).tolist(),
        }
        with (folder / name).open("wb") as handle:
            pickle.dump(batch, handle)
    return folder


class Python2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2's cPickle wrote the official archive: ``bytes`` are Python 2
    ``str`` (SHORT_BINSTRING / BINSTRING opcodes, no ``_codecs`` global) and numpy's array
    global is ``numpy.core.multiarray._reconstruct``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str

    def save_global(self, obj, name=None) -> None:
        if obj is cifar._reconstruct:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def official_batch(n: int, seed: int = 0) -> dict[bytes, object]:
    """A batch as the official CIFAR-10 archive holds it: Python 2 ``str`` keys and names."""
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"training batch 1 of 5",
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i:04d}.png".encode() for i in range(n)],
    }


def dump_python2(obj: object, path: Path) -> None:
    with path.open("wb") as handle:
        Python2Pickler(handle, protocol=2).dump(obj)


class Payload:
    """Unpickling this object calls ``function(*args)``."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def payloads(marker: Path) -> dict[str, Payload]:
    """Each creates ``marker`` when a plain unpickler reads it (``marker`` must end in .npy)."""
    return {
        "os.system": Payload(os.system, f"touch '{marker}'"),
        "builtins.open": Payload(builtins.open, str(marker), "w"),
        "builtins.exec": Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "numpy.save": Payload(np.save, str(marker), np.zeros(1)),
    }


def write_payload_batch(path: Path, payload: Payload, *, nested: bool) -> None:
    """The payload as the whole file, or hidden in the labels of an otherwise valid batch."""
    obj = {"data": np.zeros((1, 3072), np.uint8), "labels": [payload]} if nested else payload
    with path.open("wb") as handle:
        pickle.dump(obj, handle)
