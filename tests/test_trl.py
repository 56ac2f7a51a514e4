"""logitguard inside TRL's SFTTrainer: trains with TRL's loss types and data formats, and agrees with logitguard's
own trainer on the same tokenized data."""

import pytest
import torch
from helpers import chat_examples, perturb_adapter

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from test_trainer import lora, one_step_update  # noqa: E402

from logitguard.config import ConfigError  # noqa: E402
from logitguard.integrations.trl import SafetySFTConfig, SafetySFTTrainer  # noqa: E402
from logitguard.tokens import SafetyTokens  # noqa: E402

CHAT = [
    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    for q, a in [
        ("Name a fruit.", "An apple is a fruit."),
        ("What color is the sky?", "The sky is blue."),
        ("Help me do a forbidden thing.", "I cannot help with that."),
        ("Two plus two?", "Two plus two is four."),
    ]
]


def config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
        logging_steps=1, max_length=64, per_device_train_batch_size=2, learning_rate=1e-2, max_steps=2, seed=0,
        safety_words=["I", "cannot"], cache_dir=str(tmp_path / "cache"), bf16=False,
    )  # fmt: skip
    values.update(overrides)
    return SafetySFTConfig(**values)


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_trl_trains_lora_with_str_for_both_loss_types(model, tokenizer, tmp_path, loss_type):
    from peft import LoraConfig

    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = SafetySFTTrainer(
        model=model, args=config(tmp_path, loss_type=loss_type), train_dataset=Dataset.from_list(CHAT),
        processing_class=tokenizer, peft_config=peft_config,
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for n, p in trainer.model.named_parameters():
        assert (not torch.equal(p, before[n])) == ("lora_" in n), n
    logs = [row for row in trainer.state.log_history if "reg" in row]
    assert logs and all(row["reg"] >= 0 and {"ce", "lambda", "loss"} <= set(row) for row in logs)
    assert logs[-1]["reg"] > 0  # the adapter moved the safety logits away from the cached reference


def test_trl_prompt_completion_and_online_reference(model, tokenizer, tmp_path):
    rows = [{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in CHAT]
    trainer = SafetySFTTrainer(
        model=lora(model), args=config(tmp_path, reference="online", positions="response"),
        train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    assert any("reg" in row for row in trainer.state.log_history)


def test_trl_refuses_packing_and_rewriting_inits(model, tokenizer, tmp_path):
    from peft import LoraConfig

    with pytest.raises(ConfigError, match="packing"):
        config(tmp_path, packing=True)
    with pytest.raises(ConfigError, match="rewrites the base weights"):
        SafetySFTTrainer(
            model=model, args=config(tmp_path), train_dataset=Dataset.from_list(CHAT), processing_class=tokenizer,
            peft_config=LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"),
        )  # fmt: skip
    # given positionally, as SFTTrainer's signature allows
    import inspect

    from trl import SFTTrainer

    values = {"train_dataset": Dataset.from_list(CHAT), "processing_class": tokenizer,
              "peft_config": LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa")}  # fmt: skip
    params = list(inspect.signature(SFTTrainer.__init__).parameters.values())[3:]
    upto = [q.name for q in params].index("peft_config") + 1
    with pytest.raises(ConfigError, match="rewrites the base weights"):
        SafetySFTTrainer(model, config(tmp_path), *[values.get(q.name, q.default) for q in params[:upto]])


def trl_step_update(tmp_path, tokenizer, examples, ids, batch_size, accum):
    """One SGD step of SafetySFTTrainer on logitguard's own tokenized examples (input_ids + completion_mask)."""
    from conftest import tiny_llama

    peft_model = lora(tiny_llama(len(tokenizer)))
    perturb_adapter(peft_model, scale=0.1)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    rows = [{"input_ids": e["input_ids"], "completion_mask": [int(x != -100) for x in e["labels"]]} for e in examples]
    trainer = SafetySFTTrainer(
        model=peft_model, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        args=config(tmp_path, reg_weight=2.0, safety_words=["I", "cannot"], max_steps=1, optim="sgd",
                    learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
                    per_device_train_batch_size=batch_size, gradient_accumulation_steps=accum,
                    completion_only_loss=True, output_dir=str(tmp_path / f"trl-{batch_size}-{accum}")),
    )  # fmt: skip
    assert list(trainer.safety_ids) == ids
    trainer.train()
    log = next(row for row in trainer.state.log_history if "reg" in row)
    return {n: p.detach() - before[n] for n, p in peft_model.named_parameters() if p.requires_grad}, log


def test_trl_agrees_with_logitguards_trainer_and_is_invariant_to_accumulation(tokenizer, tmp_path):
    examples = chat_examples(tokenizer)[:4]
    ids = list(SafetyTokens.from_words(tokenizer, "I,cannot").ids)
    ours = one_step_update(tmp_path, tokenizer, examples, ids, batch_size=4, accum=1)
    theirs, log = trl_step_update(tmp_path, tokenizer, examples, ids, batch_size=4, accum=1)
    accumulated, _ = trl_step_update(tmp_path, tokenizer, examples, ids, batch_size=1, accum=4)
    assert any(v.abs().max() > 0 for v in ours.values())
    for n in ours:
        torch.testing.assert_close(theirs[n], ours[n], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(accumulated[n], ours[n], rtol=1e-4, atol=1e-6)
    assert log["reg"] > 0 and log["ce"] > 0


def test_trl_builds_the_cache_where_the_model_trains_under_fsdp_or_deepspeed(model, tokenizer, tmp_path, monkeypatch):
    """Under FSDP and DeepSpeed the Trainer leaves the model where it was loaded (the CPU; their wrappers place it
    when prepared), so the cache's forward ran there: hours for an 8B model. The meta device stands in for the GPU."""
    import logitguard.integrations.trl as integration

    args = config(tmp_path)
    monkeypatch.setattr(SafetySFTConfig, "place_model_on_device", property(lambda self: False))  # as FSDP, DeepSpeed
    monkeypatch.setattr(SafetySFTConfig, "device", property(lambda self: torch.device("meta")))

    class Stop(Exception):
        pass

    seen = []

    def build(aligned, *rest, **kwargs):
        seen.append({p.device for p in aligned.parameters()})
        raise Stop

    monkeypatch.setattr(integration, "build_reference_cache", build)
    with pytest.raises(Stop):
        SafetySFTTrainer(
            model=lora(model), args=args, train_dataset=Dataset.from_list(CHAT), processing_class=tokenizer
        )
    assert seen == [{torch.device("meta")}]


def test_another_trl_is_refused_at_import_with_the_fix(monkeypatch):
    """The integration uses TRL internals: another release failed at the first step, after the cache was built."""
    import importlib
    import sys

    import trl

    monkeypatch.setattr(trl, "__version__", "1.17.0")
    monkeypatch.delitem(sys.modules, "logitguard.integrations.trl")  # put back as it was after the test
    refusal = r"supports TRL 1\.16 .* trl 1\.17\.0 is installed; pip install 'trl==1\.16"
    with pytest.raises(ImportError, match=refusal) as e:
        importlib.import_module("logitguard.integrations.trl")
    assert "\n" not in str(e.value)


def _steered(tmp_path, tokenizer, batch_size, accum, counted=True, **settings):
    from conftest import tiny_llama

    peft_model = lora(tiny_llama(len(tokenizer)))
    perturb_adapter(peft_model, scale=0.1)
    examples = chat_examples(tokenizer)[:4]
    rows = [{"input_ids": e["input_ids"], "completion_mask": [int(x != -100) for x in e["labels"]]} for e in examples]
    trainer = SafetySFTTrainer(
        model=peft_model, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        args=config(tmp_path, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", max_grad_norm=0.0,
                    weight_decay=0.0, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accum,
                    completion_only_loss=True, output_dir=str(tmp_path / f"steer-{batch_size}-{accum}-{counted}"),
                    **settings),
    )  # fmt: skip
    # a model whose forward takes no loss kwargs gets no step token count: TRL's CE is then a micro-batch mean
    trainer.model_accepts_loss_kwargs = counted
    trainer.train()
    return trainer


def test_trl_steers_lambda_as_logitguard_train_does(tokenizer, tmp_path):
    """str_budget from the TRL config: lambda moves by dual ascent on each optimizer step's mean regularizer, which
    the controller sees alike for one micro-batch of 4 and four accumulated micro-batches of 1, with TRL's step-wide
    token count or without it."""
    from logitguard.controllers import BudgetController, dual_ascent

    regs = {}
    for batch_size, accum, counted in ((4, 1, True), (1, 4, True), (1, 4, False)):
        trainer = _steered(tmp_path, tokenizer, batch_size, accum, counted, str_budget=1e-3, str_budget_lr=10.0)
        controller = trainer.lambda_controller
        assert isinstance(controller, BudgetController) and len(controller.history) == 2
        weight = trainer.args.reg_weight  # where lambda starts: the config's (STR's default here)
        assert weight == 0.3
        for row in controller.history:
            weight = dual_ascent(weight, row["reg"], 1e-3, 10.0)
            assert row["lambda"] == pytest.approx(weight)
        assert [row["lambda"] for row in trainer.state.log_history if "lambda" in row][-1] == pytest.approx(weight)
        regs[accum, counted] = [row["reg"] for row in controller.history]
    assert regs[1, True][0] > 1e-3
    assert regs[4, True] == pytest.approx(regs[1, True], rel=1e-4)
    # without it TRL averages per micro-batch means, so only the first step's parameters (and reg) are the same
    assert regs[4, False][0] == pytest.approx(regs[1, True][0], rel=1e-4)


def test_trl_holds_a_safety_target_from_the_monitor(tokenizer, tmp_path):
    from logitguard.controllers import SafetyTarget

    probe = tmp_path / "probe.txt"
    probe.write_text("Help me do a forbidden thing.\nHow do I hurt someone?\n")
    trainer = _steered(tmp_path, tokenizer, 4, 1, monitor_harmful=str(probe), monitor_every=1,
                       safety_target_drop=0.0)  # fmt: skip
    controller, checks = trainer.lambda_controller, trainer.safety_monitor.history
    assert isinstance(controller, SafetyTarget) and [c["step"] for c in checks] == [0, 1, 2]
    assert controller.target == checks[0]["refusal"] and len(controller.history) == 3
    with pytest.raises(ConfigError, match="needs monitor_harmful"):
        config(tmp_path, safety_target=0.9)


def test_reg_weight_defaults_to_the_regularizers_own(tmp_path):
    assert config(tmp_path).reg_weight == 0.3  # STR's, as logitguard train's
    assert config(tmp_path, regularizer="kl").reg_weight == 1.0
    assert config(tmp_path, reg_weight=1.0).reg_weight == 1.0


def test_trl_plain_run_trains_with_packing(model, tokenizer, tmp_path):
    """The drop-in's baseline (reg_weight 0) takes TRL's padding-free packed batches, which have no attention_mask."""
    trainer = SafetySFTTrainer(
        model=lora(model), args=config(tmp_path, reg_weight=0.0, packing=True), train_dataset=Dataset.from_list(CHAT),
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    assert trainer.state.global_step == 2


def test_rewriting_inits_are_named_from_the_config_or_the_attached_adapter():
    from types import SimpleNamespace

    from peft import LoraConfig

    from logitguard.integrations.trl import _rewriting_init

    for init in ("pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"):
        assert _rewriting_init(None, SimpleNamespace(init_lora_weights=init)) == init
    for init in (True, "gaussian", "eva", "mica", "orthogonal"):  # they set only the adapter's own matrices
        assert _rewriting_init(None, SimpleNamespace(init_lora_weights=init)) is None
    attached = SimpleNamespace(peft_config={"default": LoraConfig(init_lora_weights="pissa")})  # a PeftModel passed in
    assert _rewriting_init(attached, None) == "pissa"


def test_terms_on_the_answer_need_labels_that_find_it(model, tokenizer, tmp_path):
    """Conversational data without assistant_only_loss is labelled everywhere: a term on the answer's tokens would
    score the template's; refused with the fix. STR on every position is not affected."""
    data = Dataset.from_list(CHAT)
    for settings in ({"regularizer": "constrained_sft"}, {"positions": "response"}, {"first_response_tokens": 2}):
        with pytest.raises(ConfigError, match="assistant_only_loss=True"):
            SafetySFTTrainer(model=lora(model), args=config(tmp_path, **settings), train_dataset=data,
                             processing_class=tokenizer)  # fmt: skip
    SafetySFTTrainer(model=lora(model), args=config(tmp_path), train_dataset=data, processing_class=tokenizer)
    # decided from the rows, not the flags: prompt-completion data with completion_only_loss off is labelled
    # everywhere too; pre-tokenized rows that mask their prompt need neither flag
    pairs = Dataset.from_list([{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in CHAT])
    with pytest.raises(ConfigError, match="label every token"):
        SafetySFTTrainer(model=lora(model), args=config(tmp_path, positions="response", completion_only_loss=False),
                         train_dataset=pairs, processing_class=tokenizer)  # fmt: skip
    masked = Dataset.from_list(_masked(tokenizer))
    trainer = SafetySFTTrainer(model=lora(model), args=config(tmp_path, positions="response"), train_dataset=masked,
                               processing_class=tokenizer)  # fmt: skip
    trainer.train()
    assert [row["reg"] for row in trainer.state.log_history if "reg" in row][-1] > 0


def _masked(tokenizer) -> list[dict]:
    """Pre-tokenized rows with the prompt masked, and a column the model does not take (training drops it)."""
    rows = []
    for r in CHAT:
        prompt = tokenizer.apply_chat_template(r["messages"][:1], add_generation_prompt=True, return_dict=False)
        ids = tokenizer.apply_chat_template(r["messages"], return_dict=False)
        rows.append({"input_ids": ids, "labels": [-100] * len(prompt) + ids[len(prompt) :], "source": "fixture"})
    return rows


def test_a_collator_without_labels_is_refused_for_terms_on_the_answer(model, tokenizer, tmp_path):
    def unlabelled(rows):
        return {"input_ids": torch.tensor([row["input_ids"][:4] for row in rows])}

    with pytest.raises(ConfigError, match="carry none"):
        SafetySFTTrainer(model=lora(model), args=config(tmp_path, positions="response"), data_collator=unlabelled,
                         train_dataset=Dataset.from_list(_masked(tokenizer)), processing_class=tokenizer)  # fmt: skip


def test_reg_weight_must_be_finite(tmp_path):
    with pytest.raises(ConfigError, match="finite number >= 0"):
        config(tmp_path, reg_weight=float("nan"))


def test_a_streamed_dataset_needs_the_online_reference(model, tokenizer, tmp_path):
    streamed = Dataset.from_list(CHAT).to_iterable_dataset()
    with pytest.raises(ConfigError, match="reference='online'"):
        SafetySFTTrainer(model=lora(model), args=config(tmp_path), train_dataset=streamed, processing_class=tokenizer)
