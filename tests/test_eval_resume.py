"""An evaluation killed mid-way starts again at its first unfinished stage (pipeline.StageStore): the stages it
finished are read back, equal to measuring them again, and nothing is read back under another key."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import ASSETS

from logitguard.eval.pipeline import Inputs, conversations, measure
from logitguard.eval.safety import redact_records
from logitguard.eval.stages import evaluation_key
from logitguard.experiment import EvalSpec

SPEC = EvalSpec(max_new_tokens=6, batch_size=2, max_length=64)


class Killed(Exception):
    pass


def _killed(*args, **kwargs):
    raise Killed


def _inputs() -> Inputs:
    return Inputs(harmful={"h": ["Tell me something rude.", "Say a bad word."]}, benign=["Name a fruit."],
                  losses={"chat": conversations(str(ASSETS / "chat.jsonl"), 4)})  # fmt: skip


def test_a_killed_evaluation_resumes_at_its_first_unfinished_stage(model, tokenizer, tmp_path, monkeypatch):
    inputs = _inputs()
    clean = measure(model, tokenizer, SPEC, inputs, tmp_path / "clean", progress=False)
    key = evaluation_key("m", None, model, SPEC, inputs)
    kept = tmp_path / "run" / "stages" / "safety.json"

    with monkeypatch.context() as patch:  # killed while scoring the held-out loss, after generation
        patch.setattr("logitguard.eval.utility.conversation_losses", _killed)
        with pytest.raises(Killed):
            measure(model, tokenizer, SPEC, inputs, tmp_path / "run", progress=False, resume=key)
    assert kept.is_file()
    monkeypatch.setattr("logitguard.eval.safety.evaluate_safety", _killed)  # from here, generating fails
    # under another key (another model, adapter, dtype, spec or input) nothing is read back
    with pytest.raises(Killed):
        measure(model, tokenizer, SPEC, inputs, tmp_path / "run", progress=False, resume="another")
    # a damaged stage file is measured again, not trusted
    good = kept.read_text()
    kept.write_text(good[: len(good) // 2])
    with pytest.raises(Killed):
        measure(model, tokenizer, SPEC, inputs, tmp_path / "run", progress=False, resume=key)
    kept.write_text(good)
    # the same evaluation again: the safety stage is read back, the loss measured
    again = measure(model, tokenizer, SPEC, inputs, tmp_path / "run", progress=False, resume=key)
    assert again.resumed == ["safety"]
    assert (again.metrics, again.items, again.summary) == (clean.metrics, clean.items, clean.summary)
    assert again.records == redact_records(clean.records)  # as records.jsonl holds them
    assert set(again.seconds) == {"safety", "loss:chat"}
    assert not kept.parent.exists()  # every stage done: a later run measures afresh


def test_the_kept_safety_records_are_redacted(model, tokenizer, tmp_path, monkeypatch):
    """A stage file holds what records.jsonl holds: harmful responses cut to ten words, marked redacted."""
    import json

    long = "one two three four five six seven eight nine ten eleven twelve"
    monkeypatch.setattr(
        "logitguard.eval.safety.generate_responses", lambda m, t, prompts, *a, **k: [long] * len(prompts)
    )
    monkeypatch.setattr("logitguard.eval.utility.conversation_losses", _killed)  # stopped after generation
    inputs = Inputs(harmful={"h": ["Tell me something rude."]}, losses=_inputs().losses)
    with pytest.raises(Killed):
        measure(model, tokenizer, SPEC, inputs, tmp_path, progress=False, resume="k")
    kept = json.loads((tmp_path / "stages" / "safety.json").read_text())["part"]["records"]
    assert kept[0]["response"] == " ".join(long.split()[:10]) and kept[0]["redacted"] is True


def test_the_key_follows_what_loading_reads_the_dtype_settings_and_inputs(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    (adapter / "chat_template.jinja").write_text("{{ messages }}")
    model = SimpleNamespace(dtype=torch.float32)
    base = evaluation_key("m", str(adapter), model, SPEC, _inputs())
    # what a run's folder holds beside the model, and what train() rewrites when the runner starts a finished run
    # again: the evaluation's own folder, checkpoints, the training log, the controller's trace
    (adapter / "eval" / "stages").mkdir(parents=True)
    (adapter / "checkpoint-2").mkdir()
    (adapter / "metrics.jsonl").write_text('{"train_runtime": 1.0}\n')
    (adapter / "lambda_controller.json").write_text("{}")
    assert evaluation_key("m", str(adapter), model, SPEC, _inputs()) == base
    # the same inputs read from files elsewhere: their contents are the key, not their paths
    moved = EvalSpec(harmful="/elsewhere/harmful.txt", max_new_tokens=6, batch_size=2, max_length=64)
    assert evaluation_key("m", str(adapter), model, moved, _inputs()) == base
    changed = _inputs()
    changed.benign = ["Name a color."]
    others = [
        evaluation_key("m", str(adapter), SimpleNamespace(dtype=torch.bfloat16), SPEC, _inputs()),
        evaluation_key("m", str(adapter), model, EvalSpec(max_new_tokens=7, batch_size=2, max_length=64), _inputs()),
        evaluation_key("m", str(adapter), model, SPEC, changed),
        evaluation_key("other", str(adapter), model, SPEC, _inputs()),
    ]
    (adapter / "chat_template.jinja").write_text("{{ messages | first }}")
    others.append(evaluation_key("m", str(adapter), model, SPEC, _inputs()))
    (adapter / "adapter_model.safetensors").write_bytes(b"retrained")
    others.append(evaluation_key("m", str(adapter), model, SPEC, _inputs()))
    assert len({base, *others}) == 7


def test_a_row_killed_while_evaluating_resumes_there(model_dir, tmp_path, monkeypatch):
    """`experiment run` killed in a run's evaluation, then run again: train() starts the finished run once more
    (no steps, its log rewritten) and the evaluation reads back the stage it had finished."""
    from test_runner import _bench, _tiny_experiment

    import logitguard.eval.utility as utility

    path = _tiny_experiment(tmp_path, model_dir, [{"name": "LoRA", "train": {"reg_weight": 0}}])
    losses, calls = utility.conversation_losses, []

    def killed_in_the_runs_evaluation(*args, **kwargs):  # the aligned model's loss passes, the run's is killed
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return losses(*args, **kwargs)

    monkeypatch.setattr(utility, "conversation_losses", killed_in_the_runs_evaluation)
    from logitguard.cli import main

    argv = ["experiment", "run", str(path), "--results", str(tmp_path / "results"), "--work", str(tmp_path / "work"),
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert main(argv) == 130
    assert (tmp_path / "work" / "tiny" / "lora" / "eval" / "stages" / "safety.json").is_file()
    monkeypatch.setattr("logitguard.eval.safety.evaluate_safety", _killed)  # generating again would fail
    row = _bench(tmp_path, path)["rows"][0]
    assert row["eval_resumed_stages"] == ["safety"] and len(calls) == 3
    assert set(row["eval_stage_seconds"]) == {"safety", "loss:chat"} and row["metrics"]["refusal_rate"] is not None
    assert not (tmp_path / "work" / "tiny" / "lora" / "eval" / "stages").exists()
