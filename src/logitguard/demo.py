"""`logitguard demo`: the whole method on the embedded toy aligned chat model, on a CPU, in minutes.

The demo is an experiment file, toy/demo.yaml (its runs, its two scenarios, its target), run by the runner like
any other: `logitguard experiment run demo` computes the same rows. The toy aligned model is built (or found in the
cache), the demo's tokens are mined from it ({toy_demo}: toy/demo_inputs.py), every run is trained through
`logitguard.train.train` (the code path a user runs on a 7B model) and evaluated by the one evaluation pipeline.
`--out` gets the runner's results file (demo.json; demo--quick.json with --quick), the report's table with each
cell's 95% interval and the verdict (results.md), its bar chart (results.png) and the frontier (frontier.png). The
runner finds finished rows done, so a killed demo resumes.
"""

from __future__ import annotations

from pathlib import Path

QUICK = "quick"  # the demo file's variant for --quick


def demo_experiment(quick: bool = False):
    """The packaged demo file (never an experiments/demo.yaml of the working folder: that is a user's own copy)."""
    from .experiment import PACKAGED, load_experiment

    return load_experiment(str(PACKAGED["demo"]), QUICK if quick else None)


def run_demo(out: str | Path, quick: bool = False, cache_dir: str | None = None, progress: bool = True) -> dict:
    from .files import write_text_atomic
    from .report import experiment_section, experiment_table, group_rows, plot_experiment
    from .runner import Runner
    from .verdict import plot_experiment_frontier

    out = Path(out)
    exp = demo_experiment(quick)
    results = Runner(exp, results_dir=out, work_dir=out / "runs", cache_dir=cache_dir, progress=progress).run()
    command = f"logitguard demo --out {out}" + (" --quick" if quick else "")
    write_text_atomic(out / "results.md", experiment_section(results, "results.png", command))
    plot_experiment(results, out / "results.png")
    plot_experiment_frontier(results, group_rows(results), out / "frontier.png")
    print("\n" + experiment_table(results))
    print(f"\n{exp.id}.json, results.md, results.png and frontier.png are in {out}")
    return results


def run_values(scenario: str, quick: bool = False, cache_dir: str | None = None) -> dict:
    """The training settings a demo run in `scenario` starts from (the file's, then the scenario's), with the toy's
    paths filled in (the toy built in `cache_dir` if it is not there): for scripts that train their own variations
    on the demo's setting (bench/controllers_toy.py)."""
    from .experiment import Placeholders

    exp = demo_experiment(quick)
    run = next(r for r in exp.runs if r.name == f"{scenario} / LoRA")  # carries its scenario's settings
    ph = Placeholders(exp, cache_dir, progress=False)
    values = {**ph({**exp.train, **run.train}), "model": ph.model(), "cache_dir": ph.cache_dir}
    values.pop("reg_weight")  # LoRA's 0: the caller says which lambda
    return values


def evaluate_demo(adapter: str | Path | None, folder: str | Path, quick: bool = False, cache_dir: str | None = None,
                  progress: bool = False) -> dict:  # fmt: skip
    """The demo's evaluation of the toy model (plus an adapter), records in `folder`, as flat metrics named by
    what they measure: refusal_rate, asr, over_refusal_benign / _borderline, benign_exact_match,
    new_task_exact_match, new_task_eval_loss (the names bench/*_toy.py results use), and the per-item outcomes
    behind them under "items"."""
    from .experiment import Placeholders
    from .runner import evaluate

    ph = Placeholders(demo_experiment(quick), cache_dir, progress=progress)
    m = evaluate(str(ph.toy()), str(adapter) if adapter else None, ph.eval_spec(), Path(folder), progress)
    return {
        **{k: m[k] for k in ("refusal_rate", "asr", "over_refusal_benign", "over_refusal_borderline")},
        "benign_exact_match": m["exact_match_benign_test"],
        "new_task_exact_match": m["exact_match_new_task_test"],
        "new_task_eval_loss": m["eval_loss"],
        "items": m.get("items"),  # per-item outcomes: paired intervals between two evaluated runs (stats.py)
    }
