"""The quick-toy numbers in docs/controllers.md: the attack of tests/test_controllers.py (quick toy model, LoRA on
the 100 attack pairs, lr 2e-2, 4 epochs of 10 steps), run with

  - lambda held at 0 and at 1 (regularizer measured): the running reg the budget is compared with
  - str_budget 5 with eta 0.03 / B, 0.1 / B (the default), 0.3 / B and 1 / B: the eta table
  - safety_target 0.9 from lambda 0.01, with and without rewind, and the same attack at fixed lambda 0, 0.01, 0.1
    with the monitor only: refusal on the probe (the attack family's held-out prompts) every 5 steps

    python bench/controllers_quick.py [--work /tmp/controllers_quick]    (about a minute on one core)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from logitguard import train as train_module
from logitguard.config import load_config
from logitguard.controllers import LambdaController
from logitguard.toy import build_aligned_model, make_corpus, write_jsonl

ATTACK = dict(epochs=4.0, learning_rate=2e-2, rank=8, alpha=16, dropout=0.0, max_length=96, batch_size=10,
              save_steps=1000, logging_steps=5, resume=False)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/controllers_quick")
    work = Path(p.parse_args().work)
    toy = build_aligned_model(work / "cache", seed=0, progress=False, quick=True)
    probe = write_jsonl(make_corpus(0)["attack"]["test"], work / "probe.jsonl")

    def run(name: str, fixed: float | None = None, **settings) -> dict:
        cfg = load_config(None, {"model": str(toy), "data": str(toy / "corpus" / "attack_train.jsonl"),
                                 "output_dir": str(work / name), "cache_dir": str(work / "cache"), **ATTACK,
                                 **settings})  # fmt: skip
        make = train_module.make_controller
        if fixed is not None:  # lambda held, the regularizer still measured
            train_module.make_controller = lambda cfg, monitor=None: LambdaController(fixed)
        try:
            result = train_module.train(cfg, progress=False)
        finally:
            train_module.make_controller = make
        result.pop("trainer")
        return result

    for fixed in (0.0, 1.0):
        trace = run(f"fixed{fixed:g}", fixed=fixed, reg_weight=1.0)["lambda_controller"]["history"]
        print(f"lambda held at {fixed:g}: final running reg {trace[-1]['reg_running']:.2f}")
    for relative in (0.03, 0.1, 0.3, 1.0):
        trace = run(f"budget{relative:g}", reg_weight=1.0, str_budget=5.0, str_budget_lr=relative / 5.0)
        trace = trace["lambda_controller"]["history"]
        lambdas = [round(r["lambda"], 3) for r in trace]
        regs = [round(r["reg"], 2) for r in trace]
        print(f"str_budget 5, eta {relative:g} / B: final running reg {trace[-1]['reg_running']:.2f}, "
              f"lambda min {min(lambdas)} max {max(lambdas)}\n  lambda {lambdas}\n  reg {regs}")  # fmt: skip
    monitor = {"monitor_harmful": str(probe), "monitor_every": 5}
    for rewind in (False, True):
        trace = run(f"target_rewind{rewind}", reg_weight=0.01, safety_target=0.9, safety_target_rewind=rewind,
                    **monitor)["lambda_controller"]["history"]  # fmt: skip
        print(f"safety_target 0.9, rewind {rewind}: (step, probe refusal, lambda, rewound to) "
              f"{[(r['step'], r['refusal'], round(r['lambda'], 3), r['rewound_to']) for r in trace]}")  # fmt: skip
    for weight in (0.0, 0.01, 0.1):
        curve = run(f"monitor{weight:g}", reg_weight=weight, **monitor)["safety_monitor"]
        print(f"lambda fixed at {weight:g}: probe refusal {[(r['step'], r['refusal']) for r in curve]}")


if __name__ == "__main__":
    main()
