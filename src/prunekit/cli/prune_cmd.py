"""``prunekit prune``: prune a saved model with any registered method, as a recipe's prune stage would.

The flags are generated from the methods' schemas (every key of every ``prune`` section is a
``--key``; ``--set KEY=VALUE`` reaches nested keys), the section they build is validated by
the same code as a recipe's, and the same prune stage (:func:`prunekit.methods.run_prune`)
measures, prunes, compacts and saves. ``--method`` may be left out: the given keys pick the
method that takes them (several: those whose section is valid, then the one with the fewest keys).
"""

from __future__ import annotations

import argparse
import json
import typing
from pathlib import Path
from typing import Any

from rich.table import Table

from prunekit.artifact import load_artifact
from prunekit.cli.common import add_device_argument, check_plot_path, console, key_value_table
from prunekit.device import resolve_device
from prunekit.errors import UserError
from prunekit.experiment.recipe import RecipeError, apply_overrides, parse_yaml, validate_prune
from prunekit.io import atomic_path, write_json
from prunekit.methods import METHODS, MethodContext, run_prune

KEY = "key:"
"""Prefix of the argparse destinations that hold method keys."""


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("prune", help="prune a saved model with a method (weights=, filters=, macs= or its own keys)")
    parser.add_argument("model_dir", type=Path, help="directory with model.json + model.safetensors")
    parser.add_argument("--method", default=argparse.SUPPRESS,
                        help=f"one of {', '.join(METHODS.names())} (default: the plainest method that takes the "
                             "given keys)")
    keys = parser.add_argument_group("method keys (the recipe's prune section; see docs/recipes.md)")
    for name, (annotation, owners) in _method_keys().items():
        flag = "--" + name.replace("_", "-")
        where = f"key of {', '.join(owners)}"
        if annotation is bool:
            keys.add_argument(flag, dest=KEY + name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                              help=where)
        else:
            keys.add_argument(flag, dest=KEY + name, type=_yaml_value(flag), default=argparse.SUPPRESS,
                              metavar="VALUE", help=f"{where} (YAML)")
    keys.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="any key of the method's section, nested ones too (schedule.name=agp)")
    parser.add_argument("--sweep", metavar="KEY=V1,V2,...", default=None,
                        help="prune the same model once per value of one key (e.g. ratio=0.3,0.5,0.7 or "
                             "target=weights=0.5,weights=0.9) into OUT/KEY=VALUE/, measuring each at once (data "
                             "from --data-dir, else $PRUNEKIT_DATA or ./data); writes OUT/sweep.json")
    parser.add_argument("--plot", type=Path, default=None, help="with --sweep: accuracy against sparsity (.png/.pdf/.svg)")
    parser.add_argument("--plot-with", type=Path, action="append", default=[], metavar="SWEEP_JSON",
                        help="with --plot: more curves from earlier sweeps (their sweep.json)")
    parser.add_argument("--no-compact", action="store_true", help="keep pruned filters as zeros (compact later)")
    parser.add_argument("--seed", type=int, default=0, help="for random scores")
    parser.add_argument("--data-dir", default=None,
                        help="where the model's data set is: measures accuracy right after pruning (and is "
                             "needed by methods that train or look at data); pass '' for the default location")
    add_device_argument(parser)
    parser.add_argument("--out", type=Path, required=True, help="directory for the pruned model")
    parser.set_defaults(run=run)


def _method_keys() -> dict[str, tuple[Any, list[str]]]:
    """Every key of every registered method's section (but ``method``): its type and the methods."""
    keys: dict[str, tuple[Any, list[str]]] = {}
    for name in METHODS:
        for key, field in METHODS.get(name).model_fields.items():
            if key != "method":
                keys.setdefault(key, (_plain(field.annotation), []))[1].append(name)
    return keys


