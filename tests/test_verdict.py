"""The target an experiment states (verdict.py): which runs meet it, the report's per-set columns and target
column, the frontier plot, and the experiment-file errors."""

from __future__ import annotations

import json

import pytest
import yaml

from logitguard.config import ConfigError
from logitguard.experiment import load_experiment
from logitguard.report import experiment_table, group_rows, write_report
from logitguard.verdict import Target, verdicts


def _row(name, **metrics):
    return {"name": name, "seed": None, "metrics": metrics}


def _results(utility_of="aligned base"):
    base = _row("aligned base", refusal_rate=0.90, **{"humaneval_pass@1": 0.40}, refusal_advbench=0.95,
                refusal_harmbench=0.85, eval_loss_heldout=1.5)  # fmt: skip
    rows = [
        _row("LoRA", refusal_rate=0.50, **{"humaneval_pass@1": 0.45}, refusal_advbench=0.6, refusal_harmbench=0.4),
        _row("keeps both", refusal_rate=0.885, **{"humaneval_pass@1": 0.385}),  # 1.5 points down on each
        _row("loses skill", refusal_rate=0.95, **{"humaneval_pass@1": 0.35}),
        _row("loses refusal", refusal_rate=0.87, **{"humaneval_pass@1": 0.50}),
        _row("unmeasured", refusal_rate=0.95),
    ]
    target = {"refusal": "refusal_rate", "refusal_drop": 0.02, "utility": "humaneval_pass@1",
              "utility_of": utility_of, "utility_gap": 0.02}  # fmt: skip
    return {"experiment": "scenario", "variant": None, "description": "d", "base": base, "rows": rows,
            "target": target, "versions": {}}  # fmt: skip


def test_verdicts_against_a_direct_reading_of_the_target():
    results = _results()
    judged = verdicts(group_rows(results), Target(**results["target"]))
    assert judged == {"LoRA": "misses", "keeps both": "meets", "loses skill": "misses", "loses refusal": "misses",
                      "unmeasured": "–"}  # fmt: skip
    # against plain LoRA's skill (the benign scenario): 0.385 is more than 2 points below LoRA's 0.45
    results = _results("LoRA")
    judged = verdicts(group_rows(results), Target(**results["target"]))
    assert judged["keeps both"] == "misses" and judged["loses refusal"] == "misses"


def test_report_has_a_column_per_set_the_target_and_a_frontier(tmp_path):
    results = _results()
    table = experiment_table(results)
    header = table.splitlines()[0]
    for title in ("refusal advbench", "refusal harmbench", "HumanEval pass@1", "eval loss heldout", "target"):
        assert title in header
    assert header.index("refusal |") < header.index("refusal advbench") < header.index("HumanEval")
    assert "| keeps both | 1 | 88.5% |" in table and table.splitlines()[4].endswith("| meets |")
    (tmp_path / "scenario.json").write_text(json.dumps(results))
    report = write_report(tmp_path).read_text()
    assert "scenario.frontier.png" in report and (tmp_path / "scenario.frontier.png").stat().st_size > 0


def test_target_errors_name_the_key(tmp_path):
    exp = {"model": "m", "train": {"data": "d"}, "runs": [{"name": "LoRA"}],
           "target": {"utility": "humaneval_pass@1", "utility_gapp": 0.02}}  # fmt: skip
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(exp))
    with pytest.raises(ConfigError, match="unknown key 'utility_gapp'.*utility_gap"):
        load_experiment(str(path))
    exp["target"] = {"utility_of": "LoRRA"}
    path.write_text(yaml.safe_dump(exp))
    with pytest.raises(ConfigError, match="utility_of must be 'aligned base' or a run name, got 'LoRRA'"):
        load_experiment(str(path))
    exp["target"] = {"utility_of": "LoRA"}
    path.write_text(yaml.safe_dump(exp))
    assert load_experiment(str(path)).target["utility_gap"] == 0.02
