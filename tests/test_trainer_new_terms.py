"""Token-wise constrained SFT and the top-k KL through the trainer: real steps on a tiny model, checked against the
direct formulas on full logits."""

import pytest
import torch
import torch.nn.functional as F
from helpers import batch_of, chat_examples, perturb_adapter, training_args
from test_trainer import lora

from logitguard.cache import CachedReference, build_reference_cache
from logitguard.data import ChatCollator
from logitguard.head_terms import chunked_row_terms
from logitguard.losses import constrained_sft_loss, position_weights, reference_topk, topk_kl_loss
from logitguard.trainer import SafetyTrainer

IDS = [5, 6]


def trainer_for(tmp_path, model, tokenizer, examples, regularizer, reference, **args):
    values = dict(max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2)
    values.update(args)
    return SafetyTrainer(
        model=model, args=training_args(tmp_path, **values), train_dataset=examples,
        data_collator=ChatCollator(tokenizer.pad_token_id), safety_ids=IDS, reference=reference, reg_weight=1.0,
        regularizer=regularizer,
    )  # fmt: skip


def full_logits(model, batch, adapter: bool = True):
    from logitguard.reference import adapter_disabled

    ctx = adapter_disabled(model) if not adapter else torch.enable_grad()
    with ctx:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def label_logp(logits, input_ids):
    """(B, T) log-prob of each position's next token, 0 at the last position."""
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return F.pad(logp, (0, 1))


def lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_constrained_sft_replaces_ce_with_the_authors_formula(model, tokenizer, tmp_path):
    examples = chat_examples(tokenizer)[:4]
    folder = build_reference_cache(
        model, tokenizer, examples, IDS, tmp_path / "c", 64, progress=False, label_logp=True
    )
    reference = CachedReference(folder, IDS, kind="label_logp")
    with torch.no_grad():
        batch = batch_of(tokenizer, examples)
        ref_logp = label_logp(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              batch["input_ids"])  # fmt: skip
    peft_model = lora(model)
    perturb_adapter(peft_model, scale=0.3)  # the policy differs from the reference: weights != 1
    trainer = trainer_for(tmp_path, peft_model, tokenizer, examples, "constrained_sft", reference)
    peft_model.train()
    loss = trainer.compute_loss(peft_model, dict(batch))
    loss.backward()
    ours = lora_grads(peft_model)
    peft_model.zero_grad()
    mask = position_weights(batch["attention_mask"], batch["labels"], "response")
    direct = constrained_sft_loss(label_logp(full_logits(peft_model, batch), batch["input_ids"]), ref_logp, mask)
    ce = F.cross_entropy(full_logits(peft_model, batch)[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    torch.testing.assert_close(loss, direct, rtol=1e-5, atol=1e-6)
    assert abs(loss.item() - ce.item()) > 1e-3  # not the cross-entropy: the weights moved it
    direct.backward()
    theirs = lora_grads(peft_model)
    assert ours.keys() == theirs.keys() and ours
    for n in ours:
        torch.testing.assert_close(ours[n], theirs[n], rtol=1e-4, atol=1e-6)
    # real steps: the adapter moves, the base does not, the objective is logged as reg
    peft_model.zero_grad()
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    trainer.train()
    for n, p in peft_model.named_parameters():
        assert (not torch.equal(p, before[n])) == ("lora_" in n), n
    assert [row["reg"] for row in trainer.state.log_history if "reg" in row]


def test_kl_term_is_zero_at_step_zero_and_grows(model, tokenizer, tmp_path):
    examples = chat_examples(tokenizer)
    folder = build_reference_cache(model, tokenizer, examples, IDS, tmp_path / "c", 64, progress=False, topk=8)
    reference = CachedReference(folder, IDS, kind="topk", topk=8)
    trainer = trainer_for(tmp_path, lora(model), tokenizer, examples, "kl", reference, max_steps=4, learning_rate=5e-2)
    trainer.train()
    regs = [row["reg"] for row in trainer.state.log_history if "reg" in row]
    assert abs(regs[0]) < 1e-6  # a fresh LoRA adapter is the aligned model
    assert regs[-1] > 1e-6


def test_kl_gradient_matches_the_direct_top_k_kl(model, tokenizer, tmp_path):
    examples = chat_examples(tokenizer)[:4]
    folder = build_reference_cache(model, tokenizer, examples, IDS, tmp_path / "c", 64, progress=False, topk=8)
    reference = CachedReference(folder, IDS, kind="topk", topk=8)
    batch = batch_of(tokenizer, examples)
    with torch.no_grad():
        ids, ref_logp, tail = reference_topk(full_logits(model, batch), 8)
    peft_model = lora(model)
    perturb_adapter(peft_model, scale=0.3)
    trainer = trainer_for(tmp_path, peft_model, tokenizer, examples, "kl", reference)
    peft_model.train()
    loss = trainer.compute_loss(peft_model, dict(batch))
    loss.backward()
    ours = lora_grads(peft_model)
    peft_model.zero_grad()
    logits = full_logits(peft_model, batch)
    weights = position_weights(batch["attention_mask"], batch["labels"], "response")
    kl = topk_kl_loss(logits.gather(-1, ids), torch.logsumexp(logits, -1), ref_logp, tail, weights)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    direct = ce + kl
    torch.testing.assert_close(loss, direct, rtol=1e-5, atol=1e-6)
    assert kl > 1e-4
    direct.backward()
    for n, g in lora_grads(peft_model).items():
        torch.testing.assert_close(ours[n], g, rtol=1e-4, atol=1e-6)


def test_row_terms_match_autograd_on_full_logits():
    torch.manual_seed(0)
    n, h, v, k = 7, 5, 11, 3
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(v, h, dtype=torch.float64), torch.randn(v, dtype=torch.float64)
    targets = torch.randint(0, v, (n,))
    ids, ref_logp, tail = reference_topk(torch.randn(n, v, dtype=torch.float64), k)
    coef_nll, coef_kl = torch.rand(n, dtype=torch.float64), torch.rand(n, dtype=torch.float64)
    nll, kl = chunked_row_terms(hidden, weight, bias, targets, (ids, ref_logp, tail), chunk=3)
    ((nll * coef_nll).sum() + (kl * coef_kl).sum()).backward()
    ours = hidden.grad.clone()
    hidden.grad = None
    logits = hidden @ weight.T + bias
    want_nll = F.cross_entropy(logits, targets, reduction="none")
    lse = torch.logsumexp(logits, -1)
    want_kl = torch.stack([
        topk_kl_loss(logits[i : i + 1, None].gather(-1, ids[i : i + 1, None]), lse[i : i + 1, None],
                     ref_logp[i : i + 1, None], tail[i : i + 1, None], torch.ones(1, 1, dtype=torch.float64))
        for i in range(n)
    ])  # fmt: skip
    torch.testing.assert_close(nll.double(), want_nll, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl.double(), want_kl, rtol=1e-5, atol=1e-6)
    ((want_nll * coef_nll).sum() + (want_kl * coef_kl).sum()).backward()
    torch.testing.assert_close(ours, hidden.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("regularizer", ["constrained_sft", "kl"])
def test_online_reference_equals_the_cache(model, tokenizer, tmp_path, regularizer):
    from logitguard.reference import OnlineStatsReference

    examples = chat_examples(tokenizer)[:4]
    kind, extra = ("label_logp", dict(label_logp=True)) if regularizer == "constrained_sft" else ("topk", dict(topk=4))
    folder = build_reference_cache(model, tokenizer, examples, IDS, tmp_path / "c", 64, progress=False, **extra)
    cached = CachedReference(folder, IDS, kind=kind, topk=4)
    online = OnlineStatsReference(IDS, kind=kind, topk=4)
    batch = {**batch_of(tokenizer, examples), "example_idx": torch.arange(4)}
    mask = batch["attention_mask"].bool()
    a, b = cached(model, batch), online(lora(model), batch)  # the online one disables the adapter
    for x, y in zip(a if kind == "topk" else [a], b if kind == "topk" else [b]):
        torch.testing.assert_close(x[mask].double(), y[mask].double(), rtol=1e-5, atol=1e-5)


def test_fused_projection_equals_two_and_refuses_another_loss():
    """With kl_ratio the NLL's and the KL's gradients share one (n, V) x (V, H) product; the result is the same, and
    a loss that weighs the two otherwise is an error, never a silently wrong gradient."""
    torch.manual_seed(1)
    n, h, v, k = 6, 4, 9, 3
    weight, bias = torch.randn(v, h), torch.randn(v)
    targets = torch.randint(0, v, (n,))
    ref = reference_topk(torch.randn(n, v), k)
    coef_nll, coef_kl = torch.rand(n) + 0.5, torch.rand(n) + 0.5
    grads = []
    for ratio in (None, coef_kl / coef_nll):
        hidden = torch.randn(n, h, generator=torch.Generator().manual_seed(0), requires_grad=True)
        nll, kl = chunked_row_terms(hidden, weight, bias, targets, ref, chunk=4, kl_ratio=ratio)
        ((nll * coef_nll).sum() + (kl * coef_kl).sum()).backward()
        grads.append(hidden.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    hidden = torch.randn(n, h, requires_grad=True)
    nll, kl = chunked_row_terms(hidden, weight, bias, targets, ref, kl_ratio=coef_kl / coef_nll)
    with pytest.raises(RuntimeError, match="kl_ratio"):
        ((nll * coef_nll).sum() + 2 * (kl * coef_kl).sum()).backward()
    # a micro-batch with no labelled token (no rows) backpropagates to an empty gradient
    hidden = torch.randn(0, h, requires_grad=True)
    nll, kl = chunked_row_terms(hidden, weight, bias, targets[:0], tuple(x[:0] for x in ref), kl_ratio=torch.ones(0))
    (nll.sum() + kl.sum()).backward()
    assert hidden.grad.shape == (0, h)


@pytest.mark.parametrize("regularizer", ["constrained_sft", "kl"])
def test_full_logits_path_equals_the_chunked_one(model, tokenizer, tmp_path, regularizer):
    """chunked_ce False (and a head that carries an adapter, or a trained head) computes the terms from full logits."""
    examples = chat_examples(tokenizer)[:4]
    extra = dict(label_logp=True) if regularizer == "constrained_sft" else dict(topk=8)
    folder = build_reference_cache(model, tokenizer, examples, IDS, tmp_path / "c", 64, progress=False, **extra)
    kind = "label_logp" if regularizer == "constrained_sft" else "topk"
    reference = CachedReference(folder, IDS, kind=kind, topk=8)
    peft_model = lora(model)
    perturb_adapter(peft_model, scale=0.3)
    peft_model.train()
    results = []
    for chunked in (True, False):
        trainer = trainer_for(tmp_path, peft_model, tokenizer, examples, regularizer, reference)
        trainer.chunked_ce = chunked
        loss = trainer.compute_loss(peft_model, dict(batch_of(tokenizer, examples)))
        loss.backward()
        results.append((loss.detach(), lora_grads(peft_model)))
        peft_model.zero_grad()
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for n, g in results[0][1].items():
        torch.testing.assert_close(g, results[1][1][n], rtol=1e-4, atol=1e-6)


def test_bench_runs_share_one_cache_with_the_union_of_extras(tmp_path, model_dir):
    """`logitguard train` through the runner: STR, constrained_sft and kl on the same data prebuild one cache holding
    the K logits, the label log-probs and the top-k, which every run then reads without a rebuild."""
    import json

    from test_runner import _bench, _tiny_experiment

    runs = [{"name": "STR", "train": {"safety_words": ["I"]}},
            {"name": "CSFT", "train": {"safety_words": ["I"], "regularizer": "constrained_sft"}},
            {"name": "KL", "train": {"safety_words": ["I"], "regularizer": "kl", "kl_topk": 8}}]  # fmt: skip
    rows = _bench(tmp_path, _tiny_experiment(tmp_path, model_dir, runs))["rows"]
    assert [r["name"] for r in rows] == ["STR", "CSFT", "KL"]
    caches = [p for p in (tmp_path / "cache" / "reference").iterdir() if p.is_dir()]
    assert len(caches) == 1, caches
    manifest = json.loads((caches[0] / "manifest.json").read_text())
    assert manifest["extras"] == {"label_logp": True, "topk": 8}
