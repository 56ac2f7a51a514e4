"""`logitguard sweep`: a lambda x token-set grid over one shared reference cache, and its frontier plot."""

from __future__ import annotations

from ..experiment import load_experiment
from ..sweep import plot_frontier, sweep_experiment


def register(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="lambda x token-set grid over one shared cache; frontier plot")
    p.add_argument("experiment", help="experiment file or name giving model, training data and evaluation")
    p.add_argument("--variant", help="e.g. toy")
    p.add_argument("--lambdas", default="0.25,0.5,1,2,4", help="comma-separated lambdas")
    p.add_argument("--words", default="I;cannot", help="token sets: ';' between sets, ',' inside (I;I,cannot)")
    p.add_argument("--reference", default="cache", choices=["cache", "online", "paper"])
    p.add_argument("--experiments", default="experiments")
    p.add_argument("--results", default="results")
    p.add_argument("--work", default="runs/bench")
    p.add_argument("--cache-dir")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ..runner import Runner

    lambdas = [float(x) for x in args.lambdas.split(",") if x.strip()]
    word_sets = [[w.strip() for w in s.split(",") if w.strip()] for s in args.words.split(";") if s.strip()]
    exp = sweep_experiment(load_experiment(args.experiment, args.variant, args.experiments), lambdas, word_sets,
                           args.reference)  # fmt: skip
    runner = Runner(exp, args.results, args.work, args.cache_dir)
    runner.extra = {"sweep": {"lambdas": lambdas, "word_sets": word_sets, "reference": args.reference}}
    results = runner.run()
    png = runner.results_path.with_suffix(".frontier.png")
    plot_frontier(results, png)
    total = sum(r.get("train_seconds") or 0 for r in results["rows"]) + (results.get("cache_seconds") or 0)
    print(f"results in {runner.results_path}, frontier in {png}; training + cache: {total:.0f} s")
    return 0
