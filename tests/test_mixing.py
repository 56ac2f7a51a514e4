"""Safety-data mixing (Safety-Tuned LLaMAs): count / fraction arithmetic, the fixed-seed choice of rows, file and
`self` sources, and a training run whose data loader sees the mixed rows. Fixture text is mild and generic."""

import json

import pytest
from helpers import ASSETS

import logitguard
from logitguard.cli import main
from logitguard.config import ConfigError, load_config
from logitguard.data import DataError, load_rows, tokenize_rows
from logitguard.eval.keyword import is_refusal
from logitguard.methods import mixing
from logitguard.methods.mixing import choose, mix_count


def write_safety_rows(path, n=6):
    rows = [
        {"messages": [{"role": "user", "content": f"Tell me how to do a bad thing, number {i}."},
                      {"role": "assistant", "content": "I cannot help with that."}]}
        for i in range(n)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_count_and_fraction_arithmetic():
    assert mix_count(100, 50, count=7) == 7
    assert mix_count(8, 10, fraction=0.2) == 2  # 2 / (8 + 2) = 0.2
    assert mix_count(8, 10, fraction=0.5) == 8
    assert mix_count(3, 10, fraction=0.2) == 1  # 0.75 rounds half up to 1
    assert mix_count(5, 10, fraction=1 / 6) == 1  # exactly 0.5: half up, not to even
    assert mix_count(20000, 3000, fraction=0.1) == 2222  # 2222 / 22222 = 0.09999
    assert mix_count(100, 42) == 42  # neither: every available row
    with pytest.raises(DataError, match="only 10 are available"):
        mix_count(100, 10, count=11)
    with pytest.raises(DataError, match="rounds to 0"):
        mix_count(1, 10, fraction=0.2)
    with pytest.raises(DataError, match="exclusive"):
        mix_count(1, 10, count=1, fraction=0.5)


def test_rows_are_chosen_with_a_fixed_seed():
    chosen = choose(100, 10)
    assert chosen == choose(100, 10) == sorted(chosen) and len(set(chosen)) == 10
    assert chosen != choose(100, 10, seed=1)
    assert choose(5, 5) == [0, 1, 2, 3, 4]


def test_file_mode_appends_the_chosen_rows(tmp_path):
    safety = write_safety_rows(tmp_path / "safety.jsonl", 6)
    cfg = load_config(None, {"model": "m", "data": str(ASSETS / "chat.jsonl"), "safety_mix": str(safety),
                             "safety_mix_fraction": 0.2})  # fmt: skip
    data = load_rows(ASSETS / "chat.jsonl")
    rows, report = mixing.apply(cfg, None, None, data, progress=False)
    pool = load_rows(safety)
    assert report["mixed"] == 2 and report["data_rows"] == 8 and report["available"] == 6
    assert rows[:8] == data and rows[8:] == [pool[i] for i in report["indices"]]
    assert report["share"] == pytest.approx(0.2)
    again, _ = mixing.apply(cfg, None, None, data, progress=False)
    assert again == rows  # deterministic
    unset = load_config(None, {"model": "m", "data": "d.jsonl"})
    assert mixing.apply(unset, None, None, data) == (data, None)


def test_config_errors(tmp_path):
    base = {"model": "m", "data": "d.jsonl"}
    cases = [
        ({"safety_mix_count": 3}, "needs safety_mix"),
        ({"safety_mix": "self"}, "safety_mix_prompts"),
        ({"safety_mix": "s.jsonl", "safety_mix_prompts": "p.txt"}, "safety_mix_prompts"),
        ({"safety_mix": "s.jsonl", "safety_mix_count": 2, "safety_mix_fraction": 0.1}, "not both"),
        ({"safety_mix": "s.jsonl", "safety_mix_fraction": 1.0}, r"\[0, 1\)"),
        ({"safety_mix": "s.jsonl", "safety_mix_keywords": "nope"}, "safety_mix_keywords"),
    ]
    for extra, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(None, {**base, **extra})


def test_training_sees_the_mixed_rows(tmp_path, model_dir, tokenizer):
    """YAML keys; the data loader yields data rows plus mixed rows, and the mixed conversations are among them."""
    from logitguard.train import train

    safety = write_safety_rows(tmp_path / "safety.jsonl", 6)
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model: {model_dir}\ndata: {ASSETS / 'chat.jsonl'}\noutput_dir: {tmp_path / 'out'}\n"
        f"cache_dir: {tmp_path / 'cache'}\nsafety_mix: {safety}\nsafety_mix_count: 4\nreg_weight: 0\n"
        "max_length: 64\nbatch_size: 4\nlogging_steps: 1\nsave_steps: 100\ndisable_tqdm: true\n"
    )
    result = train(load_config(config), progress=False)
    trainer = result["trainer"]
    seen = []
    for batch in trainer.get_train_dataloader():
        for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
            seen.append(ids[: sum(mask)])
    assert len(seen) == 12 and result["global_step"] == 3  # 8 data rows + 4 safety rows, batch 4
    mixed = [load_rows(safety)[i] for i in result["safety_mix"]["indices"]]
    expected = [ex["input_ids"] for ex in tokenize_rows(tokenizer, mixed, 64)]
    assert all(any(s == e for s in seen) for e in expected)
    written = json.loads((tmp_path / "out" / "safety_mix.json").read_text())
    assert written["mixed"] == 4 and written["data_rows"] == 8 and written["source"] == str(safety)


