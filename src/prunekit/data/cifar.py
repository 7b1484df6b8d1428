"""CIFAR-10 / CIFAR-100 in the official "python version" pickle layout.

The format is a pickle, so batch files are read by a restricted unpickler that builds only what
a batch holds (dicts, lists, strings, numbers, numpy arrays) and refuses every other global: a
crafted file cannot run code. Decoded tensors are cached per process, keyed on path, size and
modification time.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from functools import lru_cache
from http.client import HTTPException
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torchvision.datasets.utils import download_and_extract_archive

from prunekit.data.loader import DataBundle, LoaderOptions, tensor_bundle
from prunekit.errors import UserError
from prunekit.io import blocking_file

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

log = logging.getLogger(__name__)

ENV_VAR = "PRUNEKIT_DATA"
_IMAGE_SHAPE = (3, 32, 32)


@dataclass(frozen=True)
class CifarSpec:
    """Where one CIFAR variant lives, how it is stored and how to normalise it."""

    name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    url: str
    md5: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR10 = CifarSpec(
    name="CIFAR-10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    label_key="labels",
    num_classes=10,
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a",
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2023, 0.1994, 0.2010),
)

CIFAR100 = CifarSpec(
    name="CIFAR-100",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    label_key="fine_labels",
    num_classes=100,
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    md5="eb9058c3a382ffc7106e4002c42a8d85",
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
)


class CifarArrays(NamedTuple):
    """Decoded splits: uint8 ``N x 3 x 32 x 32`` images and int64 labels."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data root: ``data_dir`` if given, else ``$PRUNEKIT_DATA``, else ``./data``.

    An empty ``data_dir`` and a root that is (or lies under) a file are UserErrors.
    """
    if data_dir is not None and not os.fspath(data_dir).strip():
        raise UserError(f"data dir is an empty string (--data-dir, data.data_dir); name a directory, "
                        f"or leave it unset to use ${ENV_VAR} or ./data")
    given = Path((os.environ.get(ENV_VAR) or "data") if data_dir is None else data_dir)
    try:
        root = given.expanduser()
    except RuntimeError:  # ~user of an unknown user, or no home directory
        raise UserError(f"data dir '{given}': cannot expand '~' (unknown user or no home "
                        "directory); pass --data-dir DIR") from None
    blocker = blocking_file(root)
    if blocker is not None:
        where = "is a file, not a directory" if blocker == root else f"lies under the file '{blocker}'"
        raise UserError(f"data dir '{root}' {where}; pass --data-dir DIR or set "
                        f"{ENV_VAR} to the folder holding the data")
    return root


def _find_folder(spec: CifarSpec, root: Path) -> Path | None:
    """The folder holding the batch files: ``root`` itself or ``root / spec.folder``."""
    for candidate in (root, root / spec.folder):
        if all((candidate / f).is_file() for f in spec.train_files + spec.test_files):
            return candidate
    return None


def _missing_message(spec: CifarSpec, root: Path) -> str:
    folder = root if root.name == spec.folder else root / spec.folder
    if folder.is_dir():
        missing = [f for f in spec.train_files + spec.test_files if not (folder / f).is_file()]
        return (f"data dir '{folder}' lacks {', '.join(missing)}; pass --data-dir DIR "
                f"or set {ENV_VAR} to a complete {spec.folder}")
    return f"data dir '{root}' has no {spec.folder}; pass --data-dir DIR or set {ENV_VAR}"


def _download(spec: CifarSpec, root: Path) -> None:
    """Fetch and unpack the official archive into ``root``; failures become one-line UserErrors."""
    log.info("downloading %s from %s into %s", spec.name, spec.url, root)
    try:
        download_and_extract_archive(spec.url, download_root=str(root), md5=spec.md5)
    except (OSError, HTTPException) as err:
        if isinstance(err, OSError) and err.filename is not None:  # the file system, not the network
            raise UserError(f"cannot write {spec.name} into '{root}': {err.strerror or err}; pass "
                            f"--data-dir DIR or set {ENV_VAR} to a writable folder") from err
        raise UserError(
            f"cannot download {spec.name} (no network?): put {spec.folder} under {root}, "
            f"or pass --data-dir / set {ENV_VAR}"
        ) from err
    except RuntimeError as err:  # torchvision's md5 check after download
        raise UserError(f"downloaded {spec.name} archive into {root} failed its md5 check "
                        f"({err}); delete it and retry, or pass --data-dir") from err


def _empty_array(cls: type, shape: object, dtype_code: object) -> np.ndarray:
    """numpy's ``_reconstruct`` limited to what ``ndarray.__reduce__`` emits: an empty ndarray
    that the pickle's state then fills (its size checked against the bytes it carries)."""
    if cls is not np.ndarray or shape != (0,):
        raise pickle.UnpicklingError("refused an array reconstruction numpy itself never writes")
    return _reconstruct(cls, shape, dtype_code)


