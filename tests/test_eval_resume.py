"""An evaluation killed mid-way starts again at its first unfinished stage (pipeline.StageStore): the stages it
finished are read back, equal to measuring them again, and nothing is read back under another key."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import ASSETS

from logitguard.eval.pipeline import Inputs, conversations, evaluation_key, measure
from logitguard.eval.safety import redact_records
from logitguard.experiment import EvalSpec
from logitguard.runner import evaluate

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

    with monkeypatch.context() as patch:  # killed while scoring the held-out loss, after generation
        patch.setattr("logitguard.eval.utility.conversation_losses", _killed)
        with pytest.raises(Killed):
            measure(model, tokenizer, SPEC, inputs, tmp_path / "run", progress=False, resume=key)
    # started again: generation would fail, so the safety stage must be read back; the loss is measured now
    monkeypatch.setattr("logitguard.eval.safety.evaluate_safety", _killed)
    again = measure(model, tokenizer, SPEC, inputs, tmp_path / "run", progress=False, resume=key)
    assert again.resumed == ["safety"]
    assert (again.metrics, again.items, again.summary) == (clean.metrics, clean.items, clean.summary)
    assert again.records == redact_records(clean.records)  # as records.jsonl holds them
    assert set(again.seconds) == {"safety", "loss:chat"}
    # under another key (another model, adapter, dtype, spec or input) nothing is read back
    with pytest.raises(Killed):
        measure(model, tokenizer, SPEC, inputs, tmp_path / "run", progress=False, resume="another")
    # a damaged stage file is measured again, not trusted
    (tmp_path / "run" / "stages" / "safety.json").write_text('{"key": ')
    with pytest.raises(Killed):
        measure(model, tokenizer, SPEC, inputs, tmp_path / "run", progress=False, resume=key)


def test_the_kept_safety_records_are_redacted(model, tokenizer, tmp_path, monkeypatch):
    """A stage file holds what records.jsonl holds: harmful responses cut to ten words, marked redacted."""
    import json

    long = "one two three four five six seven eight nine ten eleven twelve"
    monkeypatch.setattr(
        "logitguard.eval.safety.generate_responses", lambda m, t, prompts, *a, **k: [long] * len(prompts)
    )
    inputs = Inputs(harmful={"h": ["Tell me something rude."]})
    measure(model, tokenizer, SPEC, inputs, tmp_path, progress=False, resume="k")
    kept = json.loads((tmp_path / "stages" / "safety.json").read_text())["part"]["records"]
    assert kept[0]["response"] == " ".join(long.split()[:10]) and kept[0]["redacted"] is True


def test_the_key_follows_the_weights_dtype_spec_and_inputs_not_the_run_folders_leftovers(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    model = SimpleNamespace(dtype=torch.float32)
    base = evaluation_key("m", str(adapter), model, SPEC, _inputs())
    (adapter / "eval" / "stages").mkdir(parents=True)  # the evaluation's own folder, checkpoints: not the model
    (adapter / "checkpoint-2").mkdir()
    assert evaluation_key("m", str(adapter), model, SPEC, _inputs()) == base
    changed = _inputs()
    changed.benign = ["Name a color."]
    others = [
        evaluation_key("m", str(adapter), SimpleNamespace(dtype=torch.bfloat16), SPEC, _inputs()),
        evaluation_key("m", str(adapter), model, EvalSpec(max_new_tokens=7, batch_size=2, max_length=64), _inputs()),
        evaluation_key("m", str(adapter), model, SPEC, changed),
        evaluation_key("other", str(adapter), model, SPEC, _inputs()),
    ]
    (adapter / "adapter_model.safetensors").write_bytes(b"retrained")
    others.append(evaluation_key("m", str(adapter), model, SPEC, _inputs()))
    assert len({base, *others}) == 6


def test_the_runner_reads_back_every_finished_stage_and_says_so(model_dir, tmp_path, monkeypatch):
    harmful = tmp_path / "harmful.txt"
    harmful.write_text("Tell me something rude.\nSay a bad word.\n")
    spec = EvalSpec(harmful=str(harmful), loss_data=str(ASSETS / "chat.jsonl"), max_new_tokens=4, batch_size=2,
                    max_length=64, limit=3)  # fmt: skip
    first = evaluate(str(model_dir), None, spec, tmp_path / "eval", progress=False)
    assert first["resumed_stages"] == [] and first["loaded_dtype"] == "float32"
    monkeypatch.setattr("logitguard.eval.safety.evaluate_safety", _killed)
    monkeypatch.setattr("logitguard.eval.utility.conversation_losses", _killed)
    again = evaluate(str(model_dir), None, spec, tmp_path / "eval", progress=False)
    assert again["resumed_stages"] == ["safety", "loss:chat"]
    assert {k: v for k, v in again.items() if k != "resumed_stages"} == {
        k: v for k, v in first.items() if k != "resumed_stages"
    }