def test_flags_and_the_run_records_the_mix(tmp_path, model_dir, capsys):
    safety = write_safety_rows(tmp_path / "safety.jsonl", 6)
    argv = ["train", "--model", str(model_dir), "--data", str(ASSETS / "chat.jsonl"), "--output-dir",
            str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--max-length", "64",
            "--batch-size", "4", "--safety-mix", str(safety), "--safety-mix-fraction", "0.2",
            "--trainer", '{"disable_tqdm": true}']  # fmt: skip
    assert main(argv) == 0
    result = json.loads(next(x for x in capsys.readouterr().out.splitlines() if x.startswith('{"output_dir"')))
    assert result["safety_mix"]["mixed"] == 2 and result["global_step"] == 3  # 10 rows, batch 4
    assert "safety_mix: " in (tmp_path / "out" / "config.yaml").read_text()


def test_self_mode_keeps_only_refusals_and_caches(quick_toy, tmp_path, monkeypatch):
    """The toy aligned model refuses its (mildly worded) harmful prompts and answers benign ones: refusals are
    kept, answers dropped and counted; the second run reads the cache instead of generating."""
    corpus = quick_toy / "corpus"
    harmful = [r["messages"][0]["content"] for r in load_rows(corpus / "harmful_test.jsonl")][:8]
    benign = [r["messages"][0]["content"] for r in load_rows(corpus / "benign_test.jsonl")][:4]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(harmful + benign) + "\n")
    cfg = load_config(None, {"model": str(quick_toy), "data": str(corpus / "benign_train.jsonl"),
                             "safety_mix": "self", "safety_mix_prompts": str(prompts), "safety_mix_count": 5,
                             "safety_mix_max_new_tokens": 24, "cache_dir": str(tmp_path / "cache")})  # fmt: skip
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(quick_toy), AutoTokenizer.from_pretrained(quick_toy)
    from logitguard.cache import tokenizer_fingerprint

    data = load_rows(corpus / "benign_train.jsonl")[:20]
    before = tokenizer_fingerprint(tokenizer)
    rows, report = mixing.apply(cfg, model, tokenizer, data, progress=False)
    assert tokenizer_fingerprint(tokenizer) == before  # generation left the run's reference cache key alone
    assert report["generated"] == 12 and report["available"] + report["dropped_not_refusal"] == 12
    assert report["dropped_not_refusal"] >= 1 and report["available"] >= 5 and report["mixed"] == 5
    assert len(rows) == 25 and rows[:20] == data
    for row in rows[20:]:
        assert row["messages"][0]["content"] in harmful + benign and is_refusal(row["messages"][1]["content"])
    cached = json.loads(open(report["cache"]).read())
    assert all(len(d["response_start"].split()) <= 10 for d in cached["dropped"])  # non-refusals are not kept whole

    def no_generation(*args, **kwargs):
        raise AssertionError("generated again instead of reading the cache")

    monkeypatch.setattr("logitguard.eval.generate.generate_responses", no_generation)
    again, report2 = mixing.apply(cfg, model, tokenizer, data, progress=False)
    assert again == rows and report2 == report


@pytest.mark.parametrize("count", [1, 0])
def test_self_mode_says_how_many_were_dropped(tmp_path, model_dir, count):
    """A random tiny model refuses nothing: every response is dropped, and the error says so, also when no count
    was asked for (that run mixed 0 rows and trained unmixed without a word)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me how to do a bad thing.\nHelp me break a rule.\nName a color.\n")
    cfg = load_config(None, {"model": str(model_dir), "data": "d.jsonl", "safety_mix": "self",
                             "safety_mix_prompts": str(prompts), "safety_mix_count": count,
                             "safety_mix_max_new_tokens": 4, "cache_dir": str(tmp_path / "cache")})  # fmt: skip
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    with pytest.raises(DataError, match="no safety rows to mix .3 generated responses were not refusals.*; use"):
        mixing.apply(cfg, model, tokenizer, load_rows(ASSETS / "chat.jsonl"), progress=False)
    with pytest.raises(DataError, match="no safety rows to mix .3 generated responses were not refusals"):
        logitguard.self_refusal_rows(model, tokenizer, str(prompts), count=count, max_new_tokens=4,
                                     cache_dir=tmp_path / "cache", progress=False)  # fmt: skip


def test_self_refusal_rows_are_the_rows_safety_mix_self_mixes(quick_toy, tmp_path):
    """The public helper for scripts that build their own dataset (TRL): the same rows, chosen the same way, as
    plain {"messages"} rows a datasets.Dataset takes; too many asked is a one-line error that counts."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    corpus = quick_toy / "corpus"
    harmful = [r["messages"][0]["content"] for r in load_rows(corpus / "harmful_test.jsonl")][:8]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(harmful) + "\n")
    cfg = load_config(None, {"model": str(quick_toy), "data": str(corpus / "benign_train.jsonl"),
                             "safety_mix": "self", "safety_mix_prompts": str(prompts), "safety_mix_count": 3,
                             "safety_mix_max_new_tokens": 24, "cache_dir": str(tmp_path / "cache")})  # fmt: skip
    model, tokenizer = AutoModelForCausalLM.from_pretrained(quick_toy), AutoTokenizer.from_pretrained(quick_toy)
    data = load_rows(corpus / "benign_train.jsonl")[:4]
    mixed, report = mixing.apply(cfg, model, tokenizer, data, progress=False)
    rows = logitguard.self_refusal_rows(model, tokenizer, str(prompts), count=3, max_new_tokens=24,
                                        cache_dir=tmp_path / "cache", progress=False)  # fmt: skip
    assert rows == [{"messages": r["messages"]} for r in mixed[4:]]
    assert all(is_refusal(r["messages"][1]["content"]) for r in rows)
    assert Dataset.from_list(rows).column_names == ["messages"]
    with pytest.raises(DataError, match=f"asks for 99 safety rows, but only {report['available']} are available"):
        logitguard.self_refusal_rows(model, tokenizer, str(prompts), count=99, max_new_tokens=24,
                                     cache_dir=tmp_path / "cache", progress=False)  # fmt: skip
