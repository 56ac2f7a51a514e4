import json

import pytest
from helpers import ASSETS
from safetensors.torch import load_file

from logitguard.cli import main


def run_train(tmp_path, model_dir, *extra, rc=0):
    out = tmp_path / "out"
    argv = [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(ASSETS / "chat.jsonl"),
        "--output-dir",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--max-length",
        "64",
        "--batch-size",
        "4",
        "--logging-steps",
        "1",
        "--trainer",
        '{"use_cpu": true, "disable_tqdm": true}',
        *extra,
    ]
    assert main(argv) == rc
    return out


def test_train_writes_adapter_tokens_config_metrics(tmp_path, model_dir, capsys):
    out = run_train(tmp_path, model_dir, "--epochs", "2", "--safety-words", "I,cannot", "--reg-weight", "0.5")
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights)
    tokens = json.loads((out / "safety_tokens.json").read_text())
    assert tokens["words"] == ["I", "cannot"] and tokens["ids"]
    assert "reg_weight: 0.5" in (out / "config.yaml").read_text()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("reg" in r and "ce" in r for r in rows)
    assert str(out) in capsys.readouterr().out


def test_resume_from_last_checkpoint(tmp_path, model_dir, capsys):
    first = run_train(tmp_path, model_dir, "--epochs", "1", "--save-steps", "1")
    capsys.readouterr()
    before = json.loads((first / "checkpoint-2" / "train_seconds.json").read_text())["seconds"]  # rotated later
    out = run_train(tmp_path, model_dir, "--epochs", "2", "--save-steps", "1")
    result = next(json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith('{"output_dir"'))
    assert result["resumed_from"].endswith("checkpoint-2") and result["global_step"] == 4
    assert result["steps_run"] == 2 and result["train_seconds"] > before > 0  # the first run's time counts
    assert (out / "checkpoint-4").exists()


@pytest.mark.parametrize("method", ["dora", "pissa", "full"])
def test_other_methods_train(tmp_path, model_dir, method):
    out = run_train(tmp_path, model_dir, "--method", method, "--save-steps", "100")
    name = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    assert (out / name).exists()


def test_online_reference_refused_for_pissa(tmp_path, model_dir, capsys):
    run_train(tmp_path, model_dir, "--method", "pissa", "--reference", "online", rc=2)
    assert "method 'pissa' rewrites the base weights; use reference cache" in capsys.readouterr().err


def test_config_typo_is_reported(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\ndata: d\nlamda: 1\n")
    assert main(["train", str(cfg)]) == 2
    assert "unknown key 'lamda'" in capsys.readouterr().err


def test_alpaca_holdout_and_column_mapping_from_the_command_line(tmp_path, model_dir):
    """The paper's Alpaca setting: rows held out of training are written for eval loss; columns map."""
    rows = [{"q": f"Name fruit number {i}.", "a": "An apple is a fruit."} for i in range(12)]
    (tmp_path / "qa.json").write_text(json.dumps(rows))
    out = tmp_path / "out"
    argv = ["train", "--model", str(model_dir), "--data", str(tmp_path / "qa.json"), "--output-dir", str(out)]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--holdout", "4", "--batch-size", "4"]
    argv += ["--columns", '{"prompt": "q", "completion": "a"}']
    argv += ["--trainer", '{"save_strategy": "no", "disable_tqdm": true}']
    assert main(argv) == 0
    held = [json.loads(line) for line in (out / "holdout.jsonl").read_text().splitlines()]
    assert len(held) == 4 and set(held[0]) == {"prompt", "completion"}  # mapped: eval reads it as is
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 2  # 8 training rows / batch 4


def test_bad_columns_mapping_is_a_config_error(tmp_path, model_dir, capsys):
    run_train(tmp_path, model_dir, "--columns", '{"question": "q"}', rc=2)
    assert "columns: 'question'" in capsys.readouterr().err


def test_resuming_checkpoints_of_other_settings_is_refused(tmp_path, model_dir, capsys):
    out = run_train(tmp_path, model_dir, "--epochs", "1", "--save-steps", "1")
    config = (out / "config.yaml").read_text()
    run_train(tmp_path, model_dir, "--epochs", "1", "--save-steps", "1", "--learning-rate", "1e-3", rc=2)
    err = capsys.readouterr().err
    assert "other settings (learning_rate)" in err and "Traceback" not in err
    assert (out / "config.yaml").read_text() == config  # the refused run overwrote nothing
    run_train(tmp_path, model_dir, "--epochs", "2", "--save-steps", "1")  # training longer resumes
    # checkpoints of a run at lambda 1 (STR's default before 0.3), resumed without reg_weight: the cause is named
    (out / "config.yaml").write_text(config.replace("reg_weight: 0.3", "reg_weight: 1.0"))
    assert "reg_weight: 0.3" in config
    run_train(tmp_path, model_dir, "--epochs", "2", "--save-steps", "1", rc=2)
    assert "str's default lambda is 0.3 now, it was 1: set reg_weight 1" in capsys.readouterr().err
    run_train(tmp_path, model_dir, "--epochs", "1", "--learning-rate", "1e-3", "--resume", "false")


def test_checkpoints_saved_before_a_new_config_key_still_resume(tmp_path, model_dir):
    import yaml

    out = run_train(tmp_path, model_dir, "--epochs", "1", "--save-steps", "1")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["anchor_weight"], saved["pact_tau"]  # as written by a version without these keys
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    run_train(tmp_path, model_dir, "--epochs", "2", "--save-steps", "1")  # resumes, no refusal
