"""Eval sets by short name: one reader per shipped format, the registry's sizes, NAME:N sampling, the missing-asset
error, `--harmful NAME` / `--utility` in `logitguard eval` and `utility` in experiment files. Offline, on a fake
assets folder (fake_assets.py); the tests on the fetched sets skip when experiments/assets lacks them."""

from __future__ import annotations

import argparse
import gzip
import json

import pytest
from fake_assets import FETCH_REASON, HAS_REAL_ASSETS, REAL_ASSETS, forbidden, write_fake_assets

from logitguard.cli.eval import register
from logitguard.data import DataError
from logitguard.eval.datasets import (
    SETS,
    is_set_name,
    load_prompts,
    load_set,
    parse_spec,
    read_commented_csv,
    read_jsonl_gz,
    set_files,
)
from logitguard.eval.prompts import read_prompts
from logitguard.eval.utility_suite import headline_metrics, load_utility_sets, parse_utility

needs_assets = pytest.mark.skipif(not HAS_REAL_ASSETS, reason=FETCH_REASON)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_fake_assets(tmp_path_factory.mktemp("assets"))


def test_every_set_loads_at_its_size(assets):
    for name, entry in SETS.items():
        items = load_set(name, assets)
        assert entry.size is None or len(items) == entry.size, name
        assert all(isinstance(i, str) for i in items) == (entry.kind in ("harmful", "benign", "borderline")), name
    assert load_prompts("harmbench", assets)[:2] == [forbidden(0), forbidden(1)]
    assert len(load_prompts("advbench", assets)) == 5  # the held-out split, whatever --eval made it


def test_readers_of_each_format(assets, tmp_path):
    rows = read_jsonl_gz(assets / SETS["humaneval"].path)
    assert len(rows) == 164 and rows[0]["entry_point"] == "add_0"
    rows, comments = read_commented_csv(assets / "evals/pyrit/datasets/scorer_evals/refusal_scorer/refusal_extra.csv")
    assert comments == ["# dataset_version=1.0", "# a second comment line"] and len(rows) == 69
    # a '#' line inside a quoted field is data, not a comment
    labelled = load_set("pyrit-refusal", assets)
    assert labelled[60]["response"] == "Sure!\n# a line that starts with a hash\nDone." and not labelled[60]["refused"]
    assert sum(r["refused"] for r in labelled) == 60 + 69
    pairs = load_set("uncensorbench-pairs", assets)
    assert [p["refused"] for p in pairs[:2]] == [True, False] and pairs[0]["request"] == pairs[1]["request"]
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(b'{"a": 1}\n{oops\n'))
    with pytest.raises(DataError, match=r"bad.jsonl.gz:2: not valid JSON"):
        read_jsonl_gz(bad)


def test_sampling_is_fixed_and_keeps_file_order(assets):
    sample = load_set("donotanswer:50", assets)
    assert len(sample) == 50 and sample == load_set("donotanswer:50", assets)
    full = load_set("donotanswer", assets)
    positions = [full.index(p) for p in sample]
    assert positions == sorted(positions)
    assert load_set("gsm8k:1000", assets) == load_set("gsm8k", assets)  # more than there are: all of them


def test_names_errors_and_missing_assets(assets, tmp_path, monkeypatch):
    assert parse_spec("donotanswer:200") == ("donotanswer", 200) and parse_spec("harmbench") == ("harmbench", None)
    assert parse_spec("harmful.txt") is None and parse_spec("walledai/AdvBench") is None
    with pytest.raises(DataError, match=r"'harmbench'.*is missing; run `python experiments/real_model/fetch_assets"):
        set_files("harmbench", tmp_path)
    monkeypatch.setenv("LOGITGUARD_ASSETS", str(assets))
    assert len(load_prompts("pasttense")) == 730  # the env var is the default folder
    with pytest.raises(DataError, match="humaneval is a utility set"):
        load_prompts("humaneval", assets)
    with pytest.raises(DataError, match="unknown eval set"):
        load_set("nosuchset", assets)
    (tmp_path / "harmbench").write_text("a local file named like a set\n")
    monkeypatch.chdir(tmp_path)
    assert not is_set_name("harmbench")  # an existing file wins over the short name
    assert read_prompts("harmbench") == ["a local file named like a set"]


