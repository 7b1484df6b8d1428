"""One seed of a recipe as a benchmark arm: resumed where it stopped, read back once finished."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prunekit.experiment.recipe import Recipe
from prunekit.experiment.runner import RESULT_FILE, STORE_NAME, resume, run_recipe


def run_or_resume(recipe: Recipe, out: Path, *, source: str) -> dict[str, Any]:
    """The finished result row of the one-seed ``recipe``: its latest group under ``out/seed<S>``
    (``NAME-DIGEST``, or ``NAME-DIGEST-N`` after a deleted one) resumed, else a new group run, with
    the results store of every seed in ``out``. A run that did not finish is never returned."""
    (seed,) = recipe.seeds
    folder = out / f"seed{seed}"
    base = f"{recipe.name}-{recipe.digest()[:8]}"
    numbered = re.compile(rf"{re.escape(base)}(?:-(\d+))?")
    groups = sorted((int(m[1] or 1), g) for g in folder.glob(f"{base}*") if (m := numbered.fullmatch(g.name)))
    if groups:
        row = resume(groups[-1][1])[0]
    else:
        row = run_recipe(recipe, folder, store=out / STORE_NAME, source=source)[0]
    result = json.loads((Path(row["run_dir"]) / RESULT_FILE).read_text())
    if result.get("status") != "done":
        raise SystemExit(f"run {row['run_dir']} did not finish: {result}")
    return row
