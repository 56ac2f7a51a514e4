"""HellaSwag / TruthfulQA-MC1 by log-likelihood: choice scores against a direct log-softmax computation, a stub
model whose preferred answer is known, acc vs acc_norm, ties counted wrong, lm-eval's context / continuation
split and HellaSwag's clean-up."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from logitguard.eval import multiple_choice as mc
from logitguard.eval.multiple_choice import (
    choice_logprobs,
    encode_pair,
    evaluate_multiple_choice,
    hellaswag_item,
    score_items,
    truthfulqa_item,
)


class PrefersToken(torch.nn.Module):
    """A causal 'model' whose next-token distribution is the same everywhere: uniform, plus `boost` on one id."""

    def __init__(self, vocab_size: int, token: int | None, boost: float = 4.0):
        super().__init__()
        self.vocab_size, self.token, self.boost = vocab_size, token, boost
        self.device = torch.device("cpu")

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        if self.token is not None:
            logits[..., self.token] = self.boost
        # no state to keep: the shared-context cache is a stand-in that only needs to be repeatable per choice
        return SimpleNamespace(logits=logits, past_key_values=SimpleNamespace(batch_repeat_interleave=lambda n: None))


def _direct(model, tokenizer, context: str, choice: str) -> float:
    ctx, cont = encode_pair(tokenizer, context, " " + choice)
    with torch.no_grad():
        logprobs = model(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)  # (T, V)
    return sum(float(logprobs[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def test_choice_logprobs_match_a_direct_log_softmax(model, tokenizer):
    """The context's shared key/value cache gives each choice the log-likelihood of scoring it whole."""
    choices = ["Blue.", "It is green.", "Red", "a much longer answer than the others, padded last"]
    item = {"id": "x", "context": "Q: What color is the sky?\nA:", "choices": choices, "gold": 0}
    scores = choice_logprobs(model, tokenizer, item)
    for choice, score in zip(item["choices"], scores):
        assert score == pytest.approx(_direct(model, tokenizer, item["context"], choice), abs=1e-4)


def test_encode_pair_moves_trailing_space_to_the_continuation(tokenizer):
    ctx, cont = encode_pair(tokenizer, "The sky is ", "blue")
    assert tokenizer.decode(ctx) == "The sky is" and tokenizer.decode(cont) == " blue"
    whole = tokenizer("The sky is blue", add_special_tokens=False)["input_ids"]
    assert ctx + cont == whole


def test_known_answer_with_a_stub_model(tokenizer):
    """Every choice is one token; the stub prefers one of them, so the right answer is known in advance."""
    words = ["sky", "apple", "happy"]
    ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in words]
    assert all(len(i) == 1 for i in ids), ids
    items = [{"id": str(g), "context": "Name a word:", "choices": words, "gold": g} for g in range(3)]
    prefers_apple = PrefersToken(len(tokenizer), ids[1][0])
    summary, records = score_items(prefers_apple, tokenizer, items, progress=False, batch_items=1)
    assert [r["correct"] for r in records] == [False, True, False]
    assert summary["acc"] == pytest.approx(1 / 3) and summary["n"] == 3
    # a model that cannot tell the choices apart earns nothing, even with the gold choice listed first
    summary, _ = score_items(PrefersToken(len(tokenizer), None), tokenizer, items, progress=False, batch_items=1)
    assert summary["acc"] == 0.0 and summary["acc_norm"] == 0.0


def test_acc_norm_divides_by_the_choice_length(monkeypatch):
    # " ab" is 3 bytes, " abcdef" 7: -3.3 beats -4.9 summed, but -4.9/7 = -0.7 beats -3.3/3 = -1.1
    monkeypatch.setattr(mc, "choice_logprobs", lambda model, tok, item: [-3.3, -4.9])
    items = [{"id": "a", "context": "c", "choices": ["ab", "abcdef"], "gold": 1}]
    summary, records = score_items(None, None, items, progress=False, batch_items=1)
    assert (summary["acc"], summary["acc_norm"]) == (0.0, 1.0) and records[0]["scores"] == [-3.3, -4.9]


def test_item_formats():
    row = {"id": "h1", "activity_label": "Baking", "ctx": "A cook mixes flour. [header] she", "endings": [
        "bakes [title] it.", "x", "y", "z"], "expected_index": 2}  # fmt: skip
    item = hellaswag_item(row)
    assert item["context"] == "Baking: A cook mixes flour. she" and item["choices"][0] == "bakes. it."
    assert item["gold"] == 2
    item = truthfulqa_item({"id": "t", "question": "Is water wet?", "choices": ["Yes.", "No."], "expected_index": 0})
    assert item["context"].startswith("Q: What is human life expectancy") and item["context"].endswith(
        "\n\nQ: Is water wet?\nA:"
    )
    from logitguard.data import DataError

    with pytest.raises(DataError, match="outside its 2 choices"):
        truthfulqa_item({"id": "t", "question": "q", "choices": ["a", "b"], "expected_index": 5})


def test_evaluate_multiple_choice_restores_training_mode(model, tokenizer):
    rows = [{"id": "t", "question": "What color is the sky?", "choices": ["Blue.", "Green."], "expected_index": 0}]
    model.train()
    summary, records = evaluate_multiple_choice(model, tokenizer, "truthfulqa", rows, progress=False)
    assert model.training and summary["n"] == 1 and len(records[0]["scores"]) == 2
    with pytest.raises(ValueError, match="unknown multiple-choice task"):
        evaluate_multiple_choice(model, tokenizer, "mmlu", rows)
