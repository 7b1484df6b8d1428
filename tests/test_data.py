"""Tests for prunekit.data: readers, batch augmentation, loaders, data sets, errors."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prunekit.data import DATASETS, TensorLoader, build_data, resolve_data_dir
from prunekit.data import cifar
from prunekit.data.augment import augment_batch, crop_flip, normalize, sample_crop_flip
from prunekit.data.digits import load_digits_split
from prunekit.data.imagefolder import build_imagefolder
from prunekit.data.loader import LoaderOptions
from prunekit.errors import UserError

from cifar_files import (Payload, dump_python2, official_batch, payloads, write_fake_cifar,
                         write_payload_batch)
from conftest import SHARED_DATA as DATA
MEAN, STD = (0.5, 0.25, 0.75), (0.2, 0.3, 0.4)


@pytest.fixture
def cifar_root() -> Path:
    if not (DATA / "cifar-10-batches-py").is_dir():
        pytest.skip(f"real CIFAR-10 not found at {DATA}/cifar-10-batches-py")
    return DATA


def labelled_loader(n: int, **kwargs) -> TensorLoader:
    """A loader whose labels are the sample indices, so batches reveal the order."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=generator)
    options = dict(batch_size=8, shuffle=True, augment=True, mean=MEAN, std=STD, pad=1)
    options.update(kwargs)
    return TensorLoader(images, torch.arange(n), **options)


def epoch_batches(loader: TensorLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


# --- augmentation -------------------------------------------------------------------------


def test_crop_flip_matches_reference_loop():
    images = torch.randint(0, 256, (6, 3, 8, 10), dtype=torch.uint8)
    pad = 3
    generator = torch.Generator().manual_seed(0)
    dy, dx, flipped = sample_crop_flip(6, pad=pad, flip=True, generator=generator)
    out = crop_flip(images, dy, dx, flipped, pad=pad)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    for i in range(6):
        window = F.pad(images[i], (pad, pad, pad, pad))[:, dy[i] : dy[i] + 8, dx[i] : dx[i] + 10]
        expected = window.flip(-1) if flipped[i] else window
        assert torch.equal(out[i], expected)


def test_flip_is_exact_mirror_and_centre_crop_is_identity():
    images = torch.randint(0, 256, (4, 3, 5, 7), dtype=torch.uint8)
    centre = torch.full((4,), 2)
    mirrored = crop_flip(images, centre, centre, torch.ones(4, dtype=torch.bool), pad=2)
    plain = crop_flip(images, centre, centre, torch.zeros(4, dtype=torch.bool), pad=2)
    assert torch.equal(mirrored, images.flip(-1))
    assert torch.equal(plain, images)


def test_normalize_is_exact_and_channels_last():
    images = torch.randint(0, 256, (5, 3, 6, 6), dtype=torch.uint8)
    out = normalize(images, MEAN, STD)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    expected = (images.float() / 255 - mean) / std
    assert out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_augment_batch_is_deterministic_given_generator():
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)

    def run(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return augment_batch(images, MEAN, STD, pad=4, generator=generator)

    params = sample_crop_flip(32, pad=4, flip=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(run(7), normalize(crop_flip(images, *params, pad=4), MEAN, STD))
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    assert run(7).is_contiguous(memory_format=torch.channels_last)


# --- TensorLoader -------------------------------------------------------------------------


def test_set_epoch_reproduces_batches_and_changes_order():
    loader = labelled_loader(50)
    first = epoch_batches(loader, 3)
    again = epoch_batches(loader, 3)
    resumed = epoch_batches(labelled_loader(50), 3)  # a fresh process resuming at epoch 3
    for (x1, y1), (x2, y2), (x3, y3) in zip(first, again, resumed):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert torch.equal(x1, x3) and torch.equal(y1, y3)
    other = torch.cat([y for _, y in epoch_batches(loader, 4)])
    order = torch.cat([y for _, y in first])
    assert not torch.equal(order, other)
    assert torch.equal(order.sort().values, torch.arange(50))
    assert len(loader) == len(first) == 7 and loader.num_samples == 50


def test_test_loader_keeps_order_and_only_normalises():
    loader = labelled_loader(20, shuffle=False, augment=False, batch_size=6)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [6, 6, 6, 2]
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(20))
    images = torch.cat([x for x, _ in batches])
    torch.testing.assert_close(images, normalize(loader.images, MEAN, STD), rtol=0, atol=0)


def test_rank_shards_cover_dataset_with_equal_batch_counts():
    world = 3
    loaders = [labelled_loader(50, rank=r, world_size=world) for r in range(world)]
    seen = [torch.cat([y for _, y in epoch_batches(ld, 2)]) for ld in loaders]
    assert len({len(ld) for ld in loaders}) == 1
    assert {ld.num_samples for ld in loaders} == {17}
    union = torch.cat(seen)
    assert len(union) == 51 and set(union.tolist()) == set(range(50))


def test_uneven_shards_see_each_sample_once():
    loaders = [labelled_loader(50, rank=r, world_size=4, even_shards=False, shuffle=False)
               for r in range(4)]
    seen = torch.cat([torch.cat([y for _, y in ld]) for ld in loaders])
    assert sorted(seen.tolist()) == list(range(50))
    assert sum(ld.num_samples for ld in loaders) == 50


def test_drop_last_counts():
    loader = labelled_loader(50, drop_last=True)
    assert len(loader) == 6 and loader.num_samples == 48
    assert sum(len(y) for _, y in loader) == 48


def test_loader_restores_thread_setting():
    threads = torch.get_num_threads()
    for _ in labelled_loader(20):
        assert torch.get_num_threads() == threads


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"test_batch_size": 0}, "test_batch_size"),
        ({"subset": 0}, "subset"),
        ({"seed": -1}, "seed"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"world_size": 0}, "world_size"),
        ({"image_size": 16}, "image_size"),
    ],
)
def test_build_data_rejects_bad_arguments(kwargs, field):
    with pytest.raises(UserError, match=field):
        build_data("digits", **kwargs)


