"""Do the lambda controllers (logitguard.controllers) land near the toy's lambda frontier in one run?

On the toy aligned model (the demo's, full size unless --quick) and the demo's two scenarios (attack: LoRA on
harmful-compliance pairs; benign: a new task), with the demo's schedules and evaluation:
  probe       lambda 1e-6: plain LoRA in effect, with the regularizer measured (its final value R0 picks B)
  STR lambda  fixed 0.03, 0.1, 0.25 and 1 (points of the frontier)
  str_budget  B = R0 / 4 and R0 / 16, lambda starting at 1, default eta (0.1 / B)
  safety_target 0.95 on the probe prompts (the attack family's held-out prompts, in no evaluation set),
              lambda starting at 0.1, every 5 (attack) / 20 (benign) steps, with and without rewind
Each run is evaluated as the demo evaluates (refusal on the harmful test prompts, over-refusal, benign and new-task
exact match) and written to --out as it finishes; a rerun skips the runs already there.

    python bench/controllers_toy.py --scenario attack --out bench/results/controllers_toy.json
    python bench/controllers_toy.py --scenario new_task --out bench/results/controllers_toy.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from logitguard.config import TrainConfig
from logitguard.demo import evaluate_demo, run_values
from logitguard.files import write_json_atomic
from logitguard.toy import make_corpus, write_jsonl
from logitguard.train import release_trainer, train

EVERY = {"attack": 5, "new_task": 20}  # safety checks: ~10 per run
SCENARIO = {"attack": "attack", "new_task": "benign"}  # --scenario (the toy data) -> the demo file's scenario


def runs(scenario: str, r0: float | None) -> list[tuple[str, dict]]:
    out = [("probe (lambda 1e-6)", {"reg_weight": 1e-6})]
    out += [(f"STR lambda {w:g}", {"reg_weight": w}) for w in (0.03, 0.1, 0.25, 1.0)]
    if r0 is not None:
        out += [(f"str_budget R0/{k}", {"reg_weight": 1.0, "str_budget": round(r0 / k, 4)}) for k in (4, 16)]
    target = {"reg_weight": 0.1, "safety_target": 0.95}
    out += [("safety_target 0.95", target), ("safety_target 0.95 rewind", {**target, "safety_target_rewind": True})]
    return out


def final_reg(trainer) -> float:
    """The probe's regularizer at the end: the mean of its last two logged values."""
    values = [row["reg"] for row in trainer.state.log_history if "reg" in row and "eval_loss" not in row]
    return sum(values[-2:]) / len(values[-2:])


class Bench:
    """One scenario's runs, written to the results file as each finishes."""

    def __init__(self, args):
        self.args, self.out, self.work = args, Path(args.out), Path(args.work)
        self.results = json.loads(self.out.read_text()) if self.out.is_file() else {}
        self.cache = str(self.work / "cache")
        # the demo's settings for this scenario, its toy built in <work>/cache
        self.values = run_values(SCENARIO[args.scenario], args.quick, self.cache)
        self.probe = write_jsonl(make_corpus(0)["attack"]["test"], self.work / "probe_attack_test.jsonl")
        self.key = f"{'quick' if args.quick else 'full'}/{args.scenario}"
        schedule = {k: self.values[k] for k in ("epochs", "learning_rate", "target_modules") if k in self.values}
        self.done = self.results.setdefault(self.key, {"schedule": schedule, "runs": {}})
        if "aligned" not in self.done:
            self.done["aligned"] = self.evaluate(None, self.work / self.key / "aligned")

    def evaluate(self, adapter, folder: Path) -> dict:
        return evaluate_demo(adapter, folder / "eval", self.args.quick, self.cache)

    def run(self, name: str, settings: dict) -> None:
        if name in self.done["runs"]:
            return
        folder = self.work / self.key / name.replace(" ", "_").replace("/", "-")
        cfg = TrainConfig(**{**self.values, "output_dir": str(folder), "logging_steps": 5,
                             "save_steps": 10_000, "resume": False, "monitor_harmful": str(self.probe),
                             "monitor_every": EVERY[self.args.scenario], **settings})  # fmt: skip
        start = time.perf_counter()
        result = train(cfg, progress=False)
        metrics = self.evaluate(folder, folder)
        row = {"settings": settings, **metrics, "train_seconds": result["train_seconds"],
               "seconds": time.perf_counter() - start, "final_reg": final_reg(result["trainer"]),
               "probe_refusal": [(r["step"], r["refusal"]) for r in result["safety_monitor"]]}  # fmt: skip
        controller = result["lambda_controller"]
        if controller is not None:
            trace = controller["history"]
            row["controller"] = {k: v for k, v in controller.items() if k != "history"}
            running = [r["reg_running"] for r in trace if r.get("reg_running") is not None]
            row["final_reg_running"] = running[-1] if running else None
            row["lambda_trace"] = [(r["step"], round(r["lambda"], 4)) for r in trace][:: max(1, len(trace) // 20)]
            row["rewinds"] = [(r["step"], r["rewound_to"]) for r in trace if r.get("rewound_to") is not None]
        release_trainer(result.pop("trainer"))
        if name.startswith("probe"):
            self.done["R0"] = row["final_reg"]
        self.done["runs"][name] = row
        write_json_atomic(self.out, self.results)
        weight = controller["final_lambda"] if controller else settings["reg_weight"]
        print(f"{self.key} {name}: refusal {metrics['refusal_rate']:.2f} new-task EM "
              f"{metrics['new_task_exact_match']:.2f} benign EM {metrics['benign_exact_match']:.2f} "
              f"reg {row['final_reg']:.3f} lambda {weight:.4g} ({row['seconds']:.0f} s)", flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=["attack", "new_task"], required=True)
    p.add_argument("--out", default="bench/results/controllers_toy.json")
    p.add_argument("--work", default="runs/controllers_toy", help="adapters and caches")
    p.add_argument("--quick", action="store_true", help="the quick toy model and schedule (CI-sized)")
    p.add_argument("--only", help="run only the runs whose name starts with this")
    args = p.parse_args()
    bench = Bench(args)
    bench.run(*runs(args.scenario, None)[0])  # the probe first: the budgets are fractions of its R0
    for name, settings in runs(args.scenario, bench.done["R0"])[1:]:
        if args.only is None or name.startswith(args.only):
            bench.run(name, settings)
    summary = {k: v for k, v in bench.done.items() if k != "runs"}
    summary["aligned"] = {k: v for k, v in summary["aligned"].items() if k != "items"}  # per-item data: in --out
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
