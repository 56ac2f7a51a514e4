"""`logitguard experiment run EXP [--variant toy]`, `experiment report`, `experiment compare` and `experiment list`:
the runner of experiment files (the paper's tables, the real-model studies). The speed and memory benchmarks are the
scripts under bench/; `logitguard bench`, this command's old name, still works for one release."""

from __future__ import annotations

import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "experiment", aliases=["bench"], help="run experiments/EXP.yaml (a paper table, a study) into results/; report"
    )
    sub = p.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="train + evaluate every run of an experiment into results/EXP.json")
    run.add_argument("experiment", help="a name in --experiments (e.g. table1_alpaca) or a YAML path")
    run.add_argument("--variant", help="e.g. toy: the CPU-sized version of the experiment")
    run.add_argument("--only", action="append", help="run only this run name (repeatable)")
    _common(run)
    run.add_argument("--work", default="runs/bench", help="adapters and per-run evaluation records")
    run.add_argument("--cache-dir", help="toy model, GGUF conversions and reference caches")
    run.add_argument(
        "--dry-run", action="store_true", help="list the rows it would compute (those not in the results yet) and stop"
    )
    run.set_defaults(func=_run)
    report = sub.add_parser("report", help="markdown tables and PNG plots from results/*.json")
    _common(report)
    report.add_argument("--out", help="markdown file (default: <results>/REPORT.md)")
    report.set_defaults(func=_report)
    versus = sub.add_parser(
        "compare", help="one run against another of a results file, paired item by item (95%% intervals)"
    )
    versus.add_argument("experiment", help="an experiment name (its results/EXP[--VARIANT].json) or a results JSON")
    versus.add_argument("run_a", help='a run name, e.g. "STR(I) lambda 0.1 + safety mix" (or "aligned base")')
    versus.add_argument("run_b", help="the run it is compared with: the table gives run_a minus run_b")
    versus.add_argument("--variant", help="e.g. large: results/EXP--large.json")
    _common(versus)
    versus.set_defaults(func=_compare)
    migrate = sub.add_parser("migrate", help="once: results files with absolute paths -> paths as written + hashes")
    _common(migrate)
    migrate.add_argument("--checkout", default=".", help="the folder the rows were run from (its experiments/)")
    migrate.add_argument("--cache-dir", help="the logitguard cache they were run with (default: this machine's)")
    migrate.add_argument("--work", default="runs/bench", help="the --work folder they were run with")
    migrate.set_defaults(func=_migrate)
    listing = sub.add_parser("list", help="the shipped experiments and their variants")
    _common(listing)
    listing.set_defaults(func=_list)
    for action in sub.choices.values():  # every subcommand says so when reached by the old name
        action.set_defaults(func=_noting_old_name(action.get_default("func")))


def _noting_old_name(func):
    def run(args) -> int:
        if args.command == "bench":  # one line, not a warning's file and line: this is the command line
            print("logitguard bench is deprecated: use logitguard experiment (same subcommands)", file=sys.stderr)
        return func(args)

    return run


def _common(p) -> None:
    p.add_argument("--experiments", default="experiments", help="folder of experiment YAML files")
    p.add_argument("--results", default="results", help="folder of results JSON files")


def _run(args) -> int:
    from ..experiment import load_experiment
    from ..runner import Runner

    exp = load_experiment(args.experiment, args.variant, args.experiments)
    runner = Runner(exp, args.results, args.work, args.cache_dir)
    if args.dry_run:  # what a run would cost before it starts: nothing is built, converted or computed
        todo = runner.pending(args.only)
        print(
            f"{exp.id}: {len(todo)} row(s) to compute" + (":" if todo else f", every row is in {runner.results_path}")
        )
        for name, seed in todo:
            print(f"  {name}" + (f" (seed {seed})" if seed is not None else ""))
        return 0
    runner.run(args.only)
    print(f"results in {runner.results_path}")
    return 0


def _report(args) -> int:
    from ..report import write_report

    path = write_report(args.results, args.out)
    print(f"report in {path}")
    return 0


def _compare(args) -> int:
    from ..compare import compare_table, results_file
    from ..files import read_results

    path = results_file(args.experiment, args.variant, args.results)
    print(f"{path}:")
    print(compare_table(read_results(path), args.run_a, args.run_b))
    return 0


def _migrate(args) -> int:
    from pathlib import Path

    from ..config import default_cache_dir
    from ..migrate_results import migrate_results

    checkout, cache = Path(args.checkout).resolve(), Path(args.cache_dir or default_cache_dir()).resolve()
    for path in sorted(Path(args.results).glob("*.json")):
        n = migrate_results(path, Path(args.experiments), checkout, cache, args.work)
        print(f"{path}: {n} rows migrated")
    return 0


def _list(args) -> int:
    from pathlib import Path

    from ..experiment import PACKAGED, load_experiment, variants_of

    found = sorted(Path(args.experiments).glob("*.yaml"))
    for path in found + [p for name, p in PACKAGED.items() if name not in {f.stem for f in found}]:
        exp = load_experiment(str(path))
        print(f"{path.stem:28s} variants: {', '.join(variants_of(str(path))) or '-':12s} {exp.description}")
    return 0
