"""The adapter kinds `method:` names (logitguard.adapters): what each entry makes, and what the rest of logitguard
reads from it instead of comparing names."""

import pytest
from conftest import tiny_llama

from logitguard import adapters
from logitguard.config import ConfigError, build_config
from logitguard.models import METHODS, attach_method, resolve_dtype
from logitguard.reference import OnlineReference, ReferenceError


def test_every_method_is_a_registered_kind_and_a_typo_is_named():
    assert METHODS == tuple(adapters.REGISTRY) == ("lora", "dora", "pissa", "full", "salora")
    with pytest.raises(ConfigError, match="did you mean 'dora'"):
        adapters.get("dorra")


@pytest.mark.parametrize(
    "method, use_dora, init, dropout",
    [
        ("lora", False, True, 0.1),
        ("dora", True, True, 0.1),
        ("pissa", False, "pissa", 0.0),
        ("salora", False, True, 0.0),
    ],  # fmt: skip
)
def test_the_peft_adapter_each_kind_attaches(method, use_dora, init, dropout):
    model = attach_method(tiny_llama(64), method, rank=2, alpha=4, dropout=0.1, target_modules=["q_proj"])
    config = model.peft_config["default"]
    assert (config.use_dora, config.init_lora_weights, config.lora_dropout, config.r) == (use_dora, init, dropout, 2)


def test_full_trains_every_weight_and_keeps_them_fp32_under_half_precision():
    model = attach_method(tiny_llama(64), "full")
    assert not hasattr(model, "peft_config") and all(p.requires_grad for p in model.parameters())
    assert resolve_dtype("auto", "bf16", "full") == "float32"
    assert resolve_dtype("auto", "bf16", "lora") == "bfloat16"


@pytest.mark.parametrize("method, why", [("full", "no adapter"), ("pissa", "rewrites"), ("salora", "rewrites")])
def test_no_online_reference_where_disabling_the_adapter_is_not_the_aligned_model(method, why):
    with pytest.raises(ReferenceError, match=why):
        OnlineReference([1, 2], method)
    extra = {"salora_safety_data": "s.jsonl"} if method == "salora" else {}
    with pytest.raises(ConfigError, match=f"reference 'online'.*{why}.*use reference cache"):
        build_config({"model": "m", "data": "d", "method": method, "reference": "online", **extra})
    OnlineReference([1, 2], "dora")  # an adapter over untouched weights: fine


def test_kind_settings_quantization_and_other_kinds_keys():
    with pytest.raises(ConfigError, match="use method lora, dora, not pissa"):
        build_config({"model": "m", "data": "d", "method": "pissa", "quantize": "4bit"})
    with pytest.raises(ConfigError, match="salora_safety_data: method salora needs"):
        build_config({"model": "m", "data": "d", "method": "salora"})
    with pytest.raises(ConfigError, match="salora_safety_data: only used by method salora, not lora"):
        build_config({"model": "m", "data": "d", "salora_safety_data": "s.jsonl"})
    assert build_config({"model": "m", "data": "d", "method": "dora", "quantize": "8bit"}).quantize == "8bit"


def test_runs_that_train_on_other_examples_do_not_share_a_prebuilt_cache():
    """A run with safety rows mixed in trains on other examples than a plain run on the same file: its own cache."""
    from logitguard.train import cache_group

    plain = build_config({"model": "m", "data": "d.jsonl", "safety_words": ["I"]})
    other_words = build_config({"model": "m", "data": "d.jsonl", "safety_words": ["cannot"], "reg_weight": 0.3})
    mixed = build_config({"model": "m", "data": "d.jsonl", "safety_mix": "s.jsonl", "safety_mix_count": 5})
    assert cache_group(plain) == cache_group(other_words)  # one cache, the union of their ids
    assert cache_group(plain) != cache_group(mixed)
    assert cache_group(mixed) != cache_group(build_config({"model": "m", "data": "d.jsonl", "safety_mix": "s.jsonl",
                                                           "safety_mix_count": 5, "seed": 1}))  # fmt: skip
