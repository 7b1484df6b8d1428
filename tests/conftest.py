"""Shared test settings."""

from pathlib import Path

from urllib.error import URLError

import pytest
import torch

from prunekit.data import cifar

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Two cores are shared by the suite and whatever else runs; one intra-op thread avoids
    oversubscription, which on this machine slows small ops by an order of magnitude."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """No test may download: the download function fails as it would offline."""

    def offline(*args, **kwargs):
        raise URLError("network disabled in tests")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
