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
    suffix = "-sweep" + ("" if reference == "cache" else f"-{reference}")
    return dataclasses.replace(exp, name=exp.name + suffix, runs=grid_runs(lambdas, word_sets, reference))


def utility_key(rows: list[dict]) -> tuple[str, bool]:
    """The utility metric the rows have, and whether higher is better."""
    for key, higher in (("exact_match", True), ("commonsense_avg", True), ("eval_loss", False)):
        if all(key in r["metrics"] for r in rows):
            return key, higher
    raise ValueError("sweep rows have no common utility metric (exact_match, commonsense_avg or eval_loss)")


def plot_frontier(results: dict, path: Path) -> None:
    """Refusal against utility, one line per token set through its lambdas; marker size = over-refusal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in [results.get("base"), *results["rows"]] if r]
    key, higher = utility_key(rows)
    fig, ax = plt.subplots(figsize=(7, 5))
    lines: dict[str, list] = {}
    for r in results["rows"]:
        train = r["settings"]["train"]
        weight = setting(train, "reg_weight")  # rows written before the rename hold str_weight
        label = "LoRA" if weight == 0 else "STR(" + " ".join(train["safety_words"]) + ")"
        lines.setdefault(label, []).append((weight, r))
    for i, (label, points) in enumerate(sorted(lines.items())):
        points.sort(key=lambda p: p[0])
        xs = [p[1]["metrics"][key] for p in points]
        ys = [p[1]["metrics"]["refusal_rate"] for p in points]
        sizes = [20 + 400 * (p[1]["metrics"].get("over_refusal_benign") or 0) for p in points]
        ax.plot(xs, ys, "-", color=f"C{i}", alpha=0.6)
        ax.scatter(xs, ys, s=sizes, color=f"C{i}", label=label, edgecolor="k")
        for (lam, _), x, y in zip(points, xs, ys):
            ax.annotate(f"{lam:g}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if results.get("base"):
        base = results["base"]["metrics"]
        ax.scatter([base[key]], [base["refusal_rate"]], marker="*", s=200, color="k", label="aligned base")
    ax.set_xlabel(key + (" (higher is better)" if higher else " (lower is better)"))
    ax.set_ylabel("refusal rate on harmful prompts")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("safety-utility frontier (labels: lambda; marker size: benign over-refusal)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
