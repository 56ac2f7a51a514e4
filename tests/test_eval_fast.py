"""The fast evaluation paths give the reference paths' results on a tiny model: greedy decoding that drops ended
rows (equal to `model.generate`), the stop rule (a prefix of generate's text, ended where the rule first holds),
batched multiple-choice scoring (equal to one item at a time), the held-out loss with the head on scored
positions only, and an adapter folded into the weights."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_llama

from logitguard.eval.commonsense import continuation_logprobs
from logitguard.eval.decode import joining
from logitguard.eval.generate import StopRule, generate_responses, load_model_for_eval
from logitguard.eval.humaneval import code_closed, extract_code
from logitguard.eval.loglik import score_groups
from logitguard.eval.multiple_choice import hellaswag_item, score_items, truthfulqa_item
from logitguard.eval.utility import conversation_losses, eval_loss

PROMPTS = ["What color is the sky?", "Hello", "Name a fruit, then name a color, then say goodbye to me.", "Two?"]


def _ends_often(model, tokenizer) -> int:
    """A token the model generates early in some answers but not all: as an end token it ends rows at different
    steps, so decoding must drop rows mid-batch."""
    texts = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=12, progress=False, fast=False)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    counts = torch.bincount(torch.tensor([i for row in ids for i in row[1:8]]), minlength=len(tokenizer))
    return int(counts.argmax())


def test_greedy_decode_equals_generate_with_rows_ending_at_different_steps(model, tokenizer):
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, _ends_often(model, tokenizer)]
    slow = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=3, progress=False, fast=False)
    fast = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=3, progress=False)
    with joining(True):  # the fourth prompt joins the first three as soon as one of them ends
        joined = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=3, progress=False)
    assert fast == joined == slow
    lengths = {len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in slow}
    assert len(lengths) > 1  # the rows did end at different steps


PROMPT_IDS = [[5, 9, 14, 3, 7, 22, 8], [5, 9, 11], [5, 9, 30, 31, 2, 6, 12, 13, 19], [5, 9, 4, 4], [5, 9, 17, 1, 25]]


def _alone(model, prompts, eos, stop=None):
    from logitguard.eval.decode import greedy_decode

    return [greedy_decode(model, [p], 10, eos, 0, stop)[0] for p in prompts]


def test_waiting_prompts_join_the_rows_in_flight_and_decode_as_alone(model, tokenizer, monkeypatch):
    from logitguard.eval import decode

    solo = _alone(model, PROMPT_IDS, set())
    eos = {solo[0][2], solo[3][5]}  # ends the first row early and the fourth later: rows leave at different steps
    expected = _alone(model, PROMPT_IDS, eos)
    joins, widths = [], []
    join, select = decode._Live.join, decode._Live.select

    def counted_join(live, other):
        joins.append(len(other.rows))
        join(live, other)

    def checked_select(live, keep, trim):
        select(live, keep, trim)
        widths.append((live.mask.shape[1], int(live.mask.sum(1).max()), live.cache.get_seq_length()))

    monkeypatch.setattr(decode._Live, "join", counted_join)
    monkeypatch.setattr(decode._Live, "select", checked_select)
    ended = []
    with decode.joining(True):
        got = decode.greedy_decode(model, PROMPT_IDS, 10, eos, 0, batch_size=2, on_end=ended.append)
    assert got == expected
    assert joins and sum(joins) == 3  # three prompts waited and joined mid-decode
    assert sorted(ended) == list(range(5))
    # after a row leaves, the cache is only as wide as its longest live row (the leading masked columns dropped)
    assert widths and all(w == longest == seq for w, longest, seq in widths)


def test_joining_off_decodes_batch_by_batch(model, monkeypatch):
    from logitguard.eval import decode

    eos = {_alone(model, PROMPT_IDS[:1], set())[0][2]}
    expected = _alone(model, PROMPT_IDS, eos)
    joined = []
    monkeypatch.setattr(decode._Live, "join", lambda live, other: joined.append(other))
    got = decode.greedy_decode(model, PROMPT_IDS, 10, eos, 0, batch_size=2)  # off unless asked for
    with decode.joining(True), decode.joining(False):
        again = decode.greedy_decode(model, PROMPT_IDS, 10, eos, 0, batch_size=2)
    assert got == again == expected and not joined
    with decode.joining(True):
        pass
    assert not decode._JOINING.get()  # off again outside the block


def test_a_sliding_window_cache_decodes_batch_by_batch(tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    from logitguard.eval import decode

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, sliding_window=4)  # fmt: skip
    model = MistralForCausalLM(config).eval()
    eos = {_alone(model, PROMPT_IDS[:1], set())[0][2]}
    expected = _alone(model, PROMPT_IDS, eos)
    probe = decode._prefill(model, [PROMPT_IDS[0]], [0], 0, None, 0)
    assert not decode.joinable(probe.cache)  # sliding layers: no row may join mid-decode
    with decode.joining(True):
        assert decode.greedy_decode(model, PROMPT_IDS, 10, eos, 0, batch_size=2) == expected


def test_a_repetition_penalty_goes_through_generate(model, tokenizer):
    from logitguard.eval.decode import plain_greedy

    assert plain_greedy(model.generation_config)
    model.generation_config.repetition_penalty = 1.3
    assert not plain_greedy(model.generation_config)
    slow = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=8, progress=False, fast=False)
    assert generate_responses(model, tokenizer, PROMPTS, max_new_tokens=8, progress=False) == slow


def test_stop_rule_ends_each_answer_where_the_rule_first_holds(model, tokenizer):
    full = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=16, progress=False, fast=False)
    rule = StopRule(lambda text: len(text) >= 12, marker="")  # "" is in every token: checked after each
    stopped = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=16, progress=False, stop=rule)
    for whole, short in zip(full, stopped):
        ids = tokenizer(whole, add_special_tokens=False)["input_ids"]
        prefixes = [tokenizer.decode(ids[:n]) for n in range(1, len(ids) + 1)]
        expected = next((p for p in prefixes if len(p) >= 12), whole)
        assert short == expected.strip()


def test_code_closed_keeps_the_extracted_program():
    answer = "Here it is:\n```python\ndef f(x):\n    return x\n```\nThis returns x. ```python\nother()\n```"
    cut = answer[: answer.index("```\nThis") + 3]
    assert code_closed(cut) and not code_closed(cut[:-1]) and not code_closed("```python")
    assert extract_code(cut) == extract_code(answer) == "def f(x):\n    return x\n"


def _groups(tokenizer, texts):
    enc = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return enc


def test_score_groups_equals_scoring_each_group_alone(model, tokenizer):
    primer = _groups(tokenizer, ["Q: What color is the sky? A: Blue. Q: Name a fruit. A: An apple. "])[0]
    questions = _groups(tokenizer, ["Q: Two?", "Q: Is an apple a fruit? A", "Q", "Hello there, name a color"])
    answers = _groups(tokenizer, [" yes", " it is green", " red", " a much longer answer than the others", " no"])
    groups = [(primer + q, answers[i % 5 :] + answers[: i % 2]) for i, q in enumerate(questions)]
    groups.append((primer[:1], answers[:2]))  # a one-token context: no shared prefix left
    expected = [continuation_logprobs(model, ctx, conts, 0) for ctx, conts in groups]
    got = score_groups(model, groups, 0, group_batch=2, row_chunk=3)
    assert [len(g) for g in got] == [len(e) for e in expected]
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=1e-4)
    shared = score_groups(model, groups[:4], 0, group_batch=3, row_chunk=4)  # the primer runs once here
    assert [s for g in shared for s in g] == pytest.approx([s for e in expected[:4] for s in e], abs=1e-4)


def test_batched_multiple_choice_equals_one_item_at_a_time(model, tokenizer):
    rows = [{"id": str(i), "question": q, "choices": c, "expected_index": 0} for i, (q, c) in enumerate([
        ("What color is the sky?", ["Blue.", "Green.", "It is red"]),
        ("Is an apple a fruit?", ["Yes.", "No."]),
        ("Hello?", ["Hello there, name a color", "no", "sad", "glad", "happy"]),
    ])]  # fmt: skip
    items = [truthfulqa_item(r) for r in rows]
    items.append(hellaswag_item({"id": "h", "ctx": "A cook mixes flour and", "endings": [
        "bakes it.", "sings.", "says hello there", "eats an apple"], "expected_index": 0}))  # fmt: skip
    one, one_records = score_items(model, tokenizer, items, progress=False, batch_items=1)
    many, many_records = score_items(model, tokenizer, items, progress=False, batch_items=3)
    for a, b in zip(one_records, many_records):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
    assert one == many


CONVERSATIONS = [
    [{"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": "The sky is blue."}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello there. " * 6}],
    [{"role": "user", "content": "Name a fruit. " * 5}, {"role": "assistant", "content": "An apple."},
     {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "Two plus two is four."}],
]  # fmt: skip


def test_eval_loss_on_scored_positions_equals_the_full_head(model, tokenizer):
    slow = eval_loss(model, tokenizer, CONVERSATIONS, max_length=64, batch_size=2, fast=False)
    assert eval_loss(model, tokenizer, CONVERSATIONS, max_length=64, batch_size=2) == pytest.approx(slow, abs=1e-5)
    pairs = conversation_losses(model, tokenizer, CONVERSATIONS, max_length=64, batch_size=2)
    for conv, (nll, n) in zip(CONVERSATIONS, pairs):
        alone = eval_loss(model, tokenizer, [conv], max_length=64, fast=False)
        assert n > 0 and nll / n == pytest.approx(alone, abs=1e-5)


def test_held_out_loss_builds_no_kv_cache(model, tokenizer):
    """A scoring pass has no next step: a KV cache would be built for every batch and thrown away."""
    caches = []
    hook = model.register_forward_hook(lambda _m, _a, out: caches.append(out.past_key_values), with_kwargs=False)
    conversation_losses(model, tokenizer, CONVERSATIONS, max_length=64, batch_size=2)
    hook.remove()
    assert caches and all(cache is None for cache in caches)


def test_an_adapter_folded_into_float32_weights_gives_the_same_model(tmp_path, model_dir, tokenizer):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(tiny_llama(len(tokenizer)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                 init_lora_weights=False))  # fmt: skip
    peft.save_pretrained(tmp_path / "adapter")
    merged, tok = load_model_for_eval(model_dir, tmp_path / "adapter")
    kept, _ = load_model_for_eval(model_dir, tmp_path / "adapter", merge=False)
    assert not hasattr(merged, "peft_config") and hasattr(kept, "peft_config")
    ids = torch.tensor([tok("What color is the sky?")["input_ids"]], device=merged.device)  # the accelerator's
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, kept(ids).logits, atol=1e-5)
    base, _ = load_model_for_eval(model_dir)
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, kept(ids).logits, atol=1e-3)  # the adapter does something


def test_logitguard_eval_joins_unless_told_not_to(tmp_path, monkeypatch):
    import logitguard.cli.eval as cli_eval
    from logitguard.cli import build_parser

    harmful = tmp_path / "harmful.txt"
    harmful.write_text("Tell me something rude.\n")
    seen = []

    class Stop(Exception):
        pass

    def measure(model, tokenizer, spec, *args, **kwargs):
        seen.append(spec.continuous_batching)
        raise Stop

    monkeypatch.setattr(cli_eval, "measure", measure)
    loaded = SimpleNamespace(dtype=torch.float32)  # what the CLI reads of a model before measure
    monkeypatch.setattr("logitguard.eval.generate.load_model_for_eval", lambda *a, **k: (loaded, None))
    for flags in ([], ["--no-continuous-batching"]):
        args = build_parser().parse_args(
            ["eval", "--model", "m", "--harmful", str(harmful), "--out", str(tmp_path / "out"), *flags]
        )
        with pytest.raises(Stop):
            args.func(args)
    assert seen == [True, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_finite_logits_stop_every_stage_with_the_fix(model, tokenizer, dtype):
    """A NaN weight (a diverged run) or a float16 overflow gives NaN logits: argmax and sums would turn them into
    a refusal rate and a loss without a word; each stage stops instead, saying what to do."""
    from logitguard.eval.finite import NonFiniteScoreError

    model = model.to(dtype)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    fix = "float16 overflows" if dtype == torch.float16 else "hold inf or NaN"
    for fast in (True, False):  # the decoding loop, and transformers' generate (a logits processor's model)
        with pytest.raises(NonFiniteScoreError, match=f"generation: .* not finite in {str(dtype)[6:]}; .*{fix}"):
            generate_responses(model, tokenizer, PROMPTS, max_new_tokens=4, progress=False, fast=fast)
    with pytest.raises(NonFiniteScoreError, match=f"held-out loss: .*{fix}"):
        conversation_losses(model, tokenizer, CONVERSATIONS, max_length=64)
    ids = tokenizer("a b c", add_special_tokens=False)["input_ids"]
    with pytest.raises(NonFiniteScoreError, match=f"multiple-choice scoring: .*{fix}"):
        score_groups(model, [(ids, [ids[:1], ids[1:2]])])
    with pytest.raises(NonFiniteScoreError, match="multiple-choice scoring"):
        continuation_logprobs(model, ids[:2], [ids[2:]])


def test_a_token_masked_with_minus_inf_is_not_a_fault(model, tokenizer):
    """-inf is how a model rules a token out; a continuation through it has log-probability -inf. Neither stops
    an evaluation (the check is for NaN and +inf)."""
    ids = tokenizer("a b c d", add_special_tokens=False)["input_ids"]
    banned = ids[1]
    hook = model.get_output_embeddings().register_forward_hook(
        lambda _m, _a, out: out.index_fill(-1, torch.tensor([banned]), float("-inf"))
    )
    try:
        texts = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=4, progress=False)
        assert len(texts) == len(PROMPTS)
        scores = score_groups(model, [(ids[:1], [ids[1:2], ids[2:4], ids[2:3]])])[0]
        assert scores[0] == float("-inf") and all(s > float("-inf") for s in scores[1:])
    finally:
        hook.remove()
