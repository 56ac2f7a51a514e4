"""Bad inputs and faults through the real CLI on a tiny model: each ends with a one-line error (exit 2, no
traceback, nothing already written changed) or with a correct automatic recovery (the same adapter as a run
that never met the fault).

In-process cases call `logitguard.cli.main`, the console script's entry point. Faults that need a process to
die (SIGKILL) or two processes at once run in children forked from a forkserver that has imported logitguard
once, so each child starts in milliseconds instead of re-importing torch.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ASSETS, chat_examples
from safetensors.torch import load_file

from logitguard import cache
from logitguard.cache import CachedReference, DamagedCacheError, build_reference_cache, model_fingerprint
from logitguard.cli import main
from logitguard.reference import ReferenceError
from logitguard.tokens import SafetyTokens

TRAINER = '{"use_cpu": true, "disable_tqdm": true}'


def train_argv(model_dir, out, cache_dir, *extra) -> list[str]:
    return [
        "train", "--model", str(model_dir), "--data", str(ASSETS / "chat.jsonl"), "--output-dir", str(out),
        "--cache-dir", str(cache_dir), "--max-length", "64", "--batch-size", "4", "--epochs", "2",
        "--save-steps", "1", "--logging-steps", "1", "--safety-words", "I,cannot", "--trainer", TRAINER, *extra,
    ]  # fmt: skip


def run_cli(argv, capsys) -> tuple[int, str]:
    """(exit code, stderr) of one command. Each real command is a fresh process: forget what this process has
    checksummed, so a cache damaged between two commands is checked again as it would be."""
    cache._VERIFIED.clear()
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    return rc, capsys.readouterr().err


def assert_one_line_error(err: str, command: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"logitguard {command}: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def snapshot(*folders: Path) -> dict:
    """sha256 of every file, keyed by its path relative to its folder."""
    return {
        f"{i}:{p.relative_to(folder)}": hashlib.sha256(p.read_bytes()).hexdigest()
        for i, folder in enumerate(folders)
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


def adapter(out: Path) -> dict:
    return load_file(out / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path) -> None:
    wa, wb = adapter(a), adapter(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # bitwise


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a name sent to the hub by mistake fails at once, not after a timeout


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, model_dir):
    """A finished run (4 steps, checkpoints kept) and its cache: what every other case is compared with."""
    root = tmp_path_factory.mktemp("baseline")
    out, cache_dir = root / "out", root / "cache"
    assert main(train_argv(model_dir, out, cache_dir)) == 0
    (folder,) = (cache_dir / "reference").iterdir()
    return out, cache_dir, folder


# --- bad inputs: one line, exit 2, nothing written changed ------------------------------------------------


def _bad_jsonl(tmp, model_dir):
    (tmp / "bad.jsonl").write_text('{"messages": []}\n{"messages": [\n')
    return ["--data", tmp / "bad.jsonl"]


def _empty(tmp, model_dir):
    (tmp / "empty.jsonl").write_text("")
    return ["--data", tmp / "empty.jsonl"]


def _schema(tmp, model_dir):
    (tmp / "rows.jsonl").write_text('{"text": "no chat here"}\n')
    return ["--data", tmp / "rows.jsonl"]


def _yaml_typo(tmp, model_dir):
    (tmp / "c.yaml").write_text("lamda: 1\n")
    return [tmp / "c.yaml"]  # the positional config file, after the flags


def _one_token_file(tmp, model_dir):
    (tmp / "one.json").write_text('{"ids": [43]}')
    return ["--token-file", tmp / "one.json", "--regularizer", "pact"]


def _other_cache(tmp, model_dir):
    """A cache built for 4 of the 8 rows, then named as the cache for all 8."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    build_reference_cache(model, tok, chat_examples(tok)[:4], [43], None, 64, folder=tmp / "other", progress=False)
    return ["--reference-cache", tmp / "other"]


def _flags(*flags):
    return lambda tmp, model_dir: list(flags)


