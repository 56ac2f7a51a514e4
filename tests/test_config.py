import pytest

from logitguard.config import ConfigError, TrainConfig, load_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_then_overrides(tmp_path):
    path = write(tmp_path, "model: m\ndata: d.jsonl\nreg_weight: 2\nsafety_words: [I, cannot]\n")
    cfg = load_config(path, {"reg_weight": "0.5", "target_modules": "q_proj,v_proj", "resume": "false"})
    assert cfg.reg_weight == 0.5 and cfg.safety_words == ["I", "cannot"]
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.resume is False


def test_folders_under_home_are_expanded(tmp_path, monkeypatch):
    """cache_dir: ~/.cache/logitguard (the documented default) means the home folder, not a folder named ~."""
    from pathlib import Path

    from logitguard.config import default_cache_dir
    from logitguard.experiment import Placeholders

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, {"model": "m", "data": "d", "cache_dir": "~/c", "output_dir": "~/o"})
    assert (cfg.cache_dir, cfg.output_dir) == (str(tmp_path / "c"), str(tmp_path / "o"))
    monkeypatch.setenv("LOGITGUARD_CACHE", "~/lg")
    assert default_cache_dir() == str(tmp_path / "lg")
    assert Placeholders(None, "~/p").cache_dir == str(tmp_path / "p") and Path(cfg.cache_dir).is_absolute()


def test_unknown_key_named_with_suggestion(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'str_wieght'.*'reg_weight'"):
        load_config(write(tmp_path, "model: m\ndata: d\nstr_wieght: 1\n"))


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("model: m\ndata: d\nmethod: qlora\n", "method: 'qlora' is not one of"),
        ("model: m\ndata: d\nrank: two\n", "rank: expected an integer"),
        ("model: m\ndata: d\nreg_weight: -1\n", "reg_weight: must be a finite number >= 0"),
        ("model: m\ndata: d\nresume: maybe\n", "resume: expected true or false"),
        ("model: m\ndata: d\ntrainer: {warmup_step: 3}\n", "trainer.warmup_step.*'warmup_steps'"),
        ("data: d\n", "model: required"),
        ("- a\n- b\n", "must hold a mapping"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(write(tmp_path, text))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))


def test_flags_and_saved_config_read_model_and_data_first(tmp_path):
    """Composed settings (safety, anchors, regularizers) come after TrainConfig's own keys in `train --help` and in
    the config.yaml a run saves, though dataclass inheritance lists them first; no key is lost."""
    import dataclasses

    import yaml

    from logitguard.config import TrainConfig, build_config, ordered_fields, save_config

    names = [f.name for f in ordered_fields()]
    assert names[:3] == ["model", "gguf_file", "data"] and sorted(names) == sorted(
        f.name for f in dataclasses.fields(TrainConfig))  # fmt: skip
    save_config(build_config({"model": "m", "data": "d", "reg_weight": 0.5}), tmp_path / "c.yaml")
    saved = yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert list(saved)[:3] == ["model", "gguf_file", "data"] and saved["reg_weight"] == 0.5


def test_every_key_is_in_the_configuration_reference():
    """docs/configuration.md's key table names every TrainConfig key (a key added without a row fails here)."""
    import dataclasses
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    table = doc[doc.index("## Config keys") : doc.index("## Data")]
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f"`{f.name}`" not in table]
    assert missing == []


def test_reg_weight_defaults_to_the_regularizers_own():
    base = {"model": "m", "data": "d.jsonl"}
    assert load_config(None, base).reg_weight == 0.3  # STR's: the real model's lambda frontier (docs/real-model.md)
    for name in ("kl", "pact", "restricted_kl", "constrained_sft"):
        assert load_config(None, {**base, "regularizer": name, "safety_words": "I,cannot"}).reg_weight == 1.0
    assert load_config(None, {**base, "reg_weight": "1"}).reg_weight == 1.0  # given: kept, whatever the default
    assert load_config(None, {**base, "reg_weight": "0"}).reg_weight == 0.0
