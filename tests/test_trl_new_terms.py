"""Every registered regularizer, and anchored regularization, inside TRL's SFTTrainer; the new terms agree with
logitguard's own trainer on the same tokenized data."""

import pytest
import torch
from helpers import chat_examples, perturb_adapter

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from test_trainer import lora  # noqa: E402
from test_trl import CHAT, config  # noqa: E402

from logitguard.integrations.trl import SafetySFTTrainer  # noqa: E402
from logitguard.tokens import SafetyTokens  # noqa: E402


@pytest.mark.parametrize("regularizer", ["constrained_sft", "kl", "pact"])
@pytest.mark.filterwarnings("ignore:regularizer pact")
def test_trl_trains_each_term(model, tokenizer, tmp_path, regularizer):
    rows = [{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in CHAT]
    trainer = SafetySFTTrainer(
        model=lora(model), args=config(tmp_path, regularizer=regularizer, kl_topk=8, max_steps=3),
        train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for n, p in trainer.model.named_parameters():
        assert (not torch.equal(p, before[n])) == ("lora_" in n), n
    regs = [row["reg"] for row in trainer.state.log_history if "reg" in row]
    assert regs and all(r >= -1e-6 for r in regs)  # a KL at the reference rounds to about 0, either side
    if regularizer == "kl":
        assert abs(regs[0]) < 1e-6 < regs[-1]  # zero at the aligned model, then the adapter moves away


def step_update(tmp_path, tokenizer, examples, regularizer, trl: bool, batch_size: int = 4, accum: int = 1):
    """The adapter's change after one SGD step of TRL's trainer or logitguard's, from the same perturbed adapter."""
    from conftest import tiny_llama
    from helpers import training_args

    from logitguard.data import ChatCollator
    from logitguard.regularizers import get
    from logitguard.trainer import SafetyTrainer

    tokens = SafetyTokens.from_words(tokenizer, "I,cannot")
    ids = list(tokens.ids)
    base = tiny_llama(len(tokenizer))
    sgd = dict(max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0,
               weight_decay=0.0, per_device_train_batch_size=batch_size,
               gradient_accumulation_steps=accum)  # fmt: skip
    args = config(tmp_path, regularizer=regularizer, kl_topk=8, reg_weight=2.0, completion_only_loss=True,
                  output_dir=str(tmp_path / f"out-{trl}-{batch_size}"), **sgd)  # fmt: skip
    if not trl:
        build = dict(cache_root=tmp_path / "c", max_length=64, progress=False)
        reference = get(regularizer).cached(base, tokenizer, examples, ids, args, **build)
    peft_model = lora(base)
    perturb_adapter(peft_model, scale=0.1)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    if trl:
        rows = [{"input_ids": e["input_ids"], "completion_mask": [int(x != -100) for x in e["labels"]]}
                for e in examples]  # fmt: skip
        trainer = SafetySFTTrainer(model=peft_model, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                args=args)  # fmt: skip
    else:
        trainer = SafetyTrainer(
            model=peft_model, args=training_args(tmp_path / "ours", **sgd), train_dataset=examples,
            data_collator=ChatCollator(tokenizer.pad_token_id), safety_ids=ids, reference=reference, reg_weight=2.0,
            regularizer=regularizer, regularizer_kwargs=get(regularizer).kwargs(args, tokens) or None,
        )  # fmt: skip
    trainer.train()
    return {n: p.detach() - before[n] for n, p in peft_model.named_parameters() if p.requires_grad}


@pytest.mark.filterwarnings("ignore:regularizer pact")
@pytest.mark.parametrize("regularizer", ["constrained_sft", "kl", "pact"])
def test_trl_agrees_with_logitguards_trainer(tokenizer, tmp_path, regularizer):
    examples = chat_examples(tokenizer)[:4]
    ours = step_update(tmp_path, tokenizer, examples, regularizer, trl=False)
    theirs = step_update(tmp_path, tokenizer, examples, regularizer, trl=True)
    accumulated = step_update(tmp_path, tokenizer, examples, regularizer, trl=True, batch_size=1, accum=4)
    assert any(v.abs().max() > 0 for v in ours.values())
    for n in ours:
        torch.testing.assert_close(theirs[n], ours[n], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(accumulated[n], ours[n], rtol=1e-4, atol=1e-6)


def test_trl_anchored_regularization(model, tokenizer, tmp_path, monkeypatch):
    import logitguard.anchors as anchors

    refusals = [[{"role": "user", "content": "Help me do a forbidden thing."},
                 {"role": "assistant", "content": "I cannot help with that."}]] * 3  # fmt: skip
    monkeypatch.setattr(anchors, "anchor_conversations", lambda *a, **k: refusals)  # a tiny random model refuses none
    prompts = tmp_path / "harmful.txt"
    prompts.write_text("Help me do a forbidden thing.\n")
    trainer = SafetySFTTrainer(
        model=lora(model), args=config(tmp_path, reg_weight=0.0, anchor_prompts=str(prompts), max_steps=3),
        train_dataset=Dataset.from_list(CHAT), processing_class=tokenizer,
    )  # fmt: skip
    assert trainer.anchors is not None and len(trainer.anchors.examples) == 3
    trainer.train()
    anchored = [row["anchor"] for row in trainer.state.log_history if "anchor" in row]
    assert anchored and anchored[0] < 1e-6 < anchored[-1]  # zero at the aligned model, then it moves


def test_trl_refuses_a_loss_type_the_objective_would_drop(tmp_path):
    from logitguard.config import ConfigError

    with pytest.raises(ConfigError, match="loss_type nll"):
        config(tmp_path, regularizer="constrained_sft", loss_type="dft")
    config(tmp_path, regularizer="kl", loss_type="dft")  # kl is added to TRL's loss, whatever its type
    with pytest.raises(ConfigError, match="label_smoothing_factor 0"):
        config(tmp_path, regularizer="constrained_sft", label_smoothing_factor=0.1)


def test_trl_refuses_what_would_drop_a_terms_gradient(model, tokenizer, tmp_path):
    from logitguard.config import ConfigError

    data = Dataset.from_list(CHAT)
    # full fine-tuning trains lm_head, which the KL (projected onto the hidden state) would leave without gradient
    with pytest.raises(ConfigError, match="trained output head no gradient"):
        SafetySFTTrainer(model=model, args=config(tmp_path, regularizer="kl"), train_dataset=data,
                         processing_class=tokenizer)  # fmt: skip
    # a compute_loss_func bypasses the fused head whose log-probs constrained SFT reads (by keyword or position)
    csft = config(tmp_path, regularizer="constrained_sft")
    with pytest.raises(ConfigError, match="compute_loss_func"):
        SafetySFTTrainer(model=lora(model), args=csft, train_dataset=data, processing_class=tokenizer,
                         compute_loss_func=lambda *a, **k: 0)  # fmt: skip
    with pytest.raises(ConfigError, match="compute_loss_func"):
        SafetySFTTrainer(lora(model), csft, None, data, None, tokenizer, lambda *a, **k: 0)


def test_constrained_sft_keeps_a_moe_models_router_loss(tokenizer, tmp_path):
    """constrained SFT replaces TRL's cross-entropy but not a Mixture-of-Experts model's load-balancing loss: the
    loss with router_aux_loss_coef c is the one without plus c * the model's aux_loss."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    moe = MixtralConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0,
                        output_router_logits=True, router_aux_loss_coef=0.5)  # fmt: skip
    base = MixtralForCausalLM(moe)
    rows = [{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in CHAT]
    losses, aux = {}, None
    for coef in (0.5, 0.0):
        model = base if coef else MixtralForCausalLM(moe)
        if not coef:
            model.load_state_dict(base.state_dict())
        trainer = SafetySFTTrainer(
            model=model,
            args=config(tmp_path / str(coef), regularizer="constrained_sft", router_aux_loss_coef=coef),
            train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        )  # fmt: skip
        batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(2)]))
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by train() for each step
        losses[coef] = trainer.compute_loss(trainer.model, batch).item()
        if coef:
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
            aux = trainer.model(**inputs, output_router_logits=True).aux_loss.item()
    assert aux > 0
    assert losses[0.5] == pytest.approx(losses[0.0] + 0.5 * aux, rel=1e-4)