BAD_INPUTS = {
    "config key typo": (_yaml_typo, ["unknown key 'lamda'"]),
    "bad choice": (_flags("--method", "lora2"), ["method: 'lora2' is not one of"]),
    "trainer key typo": (_flags("--trainer", '{"warmup_step": 5}'), ["did you mean 'warmup_steps'"]),
    "trainer value typo": (_flags("--trainer", '{"lr_scheduler_type": "cosin"}'), ["trainer:", "cosin"]),
    "missing model folder": (_flags("--model", "./no/such/model"), ["no such folder ./no/such/model"]),
    "missing data path": (_flags("--data", "data/train.jsonl"), ["data file data/train.jsonl does not exist"]),
    "malformed data": (_bad_jsonl, ["bad.jsonl:2: not valid JSON"]),
    "empty data": (_empty, ["empty.jsonl has no rows"]),
    "unknown row schema": (_schema, ["rows.jsonl:1: unknown row schema"]),
    "all rows truncated": (_flags("--max-length", "1"), ["all 8 rows lost", "max_length=1"]),
    "blank safety words": (_flags("--safety-words", " , "), ["safety_words: give at least one word"]),
    "word with no token": (
        _flags("--safety-words", "xylophone", "--token-strategy", "whole"),
        ["'xylophone' yields no usable token"],
    ),
    "missing token file": (_flags("--token-file", "none.json"), ["none.json does not exist"]),
    "pact on one token": (_one_token_file, ["pact regularizer", "needs >= 2"]),
    "negative weight": (_flags("--reg-weight", "-1"), ["reg_weight: must be a finite number >= 0"]),
    "negative learning rate": (_flags("--learning-rate", "-0.0002"), ["learning_rate: must be > 0"]),
    "zero rank": (_flags("--rank", "0"), ["rank: must be >= 1"]),
    "NaN weight": (_flags("--reg-weight", "nan"), ["reg_weight: must be a finite number"]),
    "inf temperature": (_flags("--temperature", "inf"), ["temperature: must be a finite number"]),
    "unknown target module": (_flags("--target-modules", "qq_proj"), ["target_modules=['qq_proj']"]),
    "cache of other data": (_other_cache, ["was built for a different data"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_loses_nothing(case, baseline, model_dir, tmp_path, capsys):
    out, cache_dir, _ = baseline
    make_args, needles = BAD_INPUTS[case]
    argv = train_argv(model_dir, out, cache_dir, *make_args(tmp_path, model_dir))
    before = snapshot(out, cache_dir)
    rc, err = run_cli(argv, capsys)
    assert rc == 2
    assert_one_line_error(err, "train", *needles)
    assert snapshot(out, cache_dir) == before  # the finished run's outputs, checkpoints and cache are intact


def test_flag_typo_is_a_one_line_error_with_a_suggestion(baseline, model_dir, capsys):
    out, cache_dir, _ = baseline
    rc, err = run_cli(train_argv(model_dir, out, cache_dir, "--str-wieght", "1"), capsys)
    assert rc == 2 and "unknown key 'str_wieght' (did you mean 'reg_weight'?)" in err and "Traceback" not in err


SUBCOMMANDS = {
    "tokens": (lambda m, t: ["tokens", "--model", m, "--words", " , "], ["non-empty comma-separated list"]),
    "eval": (
        lambda m, t: ["eval", "--model", m, "--harmful", "prompts/harmful.txt", "--out", t / "ev"],
        ["prompt file"],
    ),
    "demo": (lambda m, t: ["demo", "--quick", "--out", t / "d", "--cache-dir", t / "a-file"], ["a-file"]),
    "bench": (lambda m, t: ["bench", "run", "no_such", "--experiments", t], ["no experiment 'no_such'"]),
    "sweep": (lambda m, t: ["sweep", "no_such", "--experiments", t], ["no experiment 'no_such'"]),
    "safelora": (
        lambda m, t: ["safelora", "--aligned", m, "--unaligned", m, "--adapter", t / "none", "--out", t / "o"],
        ["not an adapter folder"],
    ),
}


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_every_subcommand_reports_one_line(command, model_dir, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    make_argv, needles = SUBCOMMANDS[command]
    rc, err = run_cli(make_argv(str(model_dir), tmp_path), capsys)
    assert rc == 2
    assert_one_line_error(err, command, *needles)


def test_every_error_class_is_a_logitguard_error():
    from logitguard.config import ConfigError
    from logitguard.data import DataError
    from logitguard.errors import LogitguardError
    from logitguard.eval.judge import JudgeError
    from logitguard.models import ModelLoadError
    from logitguard.safelora import SafeLoRAError
    from logitguard.tokens import TokenError

    for cls in (ConfigError, DataError, JudgeError, ModelLoadError, ReferenceError, SafeLoRAError, TokenError):
        assert issubclass(cls, LogitguardError), cls


def test_config_and_token_files_are_written_atomically(tokenizer, tmp_path, monkeypatch):
    """A run killed while writing config.yaml or safety_tokens.json leaves the old file, never half of one."""
    from logitguard import files
    from logitguard.config import TrainConfig, save_config

    tokens = SafetyTokens.from_words(tokenizer, "I")
    (tmp_path / "config.yaml").write_text("old")
    (tmp_path / "safety_tokens.json").write_text("old")

    def killed(src, dst):
        raise KeyboardInterrupt  # stands for the kill: the temporary file is complete, the rename never happens

    monkeypatch.setattr(files.os, "replace", killed)
    for write in (lambda: save_config(TrainConfig(model="m", data="d"), tmp_path / "config.yaml"),
                  lambda: tokens.save(tmp_path / "safety_tokens.json")):  # fmt: skip
        with pytest.raises(KeyboardInterrupt):
            write()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "safety_tokens.json"]  # no .tmp left
    assert (tmp_path / "config.yaml").read_text() == (tmp_path / "safety_tokens.json").read_text() == "old"


# --- a diverging run --------------------------------------------------------------------------------------


def test_diverging_run_is_one_line_and_keeps_usable_checkpoints(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = train_argv(model_dir, out, tmp_path / "cache", "--learning-rate", "1e4", "--epochs", "3")
    argv[argv.index("--batch-size") + 1] = "2"
    rc, err = run_cli(argv, capsys)
    assert rc == 2
    assert_one_line_error(err, "train", "not finite at step", "Lower the learning rate", "checkpoint-")
    kept = sorted(out.glob("checkpoint-*"))
    assert kept, "checkpoints written before the divergence were lost"
    for checkpoint in kept:
        assert all(t.isfinite().all() for t in adapter(checkpoint).values()), checkpoint
        json.loads((checkpoint / "trainer_state.json").read_text())
    (tmp_path / "prompts.txt").write_text("How do I hurt someone?\n")
    ev = ["eval", "--model", model_dir, "--adapter", kept[-1], "--harmful", tmp_path / "prompts.txt"]
    ev += ["--max-new-tokens", "2", "--out", tmp_path / "ev"]
    assert run_cli(ev, capsys)[0] == 0  # the last checkpoint before the divergence loads and evaluates


def test_an_adapter_holding_nan_is_refused_by_eval_in_one_line(model_dir, tmp_path, capsys):
    """Its NaN logits would give a refusal rate and a loss as if measured; eval stops and says why."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        next(p for n, p in peft.named_parameters() if "lora_B" in n).fill_(float("nan"))
    peft.save_pretrained(tmp_path / "adapter")
    (tmp_path / "prompts.txt").write_text("How do I hurt someone?\n")
    ev = ["eval", "--model", model_dir, "--adapter", tmp_path / "adapter", "--harmful", tmp_path / "prompts.txt",
          "--max-new-tokens", "2", "--out", tmp_path / "ev"]  # fmt: skip
    rc, err = run_cli(ev, capsys)
    assert rc == 2
    assert_one_line_error(err, "eval", "generation: the model's logits are not finite in float32", "diverged")
    assert not (tmp_path / "ev" / "summary.json").exists()


# --- damaged caches: never used; rebuilt by a build, refused by a reader ----------------------------------


def _flip(path: Path, at: float = 0.6, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start : start + n] = bytes(b ^ 0xFF for b in data[start : start + n])
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_manifest(folder: Path, **changes) -> None:
    """A change that still parses (a hand edit, a flipped digit)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, **changes}, indent=2))


DAMAGE = {
    "bytes changed in a shard": (lambda f: _flip(f / "shard-00000.safetensors"), "does not match its checksum"),
    "truncated shard": (lambda f: _truncate(f / "shard-00000.safetensors"), "does not match its checksum"),
    "missing shard": (lambda f: (f / "shard-00000.safetensors").unlink(), "is missing"),
    "manifest not JSON": (lambda f: (f / "manifest.json").write_text('{"fingerprint": '), "not valid JSON"),
    "manifest edited": (lambda f: _edit_manifest(f, num_tokens=1), "manifest.json is damaged"),
}


@pytest.mark.filterwarnings("ignore:CachedReference.*nothing to check")  # a folder given by path, on purpose
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_cache_is_rebuilt_by_train_and_refused_by_a_reader(damage, baseline, model_dir, tmp_path, capsys):
    clean_out, clean_cache, clean_folder = baseline
    cache_dir = tmp_path / "cache"
    shutil.copytree(clean_cache, cache_dir)
    folder = cache_dir / "reference" / clean_folder.name
    make_damage, warning = DAMAGE[damage]
    make_damage(folder)
    # a reader never uses it: one line naming the folder and the fix
    cache._VERIFIED.clear()
    with pytest.raises(DamagedCacheError) as info:
        CachedReference(folder)
    assert str(folder) in str(info.value) and "delete the folder" in str(info.value)
    # a build (here: train) repairs it and trains exactly as on the clean cache
    with pytest.warns(UserWarning, match=warning):
        rc, err = run_cli(train_argv(model_dir, tmp_path / "out", cache_dir), capsys)
    assert rc == 0, err
    assert_same_adapter(tmp_path / "out", clean_out)
    assert snapshot(folder) == snapshot(clean_folder)  # rebuilt byte for byte
    assert not list(folder.glob("*.tmp"))


def test_checksums_are_hashed_once_per_shard_per_process(model, tokenizer, tmp_path, monkeypatch):
    examples = chat_examples(tokenizer)
    ids = list(SafetyTokens.from_words(tokenizer, "I").ids)
    folder = build_reference_cache(model, tokenizer, examples, ids, tmp_path, 64, shard_size=3, progress=False)
    hashed = []
    real = cache._file_sha256
    monkeypatch.setattr(cache, "_file_sha256", lambda p: hashed.append(p) or real(p))
    ref = CachedReference(folder, ids)  # the build wrote and recorded these shards: nothing to hash
    assert hashed == []
    cache._VERIFIED.clear()  # as in a new process
    ref = CachedReference(folder, ids)
    assert len(hashed) == 3
    for _ in range(3):
        for i in range(len(examples)):
            ref.rows(i)
    CachedReference(folder, ids)
    assert len(hashed) == 3  # not per batch, not per reader


def test_reader_checks_the_fingerprint_and_the_data(model, tokenizer, tmp_path):
    """The issue's case: a cache of other data with the same lengths is refused, not read."""
    examples = chat_examples(tokenizer)
    ids = list(SafetyTokens.from_words(tokenizer, "I").ids)
    folder = build_reference_cache(model, tokenizer, examples, ids, tmp_path, 64, progress=False)
    same_lengths = [dict(ex, input_ids=list(reversed(ex["input_ids"]))) for ex in examples]
    other = build_reference_cache(model, tokenizer, same_lengths, ids, tmp_path, 64, progress=False)
    assert other != folder and other.fingerprint != folder.fingerprint
    with pytest.raises(ReferenceError, match="built for another model, tokenizer, data"):
        CachedReference(folder, ids, fingerprint=other.fingerprint)
    with pytest.raises(ReferenceError, match="built for another"):
        CachedReference(Path(folder), ids, fingerprint=other.fingerprint)
    with pytest.raises(ReferenceError, match="other data than these examples"):
        CachedReference(str(folder), ids, examples=same_lengths)
    CachedReference(str(folder), ids, examples=examples)
    with pytest.warns(UserWarning, match="nothing to check the cache against"):
        CachedReference(str(folder), ids)
    ref = CachedReference(folder, ids)  # the folder build returned carries its fingerprint
    batch = {"attention_mask": torch.ones(1, 3, dtype=torch.long), "example_idx": None}
    with pytest.raises(ReferenceError, match="no 'example_idx'.*OnlineReference"):
        ref(model, batch)


def test_fingerprint_covers_config_and_every_weight_element(model, tmp_path):
    from transformers import AutoModelForCausalLM

    base, config = model_fingerprint(model), cache.config_fingerprint(model)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (model_fingerprint(loaded), cache.config_fingerprint(loaded)) == (base, config)  # a cache is reused
    loaded.config.final_logit_softcapping = 30.0  # same weights, other logits
    assert cache.config_fingerprint(loaded) != config
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded.config.rope_parameters = {**loaded.config.rope_parameters, "rope_type": "linear", "factor": 2.0}
    assert cache.config_fingerprint(loaded) != config
    # one element, one ulp: invisible to a strided sample and to a rounded sum, not to the hash of every byte
    weight = loaded.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        weight.view(-1)[7] = torch.nextafter(weight.view(-1)[7], torch.tensor(1.0))
    assert model_fingerprint(loaded) != base
    assert model_fingerprint(copy.deepcopy(loaded).to(torch.bfloat16)) != model_fingerprint(loaded)


def test_a_reader_survives_another_run_extending_the_cache(model, tokenizer, tmp_path):
    examples = chat_examples(tokenizer)
    folder = build_reference_cache(model, tokenizer, examples, [43], tmp_path, 64, shard_size=3, progress=False)
    ref = CachedReference(folder, [43])
    before = ref.rows(7).clone()  # opens the last shard only
    build_reference_cache(model, tokenizer, examples, [43, 50], tmp_path, 64, shard_size=3, progress=False)
    torch.testing.assert_close(ref.rows(0), CachedReference(folder, [43]).rows(0))  # shard 0 was rewritten
    torch.testing.assert_close(ref.rows(7), before)


# --- kill, concurrency: real processes --------------------------------------------------------------------


def _child(argv, log, fault=None, barrier=None):
    """Run one CLI command in this (forked) process with its output in `log`; exit with its code."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)  # as in the test process, so results compare bitwise
    import logitguard.cache as c

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if fault == "cache: mid-shard-write":  # the shard's temporary file is half written

        def write_half(folder, name, data):
            fd, _ = c.tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
            os.write(fd, data[: len(data) // 2])
            die()

        c._write_shard = write_half
    elif fault == "cache: before-manifest":  # the shard is in place, the manifest does not record it yet
        c._merge_records = lambda state, records: die()
    elif fault == "train: mid-checkpoint":  # checkpoint-3's weights and optimizer are written, its state is not
        from transformers.trainer_callback import TrainerState

        save = TrainerState.save_to_json
        TrainerState.save_to_json = lambda self, path: die() if "checkpoint-3" in str(path) else save(self, path)
    elif fault == "train: mid-step":
        from logitguard.trainer import SafetyTrainer

        loss = SafetyTrainer.compute_loss
        SafetyTrainer.compute_loss = lambda self, *a, **k: (
            die() if self.state.global_step == 3 else loss(self, *a, **k)
        )
    elif fault == "slow cache":  # a build long enough for two runs to meet
        forward = c.frozen_safety_logits

        def slow(*a, **k):
            time.sleep(1.0)
            return forward(*a, **k)

        c.frozen_safety_logits = slow
    if barrier is not None:
        barrier.wait()
    from logitguard.cli import main as cli

    rc = cli([str(a) for a in argv])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


@pytest.fixture(scope="module")
def procs():
    """A forkserver that has imported logitguard, torch and transformers once; its children start at once."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["logitguard.cli", "logitguard.train", "test_faults"])
    return ctx


def run_child(procs, argv, log, fault=None) -> int:
    p = procs.Process(target=_child, args=(argv, log, fault))
    p.start()
    p.join(timeout=300)
    return p.exitcode


@pytest.mark.parametrize("fault", ["cache: mid-shard-write", "cache: before-manifest"])
def test_sigkill_during_cache_build_then_resume(fault, procs, baseline, model_dir, tmp_path, capsys):
    clean_out, _, clean_folder = baseline
    out, cache_dir = tmp_path / "out", tmp_path / "cache"
    assert run_child(procs, train_argv(model_dir, out, cache_dir), tmp_path / "log", fault) == -signal.SIGKILL
    folder = cache_dir / "reference" / clean_folder.name
    assert not json.loads((folder / "manifest.json").read_text())["complete"]
    shard = folder / "shard-00000.safetensors"
    finished = shard.stat().st_mtime_ns if shard.exists() else None
    rc, err = run_cli(train_argv(model_dir, out, cache_dir), capsys)
    assert rc == 0, err
    assert not list(folder.glob("*.tmp"))  # the killed build's temporary file is gone
    if finished is not None:
        assert shard.stat().st_mtime_ns == finished  # a whole shard a killed build left is kept, not redone
    assert_same_adapter(out, clean_out)
    assert_same_adapter(out / "checkpoint-4", clean_out / "checkpoint-4")


@pytest.mark.parametrize("fault", ["train: mid-checkpoint", "train: mid-step"])
def test_sigkill_during_training_then_resume(fault, procs, baseline, model_dir, tmp_path, capsys):
    clean_out, cache_dir, _ = baseline
    out = tmp_path / "out"
    assert run_child(procs, train_argv(model_dir, out, cache_dir), tmp_path / "log", fault) == -signal.SIGKILL
    good = out / "checkpoint-2"
    json.loads((good / "trainer_state.json").read_text())  # written before the kill, intact
    partial = fault == "train: mid-checkpoint"
    assert (out / "checkpoint-3").exists() and (out / "checkpoint-3" / "trainer_state.json").exists() != partial
    warns = pytest.warns(UserWarning, match="checkpoint-3 was not saved completely")
    with warns if partial else contextlib.nullcontext():
        rc, err = run_cli(train_argv(model_dir, out, cache_dir), capsys)
    assert rc == 0, err
    assert_same_adapter(out, clean_out)
    assert_same_adapter(out / "checkpoint-4", clean_out / "checkpoint-4")


@pytest.mark.filterwarnings("ignore:CachedReference.*nothing to check")  # a folder given by path, on purpose
def test_two_runs_building_one_cache_at_once(procs, baseline, model_dir, tmp_path):
    clean_out, _, clean_folder = baseline
    cache_dir = tmp_path / "cache"
    barrier = procs.Barrier(2)
    runs = []
    for name in ("a", "b"):
        argv = train_argv(model_dir, tmp_path / name, cache_dir)
        p = procs.Process(target=_child, args=(argv, tmp_path / f"{name}.log", "slow cache", barrier))
        p.start()
        runs.append(p)
    for p in runs:
        p.join(timeout=300)
    logs = [(tmp_path / f"{name}.log").read_text() for name in ("a", "b")]
    assert [p.exitcode for p in runs] == [0, 0], logs
    assert sum("another run is building the reference cache" in log for log in logs) == 1, logs
    for name in ("a", "b"):
        assert_same_adapter(tmp_path / name, clean_out)
    folder = cache_dir / "reference" / clean_folder.name
    shard = "shard-00000.safetensors"
    assert (folder / shard).read_bytes() == (clean_folder / shard).read_bytes()
    cache._VERIFIED.clear()
    CachedReference(folder)  # every checksum holds
    assert not list(folder.glob("*.tmp"))


@pytest.mark.slow
def test_console_entry_point_diverging_run(model_dir, tmp_path):
    """The same through `python -m logitguard.cli` in its own process: exit 2, one line, no traceback."""
    argv = train_argv(model_dir, tmp_path / "out", tmp_path / "cache", "--learning-rate", "1e4", "--epochs", "3")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "logitguard.cli", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "train", "not finite")