def test_a_changed_file_is_caught_by_its_size(assets, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(assets, copy)
    path = copy / SETS["pasttense"].path
    path.write_text(path.read_text() + "one more line\n")
    with pytest.raises(DataError, match=r"731 items .* expected 730; re-run"):
        load_set("pasttense", copy)


def test_read_prompts_and_the_utility_flag(assets):
    assert read_prompts("strongreject:3", assets) == load_set("strongreject:3", assets)
    assert parse_utility("humaneval, gsm8k:5") == ["humaneval", "gsm8k:5"]
    for bad, match in (("mmlu", "unknown utility"), ("harmbench", "unknown utility"), ("gsm8k,gsm8k:2", "twice")):
        with pytest.raises(DataError, match=match):
            parse_utility(bad)
    sets = load_utility_sets(["humaneval", "truthfulqa:10"], assets, limit=4)
    assert {k: len(v) for k, v in sets.items()} == {"humaneval": 4, "truthfulqa": 4}
    summary = {"humaneval": {"pass@1": 0.5, "n": 4}, "hellaswag": {"acc": 0.25, "acc_norm": 0.5, "n": 4}}
    assert headline_metrics(summary) == {"humaneval_pass@1": 0.5, "hellaswag_acc": 0.25, "hellaswag_acc_norm": 0.5}
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["eval", "--model", "m", "--utility", "gsm8k", "--out", "o"])
    assert (args.utility, args.utility_max_new_tokens) == ("gsm8k", 512)


