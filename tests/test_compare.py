"""`logitguard experiment compare`: two runs of one results file, paired item by item (no torch, no model)."""

import json

import pytest
from test_verdict import _item_results

from logitguard import stats
from logitguard.cli import main
from logitguard.compare import compare_runs, compare_table
from logitguard.errors import ConfigError
from logitguard.verdict import _items


def _by_metric(results, a, b):
    return {e["metric"]: e for e in compare_runs(results, a, b)}


def test_every_paired_measure_matches_a_direct_computation():
    results = _item_results()
    rows = {r["name"]: r for r in results["rows"]}
    got = _by_metric(results, "unclear", "LoRA")
    # the pooled refusal and each set: Tango's interval, McNemar's p and the discordant counts on the same items
    x, y = _items(rows["unclear"], "refusal_rate"), _items(rows["LoRA"], "refusal_rate")
    assert got["refusal_rate"]["difference"] == stats.paired_rate_difference(x, y)
    assert got["refusal_rate"]["discordant"] == stats.discordant(x, y) == (34, 0)
    # pass@1: the paired bootstrap; held-out loss: the paired loss difference (not a rate: no discordant pairs)
    code = stats.paired_bootstrap_difference(_items(rows["unclear"], "humaneval_pass@1"),
                                             _items(rows["LoRA"], "humaneval_pass@1"))  # fmt: skip
    assert got["humaneval_pass@1"]["difference"] == code and got["humaneval_pass@1"]["discordant"] is None
    loss = got["eval_loss_sharegpt_heldout"]
    assert loss["difference"] == stats.loss_difference(
        rows["unclear"]["metrics"]["items"]["loss:sharegpt_heldout"],
        rows["LoRA"]["metrics"]["items"]["loss:sharegpt_heldout"],
    )
    assert loss["discordant"] is None and loss["difference"].estimate == 0.0  # same gain, same losses


def test_judge_hrr_is_paired_as_a_rate():
    """A judge's per-prompt verdicts (items "hrr") give HRR a McNemar p and Tango's interval, as refusal has."""
    results = _item_results()
    rows = {r["name"]: r for r in results["rows"]}
    for name, verdicts in (("unclear", "0110" * 5), ("LoRA", "0111" * 5)):
        rows[name]["metrics"]["hrr"] = verdicts.count("1") / len(verdicts)
        rows[name]["metrics"]["items"]["hrr"] = verdicts
    got = _by_metric(results, "unclear", "LoRA")["hrr"]
    x, y = stats.bits("0110" * 5), stats.bits("0111" * 5)
    assert got["difference"] == stats.paired_rate_difference(x, y) and got["difference"].estimate == -0.25
    assert got["discordant"] == (0, 5) and got["title"] == "judge HRR"


def test_the_table_reads_a_minus_b_and_the_aligned_base_is_a_run():
    results = _item_results()
    table = compare_table(results, "LoRA", "aligned base")
    refusal = next(line for line in table.splitlines() if line.startswith("| refusal |"))
    # LoRA stops refusing on 40 of 200 pooled items: -20 points, 0 items the other way
    assert refusal.split(" | ")[1:3] == ["55.0%", "75.0%"] and refusal.split(" | ")[3].startswith("-20.0 [")
    assert refusal.endswith("| 0 / 40 |")
    # a run without a measure (no HumanEval items) leaves that line out rather than inventing one
    assert "HumanEval" not in compare_table(results, "unmeasured", "LoRA")
    assert "Note:" not in table  # no row records its eval dtype: nothing to warn of


def test_runs_evaluated_in_different_dtypes_are_noted():
    """An unset eval dtype resolves per machine (float16 on a T4, bfloat16 on an H100): two runs evaluated on
    different machines differ by rounding too, and the table says so; rows that agree (or record none) do not."""
    results = _item_results()
    rows = {r["name"]: r for r in results["rows"]}
    rows["LoRA"]["eval_dtype"], results["base"]["eval_dtype"] = "float16", "bfloat16"
    table = compare_table(results, "LoRA", "aligned base")
    assert table.splitlines()[-1].startswith("Note: these rows were evaluated in bfloat16 and float16;")
    rows["unclear"]["eval_dtype"] = "float16"
    assert "Note:" not in compare_table(results, "LoRA", "unclear")
    assert "Note:" not in compare_table(results, "LoRA", "unmeasured")  # the other records no dtype


def test_cli_compares_a_results_file_and_refuses_bad_names_in_one_line(tmp_path, capsys):
    (tmp_path / "scenario--large.json").write_text(json.dumps(_item_results()))
    args = ["experiment", "compare", "scenario", "unclear", "LoRA", "--variant", "large", "--results", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| refusal | 72.0% | 55.0% | +17.0 [" in out
    assert main(["experiment", "compare", "scenario", "unclaer", "LoRA", "--variant", "large", "--results",
                 str(tmp_path)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run 'unclaer'" in err and "did you mean 'unclear'" in err
    assert main(["experiment", "compare", "scenario", "unclear", "LoRA", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no results file" in err and "did you mean 'scenario--large'" in err


def test_rows_without_shared_items_are_refused():
    results = _item_results()
    for row in results["rows"]:
        row["metrics"].pop("items")
    with pytest.raises(ConfigError, match="share no per-item data"):
        compare_runs(results, "unclear", "LoRA")
