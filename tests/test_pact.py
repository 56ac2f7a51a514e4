"""PACT's two references (cached and two forwards per step), its training path, and its token selection."""

import json

import pytest
import torch
from helpers import ASSETS, batch_of, chat_examples, perturb_adapter, training_args

from logitguard.cache import CachedReference
from logitguard.data import ChatCollator
from logitguard.models import attach_method
from logitguard.pact import (
    POST_FOLDER,
    PactOnlineReference,
    assistant_header_ids,
    build_pact_cache,
    post_only_examples,
    response_span,
)
from logitguard.reference import ReferenceError, frozen_safety_logits
from logitguard.tokens import SafetyTokens
from logitguard.trainer import SafetyTrainer

WORDS = "I,cannot,can't,Sure,The"


def lora(model):
    return attach_method(model, "lora", rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj"])


def test_header_and_post_only_sequences(tokenizer):
    header = assistant_header_ids(tokenizer)
    assert tokenizer.decode(header) == "<|assistant|>\n"
    examples = chat_examples(tokenizer)
    for ex, post in zip(examples, post_only_examples(examples, header)):
        start, count = response_span(ex["labels"])
        assert ex["labels"][start] != -100 and ex["labels"][start + count - 1] != -100
        assert post["input_ids"] == header + ex["input_ids"][start : start + count - 1]
        labelled = [label != -100 for label in ex["labels"]]
        turns = sum(1 for i, on in enumerate(labelled) if on and (i == 0 or not labelled[i - 1]))
        # no prompt, no system turn; a multi-turn span keeps the user turns between its assistant turns
        assert ("<|user|>" in tokenizer.decode(post["input_ids"])) == (turns > 1)
        assert "<|system|>" not in tokenizer.decode(post["input_ids"])


def expected_references(model, examples, ids, header):
    """[ref_full | ref_post] of each example from its own unpadded forwards, written out position by position."""
    out = []
    for ex in examples:
        full = frozen_safety_logits(model, torch.tensor([ex["input_ids"]]), torch.ones(1, len(ex["input_ids"])), ids)
        start, count = response_span(ex["labels"])
        post_ids = header + ex["input_ids"][start : start + count - 1]
        post = frozen_safety_logits(model, torch.tensor([post_ids]), torch.ones(1, len(post_ids)), ids)[0]
        placed = torch.zeros_like(full[0])
        for j in range(count):
            placed[start - 1 + j] = post[len(header) - 1 + j]
        out.append(torch.cat([full[0], placed], dim=-1))
    return out


def test_cached_equals_two_forwards_per_step(model, tokenizer, tmp_path):
    examples = chat_examples(tokenizer)
    ids = list(SafetyTokens.from_words(tokenizer, WORDS).ids)
    header = assistant_header_ids(tokenizer)
    cached = build_pact_cache(model, tokenizer, examples, ids, header, tmp_path, 64, progress=False)
    assert (cached.full.folder / POST_FOLDER / "manifest.json").is_file()  # the post-only cache sits inside
    stamp = (cached.post.folder / "manifest.json").stat().st_mtime_ns
    again = build_pact_cache(model, tokenizer, examples, ids, header, tmp_path, 64, progress=False)
    assert again.post.folder == cached.post.folder
    assert (again.post.folder / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    expected = expected_references(model, examples, torch.tensor(ids), header)
    peft_model = lora(model)
    perturb_adapter(peft_model)  # the online reference must take the aligned model: adapter disabled
    online = PactOnlineReference(ids, header)
    paper = PactOnlineReference(ids, header, full_logits=True)  # full-vocabulary logits, K columns gathered
    assert paper.policy_from_full_logits and not online.policy_from_full_logits
    for start in (0, 4):
        batch = batch_of(tokenizer, examples[start : start + 4])
        from_cache, from_forwards = cached(peft_model, batch), online(peft_model, batch)
        torch.testing.assert_close(paper(peft_model, batch), from_forwards, rtol=1e-4, atol=1e-5)
        assert from_cache.shape == (4, batch["input_ids"].shape[1], 2 * len(ids))
        valid = batch["attention_mask"].bool()  # the forwards also give padding positions logits; the cache zeros
        torch.testing.assert_close(from_cache[valid], from_forwards[valid], rtol=1e-4, atol=1e-5)
        for b, want in enumerate(expected[start : start + 4]):
            torch.testing.assert_close(from_cache[b, : len(want)], want, rtol=1e-4, atol=1e-5)
            assert not from_cache[b, len(want) :].any()  # padding


def test_cached_reads_a_step_with_one_host_transfer_and_refuses_left_padding(model, tokenizer, tmp_path, monkeypatch):
    import logitguard.cache as cache

    examples = chat_examples(tokenizer)
    ids = list(SafetyTokens.from_words(tokenizer, WORDS).ids)
    cached = build_pact_cache(model, tokenizer, examples, ids, assistant_header_ids(tokenizer), tmp_path, 64,
                              progress=False)  # fmt: skip
    batches = [{**batch_of(tokenizer, examples[s : s + 3]), "example_idx": torch.arange(s, s + 3)} for s in (0, 3)]
    direct = [cached(model, b) for b in batches]
    transfers = []
    real = cache._host_ints
    monkeypatch.setattr(cache, "_host_ints", lambda tensors: transfers.append(1) or real(tensors))
    cached.prepare(batches)
    for b, want in zip(batches, direct):
        torch.testing.assert_close(cached(model, b), want, rtol=0, atol=0)
    assert len(transfers) == 1  # the step's indices and lengths, once; not once more per micro-batch
    left = {**batches[0], **{k: batches[0][k].flip(1) for k in ("input_ids", "attention_mask")}}
    assert (batches[0]["attention_mask"].sum(1) < batches[0]["attention_mask"].shape[1]).any()
    with pytest.raises(ReferenceError, match="right padding"):
        cached(model, left)


def signed_weights(n: int) -> tuple[float, ...]:
    """PACT-like weights: from positive to negative."""
    return tuple(round(0.6 - i / max(n - 1, 1), 4) for i in range(n))


def one_step(tmp_path, tokenizer, examples, ids, reference_kind, batch_size, accum):
    """The adapter update of one SGD step with CE + 2 * PACT."""
    from conftest import tiny_llama

    model = tiny_llama(len(tokenizer))
    header = assistant_header_ids(tokenizer)
    if reference_kind == "cache":
        reference = build_pact_cache(model, tokenizer, examples, ids, header, tmp_path / "c", 64, progress=False)
    else:
        reference = PactOnlineReference(ids, header)
    peft_model = lora(model)
    perturb_adapter(peft_model, scale=0.1)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    trainer = SafetyTrainer(
        model=peft_model,
        args=training_args(
            tmp_path, max_steps=1, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accum,
            optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
        ),
        train_dataset=examples,
        data_collator=ChatCollator(tokenizer.pad_token_id),
        safety_ids=ids,
        reference=reference,
        reg_weight=2.0,
        regularizer="pact",
        regularizer_kwargs=dict(token_weights=signed_weights(len(ids)), prefix=2, tau=2.0),
    )  # fmt: skip
    trainer.train()
    assert any(row.get("reg", 0) > 0 for row in trainer.state.log_history)
    return {n: p.detach() - before[n] for n, p in peft_model.named_parameters() if p.requires_grad}


def test_training_step_cached_equals_online_and_is_invariant_to_accumulation(tokenizer, tmp_path):
    examples = chat_examples(tokenizer)[:4]
    assert len({len(e["input_ids"]) for e in examples}) > 1  # batch 4 pads, batch 1 does not
    ids = list(SafetyTokens.from_words(tokenizer, WORDS).ids)
    cached = one_step(tmp_path, tokenizer, examples, ids, "cache", 4, 1)
    online = one_step(tmp_path, tokenizer, examples, ids, "online", 4, 1)
    accumulated = one_step(tmp_path, tokenizer, examples, ids, "cache", 1, 4)
    assert any(v.abs().max() > 0 for v in cached.values())
    for n in cached:
        torch.testing.assert_close(cached[n], online[n], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(cached[n], accumulated[n], rtol=1e-4, atol=1e-6)


def test_train_reads_token_weights_and_caches_both_references(tmp_path, model_dir, tokenizer, capsys):
    from logitguard.cli import main

    ids = list(SafetyTokens.from_words(tokenizer, WORDS).ids)
    token_file = tmp_path / "pact_tokens.json"
    mined = SafetyTokens(ids=tuple(ids), tokens=tuple(tokenizer.convert_ids_to_tokens(ids)), source="mined",
                         weights=signed_weights(len(ids)))  # fmt: skip
    mined.save(token_file)
    assert json.loads(token_file.read_text())["weights"] == list(signed_weights(len(ids)))
    out = tmp_path / "out"
    argv = ["train", "--model", str(model_dir), "--data", str(ASSETS / "chat.jsonl"), "--output-dir", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--max-length", "64", "--batch-size", "4", "--logging-steps", "1",
            "--regularizer", "pact", "--token-file", str(token_file), "--max-steps", "2",
            "--trainer", '{"use_cpu": true, "disable_tqdm": true}']  # fmt: skip
    assert main(argv) == 0
    assert SafetyTokens.load(out / "safety_tokens.json").weights == mined.weights
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("reg" in r and r["reg"] > 0 for r in rows)
    posts = list((tmp_path / "cache" / "reference").glob(f"*/{POST_FOLDER}/manifest.json"))
    assert len(posts) == 1 and json.loads(posts[0].read_text())["complete"]
    cache = CachedReference(posts[0].parent, ids, examples=post_only_examples(
        chat_examples(tokenizer), assistant_header_ids(tokenizer)))  # fmt: skip
    assert cache.token_ids == ids


def test_trl_integration_accepts_pact():
    """PACT used to be refused in TRL; it is wired now (trained and checked against logitguard's trainer in
    test_trl_new_terms.py), with its gate settings on the TRL config."""
    pytest.importorskip("trl")
    from logitguard.integrations.trl import SafetySFTConfig

    cfg = SafetySFTConfig(output_dir="/tmp/unused", regularizer="pact", pact_prefix=4, report_to=[], use_cpu=True)
    assert (cfg.regularizer, cfg.pact_prefix, cfg.pact_top_p) == ("pact", 4, 0.9)
