"""The regularizer registry: the public aliases, settings from YAML and flags, validation, and defaults that keep
every committed results row's key."""

import dataclasses

import pytest

from logitguard import losses
from logitguard.config import ConfigError, TrainConfig, load_config
from logitguard.regularizers import REGISTRY, get


def test_public_aliases_keep_the_old_entries():
    assert losses.REGULARIZERS["str"] is losses.str_per_sequence
    assert losses.REGULARIZERS["restricted_kl"] is losses.restricted_kl
    assert losses.REGULARIZERS["pact"] is losses.pact_per_sequence
    assert losses.NORMALIZATION == {
        "str": "sequences", "restricted_kl": "sequences", "pact": "positions", "constrained_sft": "positions",
        "kl": "positions",
    }  # fmt: skip
    from logitguard import REGULARIZERS

    assert set(REGULARIZERS) == set(REGISTRY)


def test_entries_say_what_they_read():
    assert get("constrained_sft").replaces_ce and get("constrained_sft").reference == "label_logp"
    assert get("kl").reads == "topk_kl" and get("kl").positions == "response" and not get("kl").replaces_ce
    assert get("str").positions is None and get("str").reads == "safety"
    with pytest.raises(ConfigError, match="did you mean 'kl'"):
        get("kll")


def test_settings_from_yaml_and_flags(tmp_path):
    from logitguard.cli import build_parser

    path = tmp_path / "c.yaml"
    path.write_text("model: m\ndata: d\nregularizer: constrained_sft\ncsft_beta: 0.2\ncsft_bias_length: 3\n")
    cfg = load_config(path)
    assert (cfg.regularizer, cfg.csft_beta, cfg.csft_bias_length, cfg.csft_bias_factor) == (
        "constrained_sft",
        0.2,
        3,
        20,
    )
    args = build_parser().parse_args(
        ["train", str(path), "--regularizer", "kl", "--kl-topk", "8", "--csft-beta", "0.5"]
    )
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    cfg = load_config(path, overrides)
    assert (cfg.regularizer, cfg.kl_topk, cfg.csft_beta) == ("kl", 8, 0.5)
    with pytest.raises(ConfigError, match="kl_topk"):
        load_config(path, {"regularizer": "kl", "kl_topk": "0"})
    with pytest.raises(ConfigError, match="csft_beta"):
        load_config(path, {"csft_beta": "-1"})
    with pytest.raises(ConfigError, match="first_response_tokens"):
        load_config(path, {"first_response_tokens": "2"})
    with pytest.raises(ConfigError, match="regularizer"):
        load_config(path, {"regularizer": "nope"})
    for term in ("kl", "constrained_sft"):
        with pytest.raises(ConfigError, match="reference: paper"):
            load_config(path, {"regularizer": term, "reference": "paper"})
    assert load_config(path, {"regularizer": "str", "reference": "paper"}).reference == "paper"


def test_defaults_keep_the_results_keys():
    """Committed rows are keyed on their non-default settings: the new keys' defaults must not enter a key."""
    from logitguard.runner import Runner, _key

    cfg = TrainConfig(model="m", data="d")
    assert cfg.regularizer == "str"
    settings = Runner.settings(cfg)
    old = {k: v for k, v in settings.items() if not k.startswith(("csft_", "kl_"))}
    assert _key({"train": settings}) == _key({"train": old})
