import json

import pytest
import torch
from helpers import batch_of, chat_examples, perturb_adapter, training_args

from logitguard import cache
from logitguard.cache import CachedReference, build_reference_cache
from logitguard.losses import position_weights, str_loss
from logitguard.models import attach_method
from logitguard.reference import OnlineReference, PaperReference, ReferenceError
from logitguard.tokens import SafetyTokens
from logitguard.trainer import SafetyTrainer


def naive_loss(model, base_logits_fn, batch, ids):
    """The paper's formulation written directly: full-vocab logits on both sides, gather K columns."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = batch["labels"][:, 1:]
    ce = (
        torch.nn.functional.cross_entropy(
            out.logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        / (labels != -100).sum()
    )
    reg = str_loss(out.logits[..., ids], base_logits_fn()[..., ids], position_weights(batch["attention_mask"], None))
    return ce, reg


def trainer_loss(tmp_path, model, tokenizer, reference, ids, batch):
    trainer = SafetyTrainer(
        model=model, args=training_args(tmp_path), safety_ids=ids, reference=reference, reg_weight=1.0
    )
    model.train()
    loss = trainer.compute_loss(model, batch)
    reg = trainer._safety_metrics["train"]["reg"][-1]
    return loss, reg


@pytest.fixture
def setup(model, tokenizer, tmp_path):
    examples = chat_examples(tokenizer)
    ids = list(SafetyTokens.from_words(tokenizer, "I,cannot").ids)
    folder = build_reference_cache(model, tokenizer, examples, ids, tmp_path / "cache", 64, progress=False)
    with torch.no_grad():
        base_logits = model(
            **{k: v for k, v in batch_of(tokenizer, examples[:4]).items() if k != "labels" and k != "example_idx"}
        ).logits.clone()
    return examples, ids, folder, base_logits


def test_online_cached_paper_and_naive_agree(model, tokenizer, tmp_path, setup):
    examples, ids, folder, base_logits = setup
    peft_model = attach_method(model, "lora", rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    perturb_adapter(peft_model)
    batch = batch_of(tokenizer, examples[:4])
    ce, reg = naive_loss(peft_model, lambda: base_logits, batch, ids)
    assert reg.item() > 1e-3  # the perturbed adapter moved the safety logits
    (ce + reg).backward()
    want = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    for reference in (OnlineReference(ids), PaperReference(ids), CachedReference(folder, ids)):
        peft_model.zero_grad()
        loss, got_reg = trainer_loss(tmp_path, peft_model, tokenizer, reference, ids, batch)
        assert got_reg.item() == pytest.approx(reg.item(), rel=1e-5), type(reference).__name__
        assert loss.item() == pytest.approx((ce + reg).item(), rel=1e-5)
        loss.backward()
        for n, p in peft_model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-6)


def test_pissa_uses_the_cache_made_before_the_adapter(model, tokenizer, tmp_path, setup):
    examples, ids, folder, base_logits = setup
    pissa = attach_method(model, "pissa", rank=4, alpha=4, target_modules=["q_proj", "v_proj"])
    batch = batch_of(tokenizer, examples[:4])
    # PiSSA starts at the aligned model, so the cached reference gives ~0 regularizer at init ...
    _, reg = trainer_loss(tmp_path, pissa, tokenizer, CachedReference(folder, ids), ids, batch)
    assert reg.item() < 1e-6
    # ... while "adapter disabled" is the residual model, not the aligned one: online must refuse
    with torch.no_grad(), pissa.disable_adapter():
        residual = pissa(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (residual - base_logits).abs().max() > 1e-2
    with pytest.raises(ReferenceError, match="method .pissa. rewrites the base weights"):
        OnlineReference(ids, method="pissa")


def test_a_cache_root_under_home_is_written_where_the_readme_says(model, tokenizer, tmp_path, setup, monkeypatch):
    examples, ids, folder, _ = setup
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    home = build_reference_cache(model, tokenizer, examples, ids, "~/.cache/logitguard/reference", 64, progress=False)
    assert home == tmp_path / "home/.cache/logitguard/reference" / folder.name and home.is_dir()
    assert not (tmp_path / "~").exists()


def test_cache_is_reused_resumed_and_refuses_mismatch(model, tokenizer, tmp_path, setup):
    examples, ids, folder, _ = setup
    again = build_reference_cache(model, tokenizer, examples, ids, tmp_path / "cache", 64, progress=False)
    assert again == folder
    # a killed build: drop a shard and mark incomplete, then resume rebuilds only what is missing
    small = build_reference_cache(model, tokenizer, examples, ids, tmp_path / "c2", 64, shard_size=3, progress=False)
    shards = sorted(small.glob("shard-*.safetensors"))
    assert len(shards) == 3
    kept = shards[0].stat().st_mtime_ns
    shards[-1].unlink()
    manifest = json.loads((small / "manifest.json").read_text())
    (small / "manifest.json").write_text(json.dumps(cache._sealed({**manifest, "complete": False})))
    with pytest.raises(ReferenceError, match="incomplete"):
        CachedReference(small)
    build_reference_cache(model, tokenizer, examples, ids, tmp_path / "c2", 64, shard_size=3, progress=False)
    assert shards[-1].exists() and shards[0].stat().st_mtime_ns == kept
    ref = CachedReference(small, ids)
    torch.testing.assert_close(ref.rows(7), CachedReference(folder, ids).rows(7))
    # one cache serves any subset of its token ids, and is extended (rebuilt) for a new id
    stamp = (folder / "shard-00000.safetensors").stat().st_mtime_ns
    assert build_reference_cache(model, tokenizer, examples, ids[:1], None, 64, folder=folder, progress=False)
    assert (folder / "shard-00000.safetensors").stat().st_mtime_ns == stamp
    torch.testing.assert_close(CachedReference(folder, ids[1:2]).rows(3), CachedReference(folder, ids).rows(3)[:, 1:2])
    with pytest.raises(ReferenceError, match="not \\[99\\]"):
        CachedReference(folder, [99])
    before = CachedReference(folder, ids).rows(3)
    build_reference_cache(model, tokenizer, examples, [99], None, 64, folder=folder, progress=False)
    torch.testing.assert_close(CachedReference(folder, ids).rows(3), before)
    assert CachedReference(folder, [99]).rows(3).shape == (len(before), 1)
    # an explicit folder built for other data or another model is refused, naming what differs
    with pytest.raises(ReferenceError, match="data"):
        build_reference_cache(model, tokenizer, examples[:5], ids, None, 64, folder=folder, progress=False)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    with pytest.raises(ReferenceError, match="model"):
        build_reference_cache(model, tokenizer, examples, ids, None, 64, folder=folder, progress=False)


def test_cache_float16_close_to_float32(model, tokenizer, tmp_path, setup):
    examples, ids, folder, _ = setup
    half = build_reference_cache(
        model, tokenizer, examples, ids, tmp_path / "cache", 64, dtype="float16", progress=False
    )
    assert half != folder
    torch.testing.assert_close(
        CachedReference(half, ids).rows(0).float(), CachedReference(folder, ids).rows(0), atol=1e-2, rtol=1e-3
    )


def test_tokenizer_fingerprint_ignores_padding_settings(tokenizer):
    """A padded tokenizer call (generation before a cache build) must not change the cache key."""
    from logitguard.cache import tokenizer_fingerprint

    before = tokenizer_fingerprint(tokenizer)
    tokenizer(["a", "a longer text"], padding=True, truncation=True, max_length=8)
    assert tokenizer_fingerprint(tokenizer) == before
