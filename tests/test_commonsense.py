"""Commonsense accuracy: DoRA's answer extraction, the log-likelihood score against a direct computation, the
LLM-Adapters file layouts and their errors."""

from __future__ import annotations

import pytest
import torch
from helpers import ASSETS

from logitguard.data import DataError
from logitguard.eval.commonsense import (
    ANSWER_PREFIX,
    TASKS,
    available_tasks,
    evaluate_commonsense,
    extract_answer,
    load_task,
    option_logprobs,
    options,
)

FIXTURE = ASSETS / "commonsense"


@pytest.mark.parametrize(
    "task, text, expected",
    [
        ("boolq", "the correct answer is true", "true"),
        ("boolq", "False, sorry", None),  # case-sensitive, as DoRA's regex
        ("piqa", "solution2 because solution1 fails", "solution2"),
        ("social_i_qa", "I think answer3", "answer3"),
        ("ARC-Challenge", "answer5", "answer5"),
        ("ARC-Easy", "the answer is answer1.", "answer1"),
        ("openbookqa", "no idea", None),
        ("hellaswag", "ending4 fits", "ending4"),
        ("winogrande", "option1", "option1"),
    ],
)
def test_extract_answer_is_the_first_regex_match(task, text, expected):
    assert extract_answer(task, text) == expected


def test_every_task_of_table3_has_a_pattern():
    assert set(TASKS) == {
        "boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa",
    }  # fmt: skip


def test_options_come_from_the_answer_format_line():
    item = load_task(FIXTURE, "ARC-Easy")[0]
    assert options("ARC-Easy", item) == ["answer1", "answer2", "answer3", "answer4"]
    assert options("boolq", {"instruction": "no format line"}) == ["true", "false"]


def test_both_layouts_and_listing():
    assert available_tasks(FIXTURE) == ["boolq", "piqa", "winogrande", "ARC-Easy"]
    assert len(load_task(FIXTURE, "boolq")) == 2  # <dir>/<task>/test.json
    assert len(load_task(FIXTURE, "winogrande", limit=1)) == 1  # <dir>/<task>.json


def test_bad_files_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="holds none of the commonsense test sets"):
        available_tasks(tmp_path)
    (tmp_path / "boolq.json").write_text('[{"instruction": "q"}]')
    with pytest.raises(DataError, match="item 0 has no string field 'answer'"):
        load_task(tmp_path, "boolq")
    (tmp_path / "piqa.json").write_text("[{")
    with pytest.raises(DataError, match="piqa.json: not valid JSON"):
        load_task(tmp_path, "piqa")


def test_option_logprobs_match_a_direct_computation(model, tokenizer):
    item = load_task(FIXTURE, "boolq")[0]
    scores = option_logprobs(model, tokenizer, item, ["true", "false"])
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": item["instruction"]}], tokenize=False, add_generation_prompt=True
    )
    for option, score in zip(["true", "false"], scores):
        context = tokenizer(prompt + ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
        cont = tokenizer(" " + option, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([context + cont])).logits[0]
        expected = sum(float(logits[len(context) - 1 + i].log_softmax(-1)[t]) for i, t in enumerate(cont))
        assert score == pytest.approx(expected, abs=1e-4)


def test_evaluate_commonsense_average_is_the_mean_of_tasks(model, tokenizer):
    result = evaluate_commonsense(model, tokenizer, FIXTURE, "loglik", progress=False)
    tasks = result["tasks"]
    assert set(tasks) == {"boolq", "piqa", "winogrande", "ARC-Easy"}
    assert result["average"] == pytest.approx(sum(t["acc"] for t in tasks.values()) / 4)
    assert all(0 <= t["acc"] <= 1 and 0 <= t["acc_norm"] <= 1 for t in tasks.values())
    generated = evaluate_commonsense(model, tokenizer, FIXTURE, "generate", tasks=["boolq"], progress=False)
    assert generated["tasks"]["boolq"]["n"] == 2


def test_acc_and_acc_norm_follow_the_scores(monkeypatch):
    """acc takes the highest summed log-prob; acc_norm divides by the option's length in bytes (lm-eval)."""
    from logitguard.eval import commonsense

    # " true" is 5 bytes, " false" 6: -5.5 beats -6 summed, but -6/6 = -1.0 beats -5.5/5 = -1.1
    monkeypatch.setattr(commonsense, "option_logprobs", lambda model, tok, item, choices: [-5.5, -6.0])
    items = load_task(FIXTURE, "boolq")  # answers: true, false
    result = commonsense.score_loglik(None, None, "boolq", items, progress=False)
    assert result == {"acc": 0.5, "acc_norm": 0.5, "n": 2}
    result = commonsense.score_loglik(None, None, "boolq", items[:1], progress=False)
    assert (result["acc"], result["acc_norm"]) == (1.0, 0.0)


def test_answer_outside_the_options_is_an_error(monkeypatch):
    from logitguard.eval import commonsense

    item = dict(load_task(FIXTURE, "boolq")[0], answer="maybe")
    with pytest.raises(DataError, match="'maybe' is not among the options"):
        commonsense.score_loglik(None, None, "boolq", [item], progress=False)
