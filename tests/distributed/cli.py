"""``prunekit ARGS`` under torchrun, with ranks other than 0 auditing their writes inside ROOT.

    python -m torch.distributed.run ... tests/distributed/cli.py ROOT REPORT -- ARGS...

Rank R writes the writes it attempted inside ROOT to REPORT/writes<R>.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from audit import audit_writes  # noqa: E402

from prunekit.cli.main import main  # noqa: E402

if __name__ == "__main__":
    root, report, argv = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[4:]
    rank = os.environ.get("RANK", "0")
    writes: list[str] = []
    if rank != "0":
        audit_writes(root, writes)
    code = main(argv)
    report.mkdir(parents=True, exist_ok=True)
    (report / f"writes{rank}.json").write_text(json.dumps(writes))
    sys.exit(code)
