"""An audit hook that records the file-system writes a process attempts inside one folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def audit_writes(run_dir: Path, writes: list[str]) -> None:
    """Record every file-system write under ``run_dir`` this process attempts."""
    root = str(run_dir.resolve())

    def inside(path: object) -> bool:
        try:
            return os.path.abspath(os.fsdecode(path)).startswith(root)
        except TypeError:
            return False

    def hook(event: str, args: tuple) -> None:
        if event == "open" and inside(args[0]):
            mode, flags = args[1] or "", args[2] or 0
            if any(c in mode for c in "wax+") or flags & WRITE_FLAGS:
                writes.append(f"open {args[0]}")
        elif event in ("os.rename", "os.replace") and inside(args[1]):
            writes.append(f"{event} {args[1]}")
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "sqlite3.connect") and inside(args[0]):
            writes.append(f"{event} {args[0]}")

    sys.addaudithook(hook)
