"""Old names (logitguard.deprecated) still work for one release, warn, and leave every results key as it was."""

import hashlib
import json

import pytest
from helpers import chat_examples, training_args

from logitguard.cli import build_parser, main
from logitguard.cli.train import config_from_args
from logitguard.config import build_config, load_config
from logitguard.data import ChatCollator
from logitguard.errors import ConfigError
from logitguard.result_keys import result_key, setting


def test_str_weight_in_yaml_is_reg_weight_with_a_warning(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\ndata: d\nstr_weight: 0.3\n")
    with pytest.warns(FutureWarning, match="str_weight is deprecated: use reg_weight"):
        assert load_config(path).reg_weight == 0.3
    with pytest.warns(FutureWarning):  # a flag of the new name overrides the file's old key
        assert load_config(path, {"reg_weight": 0.1}).reg_weight == 0.1
    with pytest.raises(ConfigError, match="'str_weight' and 'reg_weight' are the same setting"):
        build_config({"model": "m", "data": "d", "str_weight": 0.3, "reg_weight": 0.1})


def test_the_old_flag_still_sets_lambda_and_is_not_in_help():
    parser = build_parser()
    args = parser.parse_args(["train", "--model", "m", "--data", "d", "--str-weight", "0.25"])
    with pytest.warns(FutureWarning, match="str_weight"):
        assert config_from_args(args).reg_weight == 0.25
    args = parser.parse_args(["train", "--model", "m", "--data", "d", "--reg-weight", "0"])
    assert config_from_args(args).reg_weight == 0
    train = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices["train"]
    assert "--reg-weight" in train.format_help() and "--str-weight" not in train.format_help()


def test_rows_keep_their_keys_across_the_rename():
    """A row written with str_weight and the same run configured with reg_weight hash alike, and both hash the
    old spelling: the committed rows' keys (tests/test_result_keys.py checks every one) do not move."""
    for value in (0.0, 0.3, 1.0):
        old = {"train": {"model": "m", "data": "d", "str_weight": value}}
        new = {"train": {"model": "m", "data": "d", "reg_weight": value}}
        assert result_key(old) == result_key(new)
    spelled = {"train": {"data": "d", "model": "m", "str_weight": 0.3}}  # what result_key hashed before the rename
    expected = hashlib.sha256(json.dumps(spelled, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert result_key({"train": {"model": "m", "data": "d", "reg_weight": 0.3}}) == expected
    assert setting({"str_weight": 0.3}, "reg_weight") == 0.3 and setting({"reg_weight": 0.1}, "reg_weight") == 0.1
    assert setting({}, "reg_weight", 1.0) == 1.0


def test_old_trainer_name_warns_and_takes_str_weight(model, tokenizer, tmp_path):
    from logitguard import SafetyTrainer, STRTrainer

    with pytest.warns(FutureWarning, match="STRTrainer is deprecated: use SafetyTrainer"):
        trainer = STRTrainer(
            model=model, args=training_args(tmp_path), train_dataset=chat_examples(tokenizer),
            data_collator=ChatCollator(tokenizer.pad_token_id), safety_ids=[5], reference=None, str_weight=0.0,
        )  # fmt: skip
    assert isinstance(trainer, SafetyTrainer) and trainer.configured_weight == 0.0


def test_old_trl_names_warn_and_take_str_weight(tmp_path):
    pytest.importorskip("trl")
    from logitguard.integrations.trl import SafetySFTConfig, STRSFTConfig

    with pytest.warns(FutureWarning, match="STRSFTConfig is deprecated: use SafetySFTConfig"):
        args = STRSFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, str_weight=0.4, bf16=False)
    assert isinstance(args, SafetySFTConfig) and args.reg_weight == 0.4


def test_bench_is_the_old_name_of_experiment(tmp_path, capsys):
    (tmp_path / "x.yaml").write_text("description: d\nmodel: toy\nruns:\n  - {name: LoRA, train: {reg_weight: 0}}\n")
    assert main(["bench", "list", "--experiments", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "logitguard bench is deprecated: use logitguard experiment" in out.err and out.out.startswith("x ")
    assert main(["experiment", "list", "--experiments", str(tmp_path)]) == 0
    assert "deprecated" not in capsys.readouterr().err
    main(["bench", "compare", str(tmp_path / "missing.json"), "LoRA", "aligned base"])  # every subcommand says it
    assert capsys.readouterr().err.startswith("logitguard bench is deprecated")


def test_a_run_saved_before_the_rename_resumes(tmp_path):
    """Its config.yaml says str_weight: it is the same setting, so the run resumes (the runner does not wipe it)."""
    from logitguard.config import save_config
    from logitguard.train import resume_conflicts

    out = tmp_path / "run"
    cfg = build_config({"model": "m", "data": "d", "reg_weight": 0.3, "output_dir": str(out)})
    (out / "checkpoint-10").mkdir(parents=True)
    (out / "checkpoint-10" / "trainer_state.json").write_text("{}")
    save_config(cfg, out / "config.yaml")
    saved = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(saved.replace("reg_weight:", "str_weight:"))  # as 0.1 wrote it
    assert resume_conflicts(cfg, out) == []
    assert resume_conflicts(build_config({"model": "m", "data": "d", "reg_weight": 0.1}), out) == ["reg_weight"]


def test_experiment_layers_mix_old_and_new_names(tmp_path):
    """A file-wide str_weight and a run's reg_weight: the run's wins, as one name would."""
    from logitguard.experiment import load_experiment

    (tmp_path / "x.yaml").write_text(
        "description: d\nmodel: toy\ntrain: {data: d, str_weight: 1}\n"
        "runs:\n  - {name: LoRA, train: {reg_weight: 0}}\n  - {name: STR, train: {}}\n"
    )
    with pytest.warns(FutureWarning, match="str_weight"):
        exp = load_experiment(str(tmp_path / "x.yaml"))
    assert exp.train == {"data": "d", "reg_weight": 1} and exp.runs[0].train == {"reg_weight": 0}


def test_old_trl_config_refuses_both_names_and_keeps_one(tmp_path):
    pytest.importorskip("trl")
    import dataclasses

    from logitguard.integrations.trl import STRSFTConfig

    common = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False)
    with pytest.warns(FutureWarning), pytest.raises(ConfigError, match="same setting"):
        STRSFTConfig(str_weight=0.3, reg_weight=0.5, **common)
    with pytest.warns(FutureWarning):
        args = STRSFTConfig(str_weight=0.3, **common)
    assert args.str_weight is None and args.reg_weight == 0.3
    with pytest.warns(FutureWarning):
        assert dataclasses.replace(args, reg_weight=0.7).reg_weight == 0.7


def test_old_trainer_attribute_warns(model, tokenizer, tmp_path):
    from logitguard.trainer import SafetyTrainer

    trainer = SafetyTrainer(
        model=model, args=training_args(tmp_path), train_dataset=chat_examples(tokenizer),
        data_collator=ChatCollator(tokenizer.pad_token_id), safety_ids=[5], reference=None, reg_weight=0.0,
    )  # fmt: skip
    with pytest.warns(FutureWarning, match="trainer.str_weight is deprecated"):
        assert trainer.str_weight == 0.0
