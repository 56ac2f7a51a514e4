"""Does evaluating in bfloat16 change what an experiment's evaluation says? The aligned model and the named runs'
trained adapters are evaluated again with `eval.dtype` set (the same sets, the same code), and each measure is
paired with the committed float32 row of the same model: how many items differ, the bf16-minus-fp32 difference
with its 95% interval, and each run's difference from the aligned model under both dtypes (what a verdict reads).

    python experiments/real_model/eval_dtype_agreement.py --experiment real_qwen_benign --variant large \\
        --runs "STR(cannot)" --json results/eval_dtype_agreement.json

Needs the runs trained (their adapters under runs/bench/) and the assets fetched. Writes numbers only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from logitguard.compare import compare_runs, results_file
from logitguard.experiment import load_experiment
from logitguard.files import read_results
from logitguard.report import group_rows
from logitguard.runner import ABOUT, STAGES, Runner, evaluate, slug
from logitguard.stats import bits
from logitguard.verdict import compare

BASE = "aligned base"
# the measures a verdict reads, and the per-item agreement worth counting
MEASURES = ("refusal_rate", "humaneval_pass@1", "over_refusal_benign", "over_refusal_borderline")


def differing(a: dict, b: dict) -> dict:
    """Per item set: how many items differ (outcome strings) or the largest per-conversation loss gap."""
    out = {}
    for key in sorted(set(a) & set(b)):
        if isinstance(a[key], str):
            out[key] = {"items": len(a[key]), "differ": sum(x != y for x, y in zip(bits(a[key]), bits(b[key])))}
        else:  # [[nll_sum, tokens], ...]
            gaps = [abs(x[0] / x[1] - y[0] / y[1]) for x, y in zip(a[key], b[key]) if x[1] and y[1]]
            out[key] = {"conversations": len(gaps), "max_mean_nll_diff": round(max(gaps), 5)}
    return out


def interval(i) -> dict | None:
    return None if i is None else {k: v for k, v in dataclasses.asdict(i).items() if v is not None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", required=True, help="an experiment's name or file")
    parser.add_argument("--variant", help="its variant, e.g. large")
    parser.add_argument("--results", default="results", help="the folder of its committed results")
    parser.add_argument("--runs-dir", default="runs/bench", help="where its runs were trained")
    parser.add_argument("--runs", nargs="+", default=["STR(cannot)"], help="runs whose adapters to evaluate again")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--work", default="runs/eval-dtype", help="where the evaluation records go (git-ignored)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    exp = load_experiment(args.experiment, args.variant)
    committed = read_results(results_file(args.experiment, args.variant, args.results))
    groups = {g["name"]: g["rows"] for g in group_rows(committed)}
    runs = {r.name: r for r in exp.runs}
    for name in args.runs:
        if name not in groups or name not in runs:
            raise SystemExit(
                f"no committed row {name!r} in {args.experiment} ({args.variant}); it has: {sorted(groups)}"
            )
    runner = Runner(exp, args.results, args.runs_dir)
    spec = dataclasses.replace(runner.spec, dtype=args.dtype)
    tag = f" [{args.dtype}]"
    rows, seconds = [], {}
    for name in [BASE, *args.runs]:
        fp32 = groups[name][0]  # seed 0, the row a single-seed comparison reads
        adapter = None
        if name != BASE:
            adapter = runner.config(runs[name], fp32.get("seed")).output_dir
            if not (Path(adapter) / "adapter_config.json").is_file():
                raise SystemExit(f"{name}: no trained adapter in {adapter}; run the experiment's row first")
        print(f"== {name}: evaluating in {args.dtype}", flush=True)
        start = time.perf_counter()
        metrics = evaluate(runner.model, adapter, spec, Path(args.work) / slug(name))
        about = {key: metrics.pop(key, None) for key in ABOUT}  # what evaluate says of itself: not measures
        seconds[name] = {"eval_seconds": round(time.perf_counter() - start, 1), "stages": about[STAGES]}
        rows += [{**fp32, "name": name}, {"name": name + tag, "metrics": metrics}]
    results = {"rows": rows}
    by_name = {g["name"]: g["rows"] for g in group_rows(results)}

    # no top-level "experiment" key: `experiment report` reads every results/*.json that has one as a results file
    report = {"evaluated": {"experiment": args.experiment, "variant": args.variant}, "dtype": args.dtype, "models": {}}
    for name in [BASE, *args.runs]:
        pairs = compare_runs(results, name + tag, name)
        fp32 = by_name[name][0]
        entry = {
            "seconds": seconds[name],
            # the committed row's own timing, from whichever machine ran it (compare seconds on one machine only)
            "float32_row_seconds": {"eval_seconds": fp32.get("eval_seconds"), "stages": fp32.get(ABOUT[STAGES])},
            "items": differing(by_name[name + tag][0]["metrics"]["items"], fp32["metrics"]["items"]),
            "dtype_minus_float32": {e["metric"]: interval(e["difference"]) for e in pairs},
        }
        if name != BASE:  # what a verdict reads: the run against the aligned model, under each dtype
            entry["minus_aligned"] = {
                m: {"float32": interval(compare(by_name[name], by_name[BASE], m)),
                    args.dtype: interval(compare(by_name[name + tag], by_name[BASE + tag], m))}
                for m in MEASURES
            }  # fmt: skip
        report["models"][name] = entry
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
