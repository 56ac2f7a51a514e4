"""`logitguard sweep EXP`: a grid of lambdas x safety-token sets over one shared reference cache, and the
safety-utility frontier it traces.

The grid reuses an experiment file's model, training and evaluation settings (its own runs are replaced):
one plain run (lambda 0) plus one run per (token set, lambda). With the default cached reference the
aligned model's K logits are computed once for the whole grid; `--reference paper` runs the same grid
with the paper's online full-vocabulary reference, to measure what the cache saves.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .errors import ConfigError
from .experiment import Experiment, RunSpec
from .result_keys import setting


def grid_runs(lambdas: list[float], word_sets: list[list[str]], reference: str = "cache") -> list[RunSpec]:
    runs = [RunSpec("LoRA", {"reg_weight": 0.0})]
    for words in word_sets:
        for lam in lambdas:
            if lam > 0:
                name = f"STR({' '.join(words)}) lambda {lam:g}"
                runs.append(RunSpec(name, {"safety_words": words, "reg_weight": lam, "reference": reference}))
    return runs


def sweep_experiment(exp: Experiment, lambdas, word_sets, reference: str = "cache") -> Experiment:
    if any(r.scenario for r in exp.runs):  # its grid runs would have no scenario, so no data or schedule
        raise ConfigError(f"logitguard sweep: {exp.id} has scenarios; sweep an experiment without them (copy one "
                          "scenario's train settings into a file's `train:`)")  # fmt: skip
    suffix = "-sweep" + ("" if reference == "cache" else f"-{reference}")
    return dataclasses.replace(exp, name=exp.name + suffix, runs=grid_runs(lambdas, word_sets, reference))


def utility_key(rows: list[dict]) -> tuple[str, bool]:
    """The utility metric the rows have, and whether higher is better."""
    for key, higher in (("exact_match", True), ("commonsense_avg", True), ("eval_loss", False)):
        if all(key in r["metrics"] for r in rows):
            return key, higher
    raise ValueError("sweep rows have no common utility metric (exact_match, commonsense_avg or eval_loss)")


def plot_frontier(results: dict, path: Path) -> None:
    """Refusal against utility, one line per token set through its lambdas (labels: lambda); marker size =
    over-refusal; drawn by verdict.plot_frontier."""
    from .verdict import Point
    from .verdict import plot_frontier as draw

    rows = [r for r in [results.get("base"), *results["rows"]] if r]
    key, higher = utility_key(rows)
    points = []
    for r in results["rows"]:
        train = r["settings"]["train"]
        weight = setting(train, "reg_weight")  # rows written before the rename hold str_weight
        group = "LoRA" if weight == 0 else "STR(" + " ".join(train["safety_words"]) + ")"
        m = r["metrics"]
        points.append(Point(f"{weight:g}", m[key], m["refusal_rate"], m.get("over_refusal_benign"), group=group,
                            order=weight))  # fmt: skip
    if results.get("base"):
        base = results["base"]["metrics"]
        points.append(Point("aligned base", base[key], base["refusal_rate"], base.get("over_refusal_benign")))
    if not points:
        return  # nothing measured yet
    xlabel = key + (" (higher is better)" if higher else " (lower is better)")
    draw(points, path, xlabel, "safety-utility frontier (labels: lambda; marker size: benign over-refusal)")
