"""The newer terms' frontier on the toy: how much safety and how much learning each weight buys.

At lambda 1 the top-32 KL and constrained SFT's default beta froze the toy's new task (docs/demo.md). This sweeps
the knob each has, in the demo's two scenarios (attack, new_task), with the demo's schedules and evaluation, beside
the probe (lambda 1e-6: plain LoRA in effect) and STR(I) at lambda 1 from the same toy build:
  KL top-32         lambda 0.01, 0.03, 0.1, 0.3, 1
  constrained SFT   beta 0.1 (the authors'), 0.03, 0.01 (its weights saturate later: more learning)
Rows are written to --out as each finishes; a rerun skips those already there. --cache-dir points at a logitguard
cache that holds the toy (the demo's, say) so the rows compare with that build's demo rows.

    python bench/frontier_toy.py --scenario new_task --cache-dir ~/.cache/logitguard
    python bench/frontier_toy.py --scenario attack --cache-dir ~/.cache/logitguard
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from controllers_toy import Bench, runs


def frontier_runs() -> list[tuple[str, dict]]:
    kl = [(f"KL top-32 lambda {w:g}", {"regularizer": "kl", "kl_topk": 32, "reg_weight": w})
          for w in (0.01, 0.03, 0.1, 0.3, 1.0)]  # fmt: skip
    csft = [(f"constrained SFT beta {b:g}", {"regularizer": "constrained_sft", "reg_weight": 1.0, "csft_beta": b})
            for b in (0.1, 0.03, 0.01)]  # fmt: skip
    return [("STR(I) lambda 1", {"reg_weight": 1.0}), *kl, *csft]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=["attack", "new_task"], required=True)
    p.add_argument("--out", default="bench/results/frontier_toy.json")
    p.add_argument("--work", default="runs/frontier_toy", help="adapters")
    p.add_argument("--cache-dir", help="a logitguard cache holding the toy (default: <work>/cache, built there)")
    p.add_argument("--quick", action="store_true", help="the quick toy model and schedule (CI-sized)")
    args = p.parse_args()
    if args.cache_dir:  # Bench keeps its toy and reference caches in <work>/cache
        link = Path(args.work) / "cache"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(Path(args.cache_dir).expanduser().resolve(), target_is_directory=True)
    bench = Bench(args)
    bench.run(*runs(args.scenario, None)[0])  # the probe: plain LoRA in effect, its regularizer measured
    for name, settings in frontier_runs():
        bench.run(name, settings)
    summary = {name: {k: row[k] for k in ("refusal_rate", "new_task_exact_match", "benign_exact_match")}
               for name, row in bench.done["runs"].items()}  # fmt: skip
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