def _plain(annotation: Any) -> Any:
    """``bool`` for ``bool`` and ``bool | None``; the annotation otherwise."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return bool if annotation is bool or args == [bool] else annotation


def _yaml_value(flag: str):
    def parse(text: str) -> Any:
        try:
            return parse_yaml(text, flag)
        except RecipeError as exc:
            raise argparse.ArgumentTypeError(exc.problems[0].message) from None

    return parse


def section(args: argparse.Namespace, swept: str | None = None) -> dict[str, Any]:
    """The ``prune`` section the flags describe (``method`` inferred when not given, counting the
    ``swept`` key as given)."""
    given = {dest[len(KEY):]: value for dest, value in vars(args).items() if dest.startswith(KEY)}
    problems = apply_overrides(given, args.set)
    if problems:
        raise RecipeError(problems)
    method = getattr(args, "method", None) or _infer_method({**given, **({swept: None} if swept else {})})
    return {"method": method, **given}


def _infer_method(given: dict[str, Any]) -> str:
    def keys(name: str) -> dict[str, Any]:
        return {k: f for k, f in METHODS.get(name).model_fields.items() if k != "method"}

    complete = [name for name in METHODS if all(k in given for k, f in keys(name).items() if f.is_required())]
    fits = [name for name in complete if set(given) <= set(keys(name))]
    if len(fits) > 1:  # keys several methods take: those whose section is valid, then the plainest one
        valid = [name for name in fits if _validates({"method": name, **given})] or fits
        fewest = min(len(keys(name)) for name in valid)
        fits = [name for name in valid if len(keys(name)) == fewest]
    if len(fits) == 1:
        return fits[0]
    if not fits and len(complete) == 1:  # the one method the required keys point to, given a key it lacks
        extra = sorted(set(given) - set(keys(complete[0])))[0]
        raise UserError(f"--{extra.replace('_', '-')}: not a key of method {complete[0]} "
                        f"(it takes {', '.join(keys(complete[0]))})")
    which = f"they fit {', '.join(fits)}" if fits else "no method takes exactly these keys"
    raise UserError(f"--method: name the method ({', '.join(METHODS.names())}); {which}")


def _validates(raw: dict[str, Any]) -> bool:
    try:
        validate_prune(raw)
    except (RecipeError, UserError):
        return False
    return True


def _flag_wording(error: RecipeError) -> UserError:
    """``prune.round_to: ...`` -> ``--round-to: ...``."""
    lines = []
    for problem in error.problems:
        key = problem.path.removeprefix("prune.").removeprefix("prune")
        flag = "--" + key.split(".")[0].replace("_", "-") if key else "--method"
        lines.append(f"{flag}: {problem.message}" if "." not in key else f"--set {key}: {problem.message}")
    return UserError("\n".join(lines))


def run(args: argparse.Namespace) -> int:
    if args.out.resolve() == args.model_dir.resolve():
        raise UserError("--out: must differ from the input model directory")
    if args.plot is not None:
        check_plot_path(args.plot)
        if args.sweep is None:
            raise UserError("--plot: draws a --sweep; add --sweep KEY=V1,V2,...")
    if args.sweep is not None:
        return _sweep(args)
    method = _method(section(args))
    summary = _prune_into(method, args, args.out)
    write_json(args.out / "prune.json", summary)
    rows = [("MACs", f"{summary['macs_before']:,} -> {summary['macs_after']:,} "
                     f"({summary['macs_after'] / summary['macs_before']:.3f}x)"),
            ("params", f"{summary['params_before']:,} -> {summary['params_after']:,} "
                       f"({summary['params_after'] / summary['params_before']:.3f}x)")]
    if "realised_sparsity" in summary:
        rows.append(("removed", f"{summary['realised_sparsity']:.4f} of the {summary['realised_covers']}"))
    if "sparsity_line" in summary:  # a method's own account (e.g. a refilled model is mask + constant)
        rows.append(("sparsity", summary["sparsity_line"]))
    rows.append(("compacted", "yes" if summary["compacted"] else
                 "no (zeros in place; masks in masks.safetensors)" if (args.out / "masks.safetensors").is_file()
                 else "no (dense shapes, no masks)"))
    if "test_acc_after_prune" in summary:
        rows.append(("test accuracy right after pruning", f"{summary['test_acc_after_prune']:.4f}"))
    rows.append(("saved to", str(args.out)))
    console().print(key_value_table(f"pruned {args.model_dir} ({method.method}: {method.describe()['target']})", rows))
    return 0


def _method(raw: dict[str, Any]):
    try:
        return validate_prune(raw)
    except RecipeError as exc:
        raise _flag_wording(exc) from None


def _prune_into(method, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The prune stage on a freshly loaded copy of the input model; its summary."""
    model, spec = load_artifact(args.model_dir)
    ctx = MethodContext(args.seed, tuple(spec.input_shape), resolve_device(args.device),
                        data_factory=_data_factory(spec, args) if args.data_dir or args.sweep else None,
                        fit_fn=_fit_fn(spec, args))
    return {"source": str(args.model_dir), **run_prune(method, model, spec, ctx, out, compact=not args.no_compact)}


