"""The reference cache's per-token extras (label log-probs, top-k): round trip, extension, a larger k serving a
smaller one, and refusal of a stale or short cache."""

import json

import pytest
import torch
from helpers import batch_of, chat_examples

from logitguard.cache import CachedReference, build_reference_cache
from logitguard.losses import reference_topk
from logitguard.reference import ReferenceError

IDS = [5, 6]


def direct(model, tokenizer, examples):
    batch = batch_of(tokenizer, examples)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    return batch, logits


def test_extras_round_trip(model, tokenizer, tmp_path):
    examples = chat_examples(tokenizer)[:5]
    folder = build_reference_cache(
        model, tokenizer, examples, IDS, tmp_path, 64, progress=False, label_logp=True, topk=6, shard_size=2
    )
    batch, logits = direct(model, tokenizer, examples)
    mask = batch["attention_mask"].bool()
    idx = {**batch, "example_idx": torch.arange(len(examples))}
    got = CachedReference(folder, IDS, kind="label_logp")(model, idx)  # (B, T)
    want = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    last = mask & ~torch.nn.functional.pad(mask[:, 1:], (0, 1))  # each row's last real position predicts nothing
    assert torch.all(got[last] == 0)
    torch.testing.assert_close(got[:, :-1][mask[:, 1:]], want[mask[:, 1:]], rtol=1e-5, atol=1e-5)
    for k in (6, 3):  # the cache's k, and a smaller one served from it with the rest folded into the tail
        ids, logp, tail = CachedReference(folder, IDS, kind="topk", topk=k)(model, idx)
        w_ids, w_logp, w_tail = reference_topk(logits, k)
        assert torch.equal(ids[mask], w_ids[mask])
        torch.testing.assert_close(logp[mask], w_logp[mask], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tail[mask], w_tail[mask], rtol=1e-4, atol=1e-5)
    # the K logits are unchanged by the extras
    plain = CachedReference(folder, IDS)(model, idx)
    torch.testing.assert_close(plain[mask], logits[..., IDS][mask], rtol=1e-5, atol=1e-5)


def test_a_16_bit_top_k_is_read_as_a_distribution(model, tokenizer, tmp_path):
    examples = chat_examples(tokenizer)[:3]
    folder = build_reference_cache(model, tokenizer, examples, IDS, tmp_path, 64, dtype="bfloat16", progress=False,
                                   topk=8)  # fmt: skip
    batch, logits = direct(model, tokenizer, examples)
    mask = batch["attention_mask"].bool()
    for k in (8, 4):
        _, logp, tail = CachedReference(folder, IDS, kind="topk", topk=k)(
            model, {**batch, "example_idx": torch.arange(3)}
        )
        total = logp.exp().sum(-1) + tail.exp()  # (B, T)
        torch.testing.assert_close(total[mask], torch.ones_like(total[mask]), rtol=0, atol=2e-6)
        _, w_logp, _ = reference_topk(logits, k)
        torch.testing.assert_close(logp[mask], w_logp[mask], rtol=0, atol=0.05)  # bf16's rounding, nothing more


def test_a_cache_without_the_extra_is_refused_then_extended(model, tokenizer, tmp_path):
    examples = chat_examples(tokenizer)[:4]
    folder = build_reference_cache(model, tokenizer, examples, IDS, tmp_path, 64, progress=False)
    assert "extras" not in json.loads((folder / "manifest.json").read_text())  # a plain cache is as before
    with pytest.raises(ReferenceError, match="label_logp"):
        CachedReference(folder, IDS, kind="label_logp")
    with pytest.raises(ReferenceError, match="topk"):
        CachedReference(folder, IDS, kind="topk", topk=4)
    again = build_reference_cache(model, tokenizer, examples, IDS, tmp_path, 64, progress=False, topk=4)
    assert again == folder  # the same key: the extras are not part of it
    CachedReference(again, IDS, kind="topk", topk=4)
    with pytest.raises(ReferenceError, match="topk"):
        CachedReference(again, IDS, kind="topk", topk=8)  # k 4 cannot serve 8
    build_reference_cache(model, tokenizer, examples, IDS, tmp_path, 64, progress=False, label_logp=True)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["extras"] == {"label_logp": True, "topk": 4}  # the union: an extension keeps what it held
    CachedReference(folder, IDS, kind="label_logp")


def test_a_stale_extras_cache_is_refused(model, tokenizer, tmp_path):
    examples = chat_examples(tokenizer)[:4]
    folder = build_reference_cache(model, tokenizer, examples, IDS, tmp_path, 64, progress=False, label_logp=True)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0  # another model
    with pytest.raises(ReferenceError, match="different model"):
        build_reference_cache(model, tokenizer, examples, IDS, tmp_path, 64, progress=False, label_logp=True,
                              folder=folder)  # fmt: skip
    with pytest.raises(ReferenceError, match="other data"):
        CachedReference(folder, IDS, kind="label_logp", examples=examples[:3])


def test_a_left_padded_batch_is_refused_not_read_early(model, tokenizer, tmp_path):
    # rows are read into the first columns: a left-padded row passes the length check, so padding is checked
    examples = chat_examples(tokenizer)[:3]
    folder = build_reference_cache(model, tokenizer, examples, IDS, tmp_path, 64, progress=False, label_logp=True)
    batch = batch_of(tokenizer, examples)
    mask = batch["attention_mask"]
    assert (mask.sum(1) < mask.shape[1]).any()  # some row is padded
    flipped = {k: batch[k].flip(1) for k in ("input_ids", "attention_mask")}  # the same rows, padded on the left
    for kind in (None, "label_logp"):
        ref = CachedReference(folder, IDS, **({"kind": kind} if kind else {}))
        right = {**batch, "example_idx": torch.arange(3)}
        assert ref(model, right).shape[:2] == mask.shape  # right padding reads
        left = {**flipped, "example_idx": torch.arange(3)}
        with pytest.raises(ReferenceError, match="right padding"):
            ref(model, left)
        with pytest.raises(ReferenceError, match="right padding"):
            ref.prepare([right, left])