class _BatchUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings, numbers and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str) -> object:
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _empty_array
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR batch holds only "
                                     "arrays, lists, strings and numbers")


def _load_batch(path: Path) -> dict:
    """The batch dict of one file, keys as ``str`` (Python 2 pickles may give ``bytes``)."""
    try:
        with path.open("rb") as handle:
            batch = _BatchUnpickler(handle, encoding="latin1").load()
    except Exception as err:  # truncated, random or crafted files fail in many ways
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot read CIFAR batch file '{path}': {reason}") from err
    if not isinstance(batch, dict):
        raise UserError(f"CIFAR batch file '{path}': expected a dict of arrays, got "
                        f"{type(batch).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch file -> ``(uint8 N x 3072, int64 N)``; malformed files raise UserError."""
    batch = _load_batch(path)
    missing = [repr(key) for key in ("data", label_key) if key not in batch]
    if missing:
        raise UserError(f"CIFAR batch file '{path}' has no {' and no '.join(missing)} entry")
    try:
        data = np.asarray(batch["data"])
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as err:
        raise UserError(f"CIFAR batch file '{path}': 'data' must be an array and {label_key!r} a list "
                        f"of integers ({str(err).splitlines()[0]})") from err
    expected = int(np.prod(_IMAGE_SHAPE))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != expected:
        raise UserError(f"CIFAR batch file '{path}': 'data' must be uint8 N x {expected}, "
                        f"got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise UserError(f"CIFAR batch file '{path}': {data.shape[0]} images but "
                        f"{labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"CIFAR batch file '{path}': labels must lie in [0, {num_classes})")
    return data, labels


@lru_cache(maxsize=4)
def _read_split(
    folder: str, files: tuple[str, ...], label_key: str, num_classes: int, stamp: tuple
) -> tuple[Tensor, Tensor]:
    """Decode and concatenate batch files (cached; ``stamp`` invalidates on file changes)."""
    parts = [_read_batch(Path(folder) / name, label_key, num_classes) for name in files]
    data = np.concatenate([p[0] for p in parts]).reshape(-1, *_IMAGE_SHAPE)
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(data), torch.from_numpy(labels)


def _split(spec: CifarSpec, folder: Path, files: tuple[str, ...]) -> tuple[Tensor, Tensor]:
    stats = [(folder / f).stat() for f in files]
    stamp = tuple((s.st_size, s.st_mtime_ns) for s in stats)
    return _read_split(str(folder.resolve()), files, spec.label_key, spec.num_classes, stamp)


def load_cifar(
    spec: CifarSpec, data_dir: str | os.PathLike | None = None, *, download: bool = True
) -> CifarArrays:
    """Read (downloading first if absent and allowed) both splits of a CIFAR variant.

    ``data_dir`` may be the parent of ``spec.folder`` or that folder itself. The returned
    tensors are shared by the cache: do not modify them in place.
    """
    root = resolve_data_dir(data_dir)
    folder = _find_folder(spec, root)
    if folder is None:
        if not download:
            raise UserError(_missing_message(spec, root))
        _download(spec, root.parent if root.name == spec.folder else root)
        folder = _find_folder(spec, root)
        if folder is None:
            raise UserError(_missing_message(spec, root))
    train, test = _split(spec, folder, spec.train_files), _split(spec, folder, spec.test_files)
    return CifarArrays(*train, *test)


def build_cifar(
    spec: CifarSpec, name: str, opts: LoaderOptions, data_dir: str | None, download: bool
) -> DataBundle:
    """Loaders for a CIFAR variant: pad-4 random crop + horizontal flip when augmenting."""
    arrays = load_cifar(spec, data_dir, download=download)
    return tensor_bundle(
        name,
        (arrays.train_images, arrays.train_labels),
        (arrays.test_images, arrays.test_labels),
        num_classes=spec.num_classes, mean=spec.mean, std=spec.std, opts=opts, pad=4, flip=True,
    )
