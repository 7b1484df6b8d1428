"""Atomic file writes: a reader sees the old file or the new one, never half of one.

A path that cannot be written (its folder lies under a file, is read-only, or the path is a
directory) is a one-line :class:`UserError` naming it, and nothing is left behind.
Under an initialised ``torch.distributed`` process group only rank 0 writes: on the other ranks
every writer here works on a scratch file that is thrown away (:func:`discards_writes`), so code
that saves needs no rank checks. Imports only the standard library at module level (the results
store uses it without torch).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

from prunekit.errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


def blocking_file(path: str | os.PathLike) -> Path | None:
    """The nearest existing one of ``path`` and its parents, when that is not a directory."""
    found = next((p for p in (Path(path), *Path(path).parents) if os.path.exists(p)), None)
    return None if found is None or os.path.isdir(found) else found


def unwritable(path: str | os.PathLike, err: OSError, what: str = "cannot write") -> UserError:
    """The one-line error for an ``OSError`` met while creating ``path``."""
    blocker = blocking_file(Path(path).parent)
    reason = f"'{blocker}' is a file, not a folder" if blocker else (err.strerror or str(err))
    return UserError(f"{what} '{path}': {reason}")


def discards_writes() -> bool:
    """True on a rank other than 0 of an initialised process group (its writes are thrown away)."""
    dist = sys.modules.get("torch.distributed")  # loaded only by callers that use torch
    return dist is not None and dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


def make_dirs(path: str | os.PathLike) -> None:
    """``mkdir -p`` (rank 0 only), with the one-line error of :func:`unwritable`."""
    if discards_writes():
        return
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise unwritable(path, err) from None


@contextmanager
def _scratch_path(name: str) -> Iterator[Path]:
    folder = tempfile.mkdtemp(prefix="prunekit-discarded-")
    try:
        yield Path(folder) / name
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success rename it over ``path`` (on ranks
    other than 0: a scratch path, deleted after)."""
    target = Path(path)
    if discards_writes():
        with _scratch_path(target.name) as scratch:
            yield scratch
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as err:
        raise unwritable(target, err) from err
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600 (and some writers, e.g. safetensors, replace the file with their own
        # 0600 temporary): give the result the mode open() would
        os.chmod(tmp, 0o666 & ~_UMASK)
        try:
            os.replace(tmp, target)
        except OSError as err:  # e.g. ``path`` is a directory
            raise unwritable(target, err) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a file that appears at ``path`` only once it is completely written and synced."""
    with atomic_path(path) as tmp, open(tmp, mode) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_open(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file, so a kill never leaves a truncated checkpoint."""
    import torch

    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)
