"""`logitguard experiment report`: markdown tables and PNG plots from results/*.json, the paper's numbers beside ours.
An experiment with a target (verdict.py) also gets a target column and a frontier plot. Rows that carry per-item
outcomes (metrics["items"]) get, in each compared cell, the difference from the reference run with its 95%
interval (stats.py; docs/statistics.md).

Rows with several seeds are shown as mean (and min-max); every table keeps safety (refusal, ASR, HRR),
over-refusal and utility side by side: a safety number is never read without what it cost.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from statistics import mean

from .errors import ConfigError
from .files import write_text_atomic
from .stats import Interval
from .verdict import (
    ALIGNED,
    Target,
    compare,
    is_loss,
    is_task_metric,
    metric_value,
    plot_experiment_frontier,
    plot_trade,
    run_target,
    task_share,
    verdicts,
)

# (metric key, column title, format): the columns a table shows when any row has the metric
COLUMNS = [
    ("refusal_rate", "refusal", "pct"),
    ("asr", "keyword ASR", "pct"),
    ("hrr", "judge HRR", "pct"),
    ("over_refusal_benign", "over-refusal benign", "pct"),
    ("over_refusal_borderline", "over-refusal borderline", "pct"),
    ("exact_match", "utility EM", "pct"),
    ("humaneval_pass@1", "HumanEval pass@1", "pct"),
    ("gsm8k_acc", "GSM8K", "pct"),
    ("hellaswag_acc_norm", "HellaSwag acc_norm", "pct"),
    ("truthfulqa_acc", "TruthfulQA MC1", "pct"),
    ("eval_loss", "eval loss", "f3"),
    ("commonsense_avg", "commonsense avg", "pct"),
]
SAFETY_COLUMNS = 5  # the first five are safety (the plot's first panel), the rest utility
# metric families with one column per set, "<prefix><set>", placed after the column of `after`
PER_SET = (
    ("refusal_", "refusal_rate", "refusal {}", "pct"),
    ("exact_match_", "exact_match", "EM {}", "pct"),
    ("eval_loss_", "eval_loss", "eval loss {}", "f3"),
)


def columns(groups: list[dict]) -> list[tuple[str, str, str]]:
    """The columns some row measured: COLUMNS, with a column per harmful set and per eval-loss file."""
    keys = [k for g in groups for r in g["rows"] for k in r["metrics"]]
    known = {c[0] for c in COLUMNS}
    out = []
    for column in COLUMNS:
        if _has(groups, column[0]):
            out.append(column)
        for prefix, after, title, kind in PER_SET:
            if column[0] == after:
                sets = dict.fromkeys(k for k in keys if k.startswith(prefix) and k not in known)
                out += [(k, title.format(k.removeprefix(prefix)), kind) for k in sets]
    return out


def _fmt(value, kind: str) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}%" if kind == "pct" else f"{value:.3f}"


ROW_DTYPE = "eval_dtype"  # the dtype a row was evaluated in (runner); rows written before it record none


def mixed_dtypes(rows: list[dict]) -> str | None:
    """A note when these rows were evaluated in more than one dtype: an unset eval dtype resolves per machine
    (float32 on CPU, the checkpoint's dtype on a GPU, float16 on a T4), and rounding then differs between rows
    as well as training. None when they agree or record nothing."""
    dtypes = sorted({r[ROW_DTYPE] for r in rows if r.get(ROW_DTYPE)})
    if len(dtypes) < 2:
        return None
    return (
        f"Note: these rows were evaluated in {' and '.join(dtypes)}; their differences include rounding. Set "
        "eval.dtype in the experiment file to evaluate every row alike."
    )


def group_rows(results: dict) -> list[dict]:
    """The base row, then one entry per run name with its per-seed rows, in the file's order."""
    groups: dict[str, dict] = {}
    if results.get("base"):
        groups["aligned base"] = {"name": "aligned base", "rows": [results["base"]]}
    for row in results.get("rows", []):
        groups.setdefault(row["name"], {"name": row["name"], "rows": []})["rows"].append(row)
    return list(groups.values())


def _has(groups: list[dict], key: str) -> bool:
    """Whether any row measured `key` (a prompt set that was not given leaves it None)."""
    return any(r["metrics"].get(key) is not None for g in groups for r in g["rows"])


def cell(rows: list[dict], key: str, kind: str) -> str:
    values = [r["metrics"].get(key) for r in rows if r["metrics"].get(key) is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return _fmt(values[0], kind)
    return f"{_fmt(mean(values), kind)} ({_fmt(min(values), kind)}–{_fmt(max(values), kind)})"


def signed(value: float, kind: str) -> str:
    if kind == "pct":
        return f"{100 * value:+.1f}"
    return f"{value:+.3f}"


def _versus(interval: Interval | None, kind: str) -> str:
    """The bracket " (-1.0 [-8.2, +6.1], p=0.77)": difference from the reference (points for rates), 95% interval."""
    if interval is None:
        return ""
    p = "" if interval.p is None else f", p={interval.p:.2g}"
    lo, hi = signed(interval.lo, kind), signed(interval.hi, kind)
    return f" ({signed(interval.estimate, kind)} [{lo}, {hi}]{p})"


def _share(interval: Interval, of: str) -> str:
    def pct(v: float) -> str:  # an unbounded end (LoRA's own gain unclear) prints as -inf / +inf
        return "?" if v != v else f"{v:+}" if abs(v) == float("inf") else f"{100 * v:.0f}%"

    return f" (gain {pct(interval.estimate)} of {of}'s [{pct(interval.lo)}, {pct(interval.hi)}])"


def reference_of(metric: str, target: Target) -> str:
    """The run a column is compared with: the aligned base for safety and loss, and for skills when the run's target
    judges none (the demo's attack runs: what the attack cost); the target's utility run else."""
    if metric.startswith(("refusal_", "over_refusal_")) or is_loss(metric) or not target.utility:
        return ALIGNED
    return target.utility_of


def _compared(name: str, rows: list[dict], by_name: dict, metric: str, kind: str, target: Target) -> str:
    """The bracket after a cell: its difference from the reference run, or (task loss) the share of the task gain."""
    if is_task_metric(metric, rows, target) and name not in (ALIGNED, target.task_gain_of):
        share = task_share(rows, by_name, target)
        return "" if share is None else _share(share, target.task_gain_of)
    of = reference_of(metric, target)
    if name == of or of not in by_name:
        return ""
    return _versus(compare(rows, by_name[of], metric), kind)


def has_items(results: dict) -> bool:
    return any(r["metrics"].get("items") for g in group_rows(results) for r in g["rows"])


def experiment_table(results: dict) -> str:
    groups = group_rows(results)
    metrics = columns(groups)
    by_name = {g["name"]: g["rows"] for g in groups} if has_items(results) else {}
    paper = results.get("paper") or {}
    paper_rows = paper.get("rows") or {}
    header = ["run", "seeds"] + [title for _, title, _ in metrics] + ["step s", "train s"]
    if paper_rows:
        header.append(f"paper {paper.get('metric', '')}".strip())
    judged = verdicts(groups, results) if results.get("target") else None
    if judged is not None:
        header.append("target")
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for g in groups:
        rows = g["rows"]
        steps = [r["step_seconds"] for r in rows if r.get("step_seconds")]
        train = [r["train_seconds"] for r in rows if r.get("train_seconds")]
        cells = [g["name"], str(len(rows))]
        for key, _, kind in metrics:
            text = cell(rows, key, kind)
            if by_name and text != "–":
                text += _compared(g["name"], rows, by_name, key, kind, run_target(results, g["name"]))
            cells.append(text)
        cells += [f"{mean(steps):.2f}" if steps else "–", f"{mean(train):.0f}" if train else "–"]
        if paper_rows:
            value = paper_rows.get(g["name"])
            cells.append("–" if value is None else _fmt(value, "pct") if isinstance(value, float) else str(value))
        if judged is not None:
            cells.append(judged.get(g["name"], "–"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def step_ratios(results: dict) -> dict[str, float]:
    """Mean step time of each run over the mean step time of the plain-method run ("LoRA" by default)."""
    groups = {g["name"]: g["rows"] for g in group_rows(results)}
    base = groups.get(results.get("paper", {}).get("step_baseline", "LoRA"))
    if not base or not all(r.get("step_seconds") for r in base):
        return {}
    ref = mean(r["step_seconds"] for r in base)
    return {
        name: mean(r["step_seconds"] for r in rows) / ref
        for name, rows in groups.items()
        if rows and all(r.get("step_seconds") for r in rows)
    }


def plot_columns(results: dict, groups: list[dict]) -> tuple[list[tuple], list[tuple]]:
    """The safety columns and the utility column(s) `plot_experiment` draws (only the first utility one is)."""
    safety = [c for c in COLUMNS[:SAFETY_COLUMNS] if _has(groups, c[0])]
    utility = [c for c in COLUMNS[SAFETY_COLUMNS:] if _has(groups, c[0])]
    judged = (results.get("target") or {}).get("utility")
    if judged and any(metric_value(r, judged) is not None for g in groups for r in g["rows"]):
        # the skill the target judges; a per-file one (the demo's new-task EM) may be stored unnamed: its only file
        utility = [next((c for c in COLUMNS if c[0] == judged), (judged, judged, "pct"))]
    return safety, utility


def plot_experiment(results: dict, path: Path) -> None:
    """Safety next to utility per run: refusal / ASR / over-refusal bars, utility as a second panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_rows(results)
    names = [g["name"] for g in groups]
    safety, utility = plot_columns(results, groups)
    fig, axes = plt.subplots(1, 1 + bool(utility), figsize=(6 + 5 * bool(utility), 4.5), squeeze=False)
    width = 0.8 / max(len(safety), 1)
    for j, (key, title, _) in enumerate(safety):
        for i, g in enumerate(groups):
            values = [r["metrics"][key] for r in g["rows"] if r["metrics"].get(key) is not None]
            x = i + (j - len(safety) / 2 + 0.5) * width
            if values:
                axes[0][0].bar(x, mean(values), width, color=f"C{j}", label=title if i == 0 else None)
                if len(values) > 1:  # several seeds: show each one
                    axes[0][0].scatter([x] * len(values), values, color="k", s=8, zorder=3)
    axes[0][0].set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
    axes[0][0].set_ylim(0, 1.05)
    axes[0][0].set_title("safety")
    if safety:
        axes[0][0].legend(fontsize=7)
    if utility:
        ax = axes[0][1]
        key, title, _ = utility[0]  # one utility measure per panel: they have different scales
        values = [[v for r in g["rows"] if (v := metric_value(r, key)) is not None] for g in groups]
        positions = [i for i, v in enumerate(values) if v]
        ax.boxplot([values[i] for i in positions], positions=positions, widths=0.5)  # seeds -> a box
        ax.set_title(title)
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
    fig.suptitle(f"{results['experiment']}" + (f" ({results['variant']})" if results.get("variant") else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def experiment_section(results: dict, png: str | None, command: str | None = None) -> str:
    """One experiment's part of the report; `command`: what produced it, when not `logitguard experiment run`."""
    title = results["experiment"] + (f" — variant `{results['variant']}`" if results.get("variant") else "")
    paper = results.get("paper") or {}
    cmd = command or f"logitguard experiment run {results['experiment']}" + (
        f" --variant {results['variant']}" if results.get("variant") else ""
    )
    parts = [f"## {title}", "", results.get("description", "").strip(), "", f"Command: `{cmd}`", ""]
    if paper.get("source"):
        parts += [f"Paper: {paper['source']}." + (f" {paper['note']}" if paper.get("note") else ""), ""]
    parts += [experiment_table(results), ""]
    if has_items(results):
        target = Target(**results["target"]) if results.get("target") else Target()
        parts += [
            "In brackets: the difference from the reference run, paired on the same items, and its 95% interval: "
            f"refusal and over-refusal against the aligned base (points; Tango's score interval and McNemar's "
            f"exact p), other scores against {target.utility_of}"
            + (
                " (against the aligned base for runs judged on no skill)"
                if any(not run_target(results, g["name"]).utility for g in group_rows(results))
                else ""
            )  # fmt: skip
            + " (paired bootstrap, 10,000 resamples, seed 0), "
            "held-out loss against the aligned base (paired bootstrap over conversations)"
            + (f", and on the task loss the share of {target.task_gain_of}'s gain kept" if target.task_loss else "")
            + ". Verdict: meets / misses / unresolved at 95% (docs/statistics.md).",
            "",
        ]
    note = mixed_dtypes([r for g in group_rows(results) for r in g["rows"]])
    parts += [note, ""] if note else []
    ratios = step_ratios(results)
    if ratios:
        parts += ["Step time / LoRA step time: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()), ""]
    if results.get("cache_seconds"):
        parts += [f"Reference cache build: {results['cache_seconds']:.1f} s (shared by the STR runs).", ""]
    versions = results.get("versions", {})
    parts += [", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    if png:
        parts += [f"![{results['experiment']}]({png})", ""]
    return "\n".join(parts)


def write_report(results_dir: str | Path = "results", out: str | Path | None = None) -> Path:
    results_dir = Path(results_dir)
    files = sorted(results_dir.glob("*.json"))
    if not files:
        raise ConfigError(f"no results/*.json in {results_dir}; run `logitguard experiment run EXP` first")
    out = Path(out) if out else results_dir / "REPORT.md"
    sections = [
        "# logitguard results",
        "",
        "Made by `logitguard experiment report` from the results files next to it. Each section names the command "
        "that produced it. Paper columns are the published numbers, labelled as such; they are not ours.",
        "",
    ]
    for path in files:
        results = json.loads(path.read_text())
        if "experiment" not in results:  # another JSON in the folder (a bench/ file, say)
            continue
        png = path.with_suffix(".png")
        if results.get("base") or results.get("rows"):
            plot_experiment(results, png)
        link = os.path.relpath(png, out.parent) if png.exists() else None
        sections.append(experiment_section(results, link))
        if results.get("target"):
            frontier = path.with_suffix(".frontier.png")
            if plot_experiment_frontier(results, group_rows(results), frontier):
                sections.append(f"![frontier]({os.path.relpath(frontier, out.parent)})\n")
            trade = path.with_suffix(".trade.png")  # refusal change against the task gain kept, with intervals
            if plot_trade(results, group_rows(results), trade):
                sections.append(f"![safety-utility trade]({os.path.relpath(trade, out.parent)})\n")
        if results.get("sweep"):
            from .sweep import plot_frontier

            frontier = path.with_suffix(".frontier.png")
            plot_frontier(results, frontier)
            sections.append(f"![frontier]({os.path.relpath(frontier, out.parent)})\n")
    write_text_atomic(out, "\n".join(sections))
    return out