def test_unknown_dataset_lists_known_names():
    with pytest.raises(UserError, match="cifar10, cifar100, digits, imagefolder"):
        build_data("mnist")
    assert DATASETS.names() == ["cifar10", "cifar100", "digits", "imagefolder"]


# --- digits -------------------------------------------------------------------------------


def test_digits_split_is_stratified_and_deterministic():
    train_x, train_y, test_x, test_y = load_digits_split()
    assert train_x.shape == (1437, 1, 8, 8) and test_x.shape == (360, 1, 8, 8)
    assert train_x.dtype == torch.uint8 and int(train_x.max()) == 255
    per_class = torch.bincount(torch.cat([train_y, test_y]), minlength=10)
    test_per_class = torch.bincount(test_y, minlength=10)
    assert (test_per_class > 0).all() and (per_class - test_per_class > 0).all()
    assert ((test_per_class - 0.2 * per_class).abs() <= 1).all()  # stratified 80/20
    load_digits_split.cache_clear()
    assert torch.equal(load_digits_split()[3], test_y)


def test_digits_bundle_and_subset():
    bundle = build_data("digits", batch_size=32, subset=100)
    assert bundle.num_classes == 10 and bundle.input_shape == (1, 8, 8)
    assert bundle.train.num_samples == 100 and bundle.test.num_samples == 20
    assert bundle.train.flip is False and bundle.train.pad == 1
    images, labels = next(iter(bundle.train))
    assert images.shape == (32, 1, 8, 8) and labels.dtype == torch.int64


# --- CIFAR --------------------------------------------------------------------------------


def test_real_cifar10_shapes_and_labels(cifar_root):
    arrays = cifar.load_cifar(cifar.CIFAR10, cifar_root, download=False)
    assert arrays.train_images.shape == (50000, 3, 32, 32)
    assert arrays.test_images.shape == (10000, 3, 32, 32)
    assert arrays.train_images.dtype == torch.uint8 and arrays.train_labels.dtype == torch.int64
    assert torch.equal(torch.bincount(arrays.train_labels), torch.full((10,), 5000))
    assert torch.equal(torch.bincount(arrays.test_labels), torch.full((10,), 1000))
    inner = cifar.load_cifar(cifar.CIFAR10, cifar_root / "cifar-10-batches-py", download=False)
    assert inner.train_images is arrays.train_images  # same files, served from the cache