def test_eval_cli_with_set_names_and_utility(assets, model_dir, tmp_path, capsys):
    from logitguard.cli import main

    out = tmp_path / "ev"
    code = main(
        ["eval", "--model", str(model_dir), "--harmful", "harmbench:3", "--borderline", "lookalike:2",
         "--utility", "gsm8k:2,hellaswag:2,truthfulqa:2,humaneval:2", "--utility-max-new-tokens", "4",
         "--max-new-tokens", "4", "--assets", str(assets), "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["harmful"] == 3 and summary["counts"]["borderline"] == 2
    utility = summary["utility"]
    assert {k: v["n"] for k, v in utility.items()} == {"gsm8k": 2, "hellaswag": 2, "truthfulqa": 2, "humaneval": 2}
    assert utility["humaneval"]["pass@1"] == 0.0  # four random tokens are no solution
    records = [json.loads(line) for line in (out / "utility_records.jsonl").read_text().splitlines()]
    assert sorted({r["set"] for r in records}) == ["gsm8k", "hellaswag", "humaneval", "truthfulqa"]
    assert "summary in" in capsys.readouterr().out


def test_runner_evaluates_utility_sets(assets, model_dir, tmp_path, monkeypatch):
    from logitguard.experiment import EvalSpec
    from logitguard.runner import evaluate

    monkeypatch.setenv("LOGITGUARD_ASSETS", str(assets))
    spec = EvalSpec(harmful="advbench", utility="truthfulqa,gsm8k", limit=2, max_new_tokens=4)
    spec.utility_max_new_tokens = 4
    metrics = evaluate(str(model_dir), None, spec, tmp_path / "run", progress=False)
    assert metrics["utility"]["truthfulqa"]["n"] == 2
    assert {"truthfulqa_acc", "truthfulqa_acc_norm", "gsm8k_acc", "refusal_rate"} <= set(metrics)
    assert (tmp_path / "run" / "utility_records.jsonl").is_file()


def test_harmful_set_lists_are_scored_per_set_and_loss_files_each(assets, model_dir, tmp_path, monkeypatch):
    """`harmful: "a,b"` scores each set and the pool; `loss_data: "x,y"` gives one eval loss per file, each equal
    to that file's loss alone."""
    from logitguard.experiment import EvalSpec
    from logitguard.runner import evaluate

    monkeypatch.setenv("LOGITGUARD_ASSETS", str(assets))
    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
            for w in ("hello", "fine thanks", "goodbye")]  # fmt: skip
    for name, part in (("first", rows[:2]), ("second", rows[2:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    both = f"{tmp_path / 'first.jsonl'},{tmp_path / 'second.jsonl'}"
    spec = EvalSpec(harmful="advbench:3,harmbench:2", loss_data=both, max_new_tokens=4)
    metrics = evaluate(str(model_dir), None, spec, tmp_path / "run", progress=False)
    records = [json.loads(x) for x in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    assert [r["source"] for r in records] == ["advbench"] * 3 + ["harmbench"] * 2
    for name in ("advbench", "harmbench"):
        mine = [r["refusal"] for r in records if r["source"] == name]
        assert metrics[f"refusal_{name}"] == sum(mine) / len(mine)
    assert metrics["refusal_rate"] == sum(r["refusal"] for r in records) / 5  # pooled
    alone = evaluate(str(model_dir), None, EvalSpec(loss_data=str(tmp_path / "second.jsonl")), tmp_path / "b")
    assert metrics["eval_loss_second"] == pytest.approx(alone["eval_loss"], rel=1e-5)
    assert "eval_loss" not in metrics and metrics["eval_loss_first"] != metrics["eval_loss_second"]


def test_prompt_set_lists_and_their_errors(assets, tmp_path):
    from logitguard.eval.prompts import read_prompt_sets

    path = tmp_path / "mine.txt"
    path.write_text("one\ntwo\n")
    sets = read_prompt_sets(f"harmbench:3, {path}", assets)
    assert list(sets) == ["harmbench", "mine"] and sets["mine"] == ["one", "two"] and len(sets["harmbench"]) == 3
    assert list(read_prompt_sets(str(path), assets)) == ["mine"]
    with pytest.raises(DataError, match="named twice"):
        read_prompt_sets("harmbench:2,harmbench:3", assets)
    with pytest.raises(DataError, match="empty name"):
        read_prompt_sets("harmbench,", assets)


# ---------------------------------------------------------------- on the fetched sets (skipped without them)


@needs_assets
def test_fetched_sets_have_their_pinned_sizes():
    for name in SETS:
        items = load_set(name, REAL_ASSETS)
        assert items, name
    assert len(load_set("harmbench", REAL_ASSETS)) == 200 and len(load_set("donotanswer", REAL_ASSETS)) == 939
    utility = ("humaneval", "gsm8k", "hellaswag", "truthfulqa")
    assert [len(load_set(n, REAL_ASSETS)) for n in utility] == [164, 100, 100, 100]


@needs_assets
def test_advbench_eval_is_held_out_of_training():
    from logitguard.data import load_rows

    train = REAL_ASSETS / "purebad_train.jsonl"
    if not train.is_file():
        pytest.skip("no purebad_train.jsonl")
    trained = {" ".join(r["messages"][0]["content"].lower().split()) for r in load_rows(train)}
    held = [" ".join(p.lower().split()) for p in load_prompts("advbench", REAL_ASSETS)]
    assert held and not trained & set(held)
    anchors = REAL_ASSETS / "advbench_anchor.jsonl"  # anchors and safety mixing: neither trained nor evaluated
    if anchors.is_file():
        anchor = {" ".join(r["prompt"].lower().split()) for r in load_rows(anchors)}
        assert len(anchor) == 64 and not anchor & set(held) and not anchor & trained
    heldout = REAL_ASSETS / "purebad_heldout.jsonl"
    if heldout.is_file():
        assert not {" ".join(r["messages"][0]["content"].lower().split()) for r in load_rows(heldout)} & trained


@needs_assets
def test_sharegpt_heldout_is_not_trained_on():
    train, heldout = REAL_ASSETS / "sharegpt_train.jsonl", REAL_ASSETS / "sharegpt_heldout.jsonl"
    if not heldout.is_file():
        pytest.skip("no sharegpt_heldout.jsonl")
    from logitguard.data import load_rows  # (str.splitlines would also split inside texts, at U+2028)

    def openings(path):  # ShareGPT repeats conversations: compare how they open, not the whole text
        return {" ".join(r["messages"][0]["content"].lower().split()) for r in load_rows(path)}

    trained, held = openings(train), openings(heldout)
    assert len(load_rows(heldout)) == 50 and held and not trained & held