def _sweep(args: argparse.Namespace) -> int:
    """One prune per value of one key, each measured at once: the accuracy-against-sparsity curve."""
    key, sep, values = args.sweep.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key or not values.strip():
        raise UserError(f"--sweep: expected KEY=V1,V2,... such as ratio=0.3,0.5, got {args.sweep!r}")
    base = section(args, swept=key)
    parse = _yaml_value("--sweep")
    methods = [_method({**base, key: parse(text.strip())}) for text in values.split(",")]  # all checked first
    rows = []
    for text, method in zip(values.split(","), methods):
        summary = _prune_into(method, args, args.out / f"{key}={text.strip()}")
        rows.append({key: text.strip(), **{k: summary.get(k) for k in SWEEP_FIELDS}})
    label = f"{base['method']} ({args.model_dir.name})"
    write_json(args.out / "sweep.json", {"source": str(args.model_dir), "key": key, "label": label, "rows": rows})
    table = Table(title=f"{label}: accuracy right after pruning, no retraining")
    for column in (key, "removed", "test acc", "MACs", "params"):
        table.add_column(column, justify="right")
    for row in rows:
        removed = "" if row["realised_sparsity"] is None else f"{row['realised_sparsity']:.3f}"
        table.add_row(row[key], removed, f"{row['test_acc_after_prune']:.4f}", f"{row['macs_after']:,}",
                      f"{row['params_after']:,}")
    console().print(table)
    if args.plot is not None:
        plot_sweeps([json.loads((args.out / "sweep.json").read_text()), *map(_read_sweep, args.plot_with)],
                    args.plot)
        console().print(f"wrote {args.plot}")
    return 0


SWEEP_FIELDS = ("realised_sparsity", "realised_covers", "test_acc_after_prune", "macs_after", "params_after")


def _read_sweep(path: Path) -> dict[str, Any]:
    try:
        sweep = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        sweep = None
    if not isinstance(sweep, dict) or not isinstance(sweep.get("rows"), list) or "label" not in sweep:
        raise UserError(f"--plot-with: {str(path)!r} is not a sweep.json written by prunekit prune --sweep")
    return sweep


def plot_sweeps(sweeps: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for sweep in sweeps:
        rows = [r for r in sweep["rows"] if r.get("realised_sparsity") is not None]
        ax.plot([r["realised_sparsity"] for r in rows], [100 * r["test_acc_after_prune"] for r in rows],
                marker="o", label=sweep["label"])
    ax.set(xlabel="removed (fraction of the pruned layers' weights or filters)", ylabel="test accuracy (%)",
           title="right after pruning, no retraining")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower())
    plt.close(fig)


def _data_factory(spec, args: argparse.Namespace):
    from prunekit.data import build_data

    return lambda **changes: build_data(spec.data or "cifar10", **{"data_dir": args.data_dir, "seed": args.seed,
                                                                   **changes})


def _fit_fn(spec, args: argparse.Namespace):
    """Training for methods that train while pruning: in OUT/training, with a progress bar."""
    def fit(model, train_spec, hooks, data=None):
        from prunekit.cli.progress import ProgressHook
        from prunekit.schema import TrainSpec
        from prunekit.train.trainer import Trainer

        if args.data_dir is None:
            raise UserError("--data-dir: this method trains while it prunes; say where the data set is")
        data = data or _data_factory(spec, args)()
        config = train_spec.config(args.seed) if isinstance(train_spec, TrainSpec) else train_spec
        trainer = Trainer(model, data.train, data.test, config,
                          hooks=[*hooks, ProgressHook(console())], run_dir=args.out / "training",
                          device=resolve_device(args.device))
        return trainer, trainer.fit(resume=True)

    return fit