def test_prunekit_data_env_var(cifar_root, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_DATA", str(cifar_root))
    assert resolve_data_dir(None) == cifar_root
    bundle = build_data("cifar10", subset=256, download=False)
    assert bundle.num_classes == 10 and bundle.input_shape == (3, 32, 32)
    assert len(bundle.train) == 2 and bundle.test.num_samples == 51
    images, labels = next(iter(bundle.train))
    assert images.shape == (128, 3, 32, 32) and int(labels.max()) < 10


def test_resolve_data_dir_default(monkeypatch):
    monkeypatch.delenv("PRUNEKIT_DATA", raising=False)
    assert resolve_data_dir(None) == Path("data")
    assert resolve_data_dir("somewhere") == Path("somewhere")
    assert resolve_data_dir("somewhere/deeper") == Path("somewhere/deeper")  # need not exist


@pytest.mark.parametrize("data_dir", ["", "  "])
def test_empty_data_dir_is_refused_and_creates_nothing(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PRUNEKIT_DATA", raising=False)
    with pytest.raises(UserError, match=r"^data dir is an empty string \(--data-dir, data.data_dir\)"):
        build_data("cifar10", data_dir=data_dir, download=True)
    assert list(tmp_path.iterdir()) == []  # no ./data


@pytest.mark.parametrize(("relative", "message"), [
    ("file", "data dir '{root}/file' is a file, not a directory; pass --data-dir DIR"),
    ("file/cifar", "data dir '{root}/file/cifar' lies under the file '{root}/file'; pass --data-dir DIR"),
])
@pytest.mark.parametrize("download", [False, True])
def test_data_dir_naming_a_file_says_so(relative, message, download, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    calls = []
    monkeypatch.setattr(cifar, "download_and_extract_archive", lambda *a, **k: calls.append(a))
    for name in ("cifar10", "imagefolder"):
        with pytest.raises(UserError) as err:
            build_data(name, data_dir=str(tmp_path / relative), download=download)
        assert str(err.value).startswith(message.format(root=tmp_path)) and "\n" not in str(err.value)
    assert calls == [] and (tmp_path / "file").read_text() == "not a folder"


def test_data_dir_of_an_unknown_users_home_is_one_line():
    with pytest.raises(UserError, match=r"^data dir '~no-such-user-h6/cifar': cannot expand '~'"):
        resolve_data_dir("~no-such-user-h6/cifar")


def test_prunekit_data_naming_a_file_says_so(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("PRUNEKIT_DATA", str(tmp_path / "file"))
    with pytest.raises(UserError, match="is a file, not a directory; pass --data-dir DIR or set PRUNEKIT_DATA"):
        build_data("cifar10", download=False)


def test_missing_dir_without_download_is_one_line(tmp_path):
    with pytest.raises(UserError) as err:
        build_data("cifar10", data_dir=str(tmp_path / "nothing"), download=False)
    message = str(err.value)
    assert "\n" not in message and "--data-dir" in message and "cifar-10-batches-py" in message


@pytest.mark.parametrize("failure", [URLError("no route"), OSError("unreachable")])
def test_failed_download_is_one_line(tmp_path, monkeypatch, failure):
    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(cifar, "download_and_extract_archive", fail)
    with pytest.raises(UserError) as err:
        build_data("cifar10", data_dir=str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and "--data-dir" in message and "no network" in message


def test_download_into_an_unwritable_folder_is_not_called_a_network_failure(tmp_path, monkeypatch):
    def fail(url, download_root, md5):
        raise PermissionError(13, "Permission denied", download_root)

    monkeypatch.setattr(cifar, "download_and_extract_archive", fail)
    with pytest.raises(UserError) as err:
        build_data("cifar10", data_dir=str(tmp_path / "data"))
    assert str(err.value) == (f"cannot write CIFAR-10 into '{tmp_path / 'data'}': Permission denied; pass "
                              "--data-dir DIR or set PRUNEKIT_DATA to a writable folder")


def test_download_uses_official_archive(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, download_root, md5):
        calls.append((url, md5))
        write_fake_cifar(Path(download_root), cifar.CIFAR100)

    monkeypatch.setattr(cifar, "download_and_extract_archive", fake_download)
    bundle = build_data("cifar100", data_dir=str(tmp_path), batch_size=10)
    assert calls == [(cifar.CIFAR100.url, "eb9058c3a382ffc7106e4002c42a8d85")]
    assert bundle.num_classes == 100 and bundle.train.num_samples == 20
    assert len(bundle.train) == 2 and bundle.test.num_samples == 20


def test_truncated_batch_file_names_the_file(cifar_root, tmp_path):
    source = cifar_root / "cifar-10-batches-py"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in cifar.CIFAR10.train_files + cifar.CIFAR10.test_files:
        if name != "data_batch_3":
            os.symlink(source / name, folder / name)
    shutil.copyfile(source / "data_batch_3", folder / "data_batch_3")
    with (folder / "data_batch_3").open("r+b") as handle:
        handle.truncate(1_000_000)
    with pytest.raises(UserError, match="data_batch_3") as err:
        cifar.load_cifar(cifar.CIFAR10, tmp_path, download=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("keep", [0, 1, 2, 40, 3000, -1])
def test_truncated_fake_batch_names_the_file(keep, tmp_path):
    folder = write_fake_cifar(tmp_path, cifar.CIFAR10)
    whole = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(whole[:keep % len(whole)])
    with pytest.raises(UserError) as err:
        cifar.load_cifar(cifar.CIFAR10, tmp_path, download=False)
    assert str(err.value).startswith(f"cannot read CIFAR batch file '{folder.resolve() / 'data_batch_2'}': ")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("seed", range(8))
def test_random_batch_file_names_the_file(seed, tmp_path):
    folder = write_fake_cifar(tmp_path, cifar.CIFAR10)
    rng = np.random.default_rng(seed)
    head = [b"", b"\x80\x02", b"\x80\x04", b"c"][seed % 4]  # plain noise, or noise after a pickle opcode
    (folder / "test_batch").write_bytes(head + rng.bytes(int(rng.integers(1, 5000))))
    with pytest.raises(UserError) as err:
        cifar.load_cifar(cifar.CIFAR10, tmp_path, download=False)
    assert "test_batch" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("batch", "message"), [
    ([1, 2, 3], "expected a dict of arrays, got list"),
    ({"labels": [0]}, "has no 'data' entry"),
    ({}, "has no 'data' and no 'labels' entry"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": ["cat", "dog"]}, "'labels' a list of integers"),
])
def test_malformed_batch_dict_names_the_file(batch, message, tmp_path):
    folder = write_fake_cifar(tmp_path, cifar.CIFAR10)
    with (folder / "test_batch").open("wb") as handle:
        pickle.dump(batch, handle)
    with pytest.raises(UserError, match=f"^CIFAR batch file '.*test_batch'.*{message}"):
        cifar.load_cifar(cifar.CIFAR10, tmp_path, download=False)


def test_wrong_shape_batch_names_the_file(tmp_path):
    folder = write_fake_cifar(tmp_path, cifar.CIFAR10)
    with (folder / "test_batch").open("wb") as handle:
        pickle.dump({"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4}, handle)
    with pytest.raises(UserError, match="test_batch"):
        cifar.load_cifar(cifar.CIFAR10, tmp_path, download=False)


# --- restricted unpickler ----------------------------------------------------------------


def test_official_python2_batch_reads_with_its_bytes_keys(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for i, name in enumerate(cifar.CIFAR10.train_files + cifar.CIFAR10.test_files):
        batches[name] = official_batch(3 + i, seed=i)
        dump_python2(batches[name], folder / name)
    raw = (folder / "test_batch").read_bytes()
    assert raw.startswith(b"\x80\x02") and b"cnumpy.core.multiarray\n_reconstruct\n" in raw
    assert b"_codecs" not in raw  # Python 2 str opcodes, not Python 3's encoding of bytes
    assert pickle.loads(raw, encoding="bytes").keys() == {b"batch_label", b"labels", b"data", b"filenames"}
    arrays = cifar.load_cifar(cifar.CIFAR10, tmp_path, download=False)
    train = [batches[name] for name in cifar.CIFAR10.train_files]
    expected = np.concatenate([b[b"data"] for b in train]).reshape(-1, 3, 32, 32)
    assert torch.equal(arrays.train_images, torch.from_numpy(expected))
    assert arrays.train_labels.tolist() == [v for b in train for v in b[b"labels"]]
    assert torch.equal(arrays.test_images.flatten(1), torch.from_numpy(batches["test_batch"][b"data"]))
    assert arrays.test_labels.tolist() == batches["test_batch"][b"labels"]


def test_python3_batch_with_bytes_keys_reads(tmp_path):
    folder = write_fake_cifar(tmp_path, cifar.CIFAR10)
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    with (folder / "test_batch").open("wb") as handle:
        pickle.dump({b"data": data, b"labels": [7, 3]}, handle, protocol=4)
    arrays = cifar.load_cifar(cifar.CIFAR10, tmp_path, download=False)
    assert arrays.test_labels.tolist() == [7, 3]
    assert torch.equal(arrays.test_images.flatten(1), torch.from_numpy(data))


@pytest.mark.parametrize("nested", [False, True], ids=["whole-file", "inside-labels"])
@pytest.mark.parametrize("name", list(payloads(Path("m.npy"))))
def test_payload_batch_is_refused_without_running(name, nested, tmp_path):
    marker = tmp_path / "marker.npy"
    payload = payloads(marker)[name]
    pickle.loads(pickle.dumps(payload))  # the payload is live: a plain unpickler runs it
    assert marker.exists()
    marker.unlink()
    folder = write_fake_cifar(tmp_path / "data", cifar.CIFAR10)
    write_payload_batch(folder / "data_batch_4", payload, nested=nested)
    with pytest.raises(UserError) as err:
        cifar.load_cifar(cifar.CIFAR10, tmp_path / "data", download=False)
    pickled_as = f"{payload.function.__module__}.{payload.function.__name__}"  # os.system is posix.system
    assert str(err.value) == (f"cannot read CIFAR batch file '{folder.resolve() / 'data_batch_4'}': refused to "
                              f"load {pickled_as}: a CIFAR batch holds only arrays, lists, strings and "
                              "numbers")
    assert not marker.exists()


def test_array_reconstruction_numpy_never_writes_is_refused(tmp_path):
    folder = write_fake_cifar(tmp_path, cifar.CIFAR10)
    huge = Payload(cifar._reconstruct, np.ndarray, (2**40,), b"b")  # a 1 TiB allocation
    with (folder / "test_batch").open("wb") as handle:
        pickle.dump({"data": huge, "labels": []}, handle)
    with pytest.raises(UserError, match="test_batch': refused an array reconstruction numpy itself never"):
        cifar.load_cifar(cifar.CIFAR10, tmp_path, download=False)


# --- image folder -------------------------------------------------------------------------


@pytest.fixture
def image_root(tmp_path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return tmp_path


def test_imagefolder_batches_and_epoch_determinism(image_root):
    opts = LoaderOptions(batch_size=4, test_batch_size=3, seed=5)
    bundle = build_imagefolder(opts, str(image_root), False, image_size=16, num_workers=0)
    assert bundle.num_classes == 2 and bundle.input_shape == (3, 16, 16)
    assert len(bundle.train) == 2 and bundle.train.num_samples == 6
    assert [len(y) for _, y in bundle.test] == [3, 1]
    images, labels = next(iter(bundle.train))
    assert images.shape == (4, 3, 16, 16) and labels.dtype == torch.int64
    bundle.train.set_epoch(1)
    first = list(bundle.train)
    second = list(bundle.train)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    bundle.train.set_epoch(2)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, bundle.train))


def test_imagefolder_via_build_data_and_missing_val(image_root):
    root = str(image_root)
    bundle = build_data("imagefolder", data_dir=root, subset=2, image_size=8, num_workers=0)
    assert bundle.train.num_samples == 2 and bundle.test.num_samples == 1
    shutil.rmtree(image_root / "val")
    with pytest.raises(UserError, match="val"):
        build_data("imagefolder", data_dir=root, num_workers=0)
