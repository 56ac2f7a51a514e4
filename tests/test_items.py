"""Per-item outcomes for the paired statistics: one character per item, in order, per set; no text."""

from logitguard.eval.items import safety_items, utility_items


def test_safety_items_per_set_in_order():
    records = [
        {"set": "harmful", "source": "advbench", "refusal": True, "prompt": "p", "response": "r"},
        {"set": "harmful", "source": "advbench", "refusal": False},
        {"set": "harmful", "source": "harmbench", "refusal": True},
        {"set": "benign", "refusal": False},
        {"set": "borderline", "refusal": True},
        {"set": "borderline", "refusal": False},
    ]
    assert safety_items(records) == {
        "refusal:advbench": "10",
        "refusal:harmbench": "1",
        "over_refusal_benign": "0",
        "over_refusal_borderline": "10",
    }
    assert safety_items([{"set": "harmful", "refusal": False}]) == {"refusal:harmful": "0"}


def test_utility_items_take_passed_correct_and_norm():
    records = [
        {"set": "humaneval", "passed": True},
        {"set": "humaneval", "passed": False},
        {"set": "gsm8k", "correct": True},
        {"set": "hellaswag", "correct": False, "correct_norm": True},
    ]
    assert utility_items(records) == {"humaneval": "10", "gsm8k": "1", "hellaswag": "0", "hellaswag_norm": "1"}
