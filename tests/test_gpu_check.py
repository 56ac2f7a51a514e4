"""`python -m logitguard.gpu_check` on the CPU: nothing runs without CUDA; the runner keeps going past failed,
hung and skipped steps and writes what each did; the shipped steps' commands are valid; the train and cache steps
run end to end on a tiny model of the same making."""

import json
import os
import subprocess
import sys

import pytest
import torch

from logitguard import gpu_check
from logitguard.cli import _split_trainer_flags, build_parser, trainer_flags
from logitguard.gpu_check import MARK, Context, Step, run_all

PY = sys.executable
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            vocab_size=1024, tie_word_embeddings=True)  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the check would run")
def test_without_cuda_it_prints_one_line_and_runs_nothing(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run([PY, "-m", "logitguard.gpu_check", "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines() == ["gpu_check: no CUDA device visible; nothing was run"]
    assert not out.exists() and not list(tmp_path.iterdir())


def py(code: str, *args: str):
    return lambda ctx: [PY, "-c", code, *args]


def test_the_runner_goes_on_after_failed_hung_and_skipped_steps(tmp_path):
    numbers = f"import json, sys; print({MARK!r} + json.dumps({{'arg': sys.argv[1]}}))"
    steps = [
        Step("ok", py(numbers, "{work}/x"), 30),
        Step("fails", py("import sys; print('boom'); sys.exit(3)"), 30),
        Step("needs_fails", py("pass"), 30, after=("fails",)),
        Step("hangs", py("import time; print('started', flush=True); time.sleep(60)"), 3),
        Step(
            "capped",
            py("import time; print('.. [ 40%]', flush=True); time.sleep(60)"),
            3,
            gpu_check._pytest_numbers,
            capped_ok=True,
        ),  # fmt: skip
        Step("two_gpus", py("pass"), 30, gpus=2),
        Step("needs_a_file", py("pass"), 30, files=("no/such/file",)),
        Step("last", py("print('done')"), 30),
    ]
    ctx = Context(root=tmp_path, work=tmp_path / "work", gpus=1)
    out = tmp_path / "results" / "gpu_check.json"
    report = run_all(steps, ctx, out, budget=120)
    assert json.loads(out.read_text()) == report
    rows = report["steps"]
    assert {name: row["outcome"] for name, row in rows.items()} == {
        "ok": "ok", "fails": "failed", "needs_fails": "skipped", "hangs": "failed", "capped": "ok",
        "two_gpus": "skipped", "needs_a_file": "skipped", "last": "ok",
    }  # fmt: skip
    assert rows["ok"]["numbers"] == {"arg": f"{ctx.work}/x"}
    assert "boom" in rows["fails"]["error_tail"] and "needs fails" in rows["needs_fails"]["why"]
    assert rows["hangs"]["timed_out_after"] == 3 and rows["hangs"]["error_tail"].startswith("timed out after 3 s")
    assert "started" in rows["hangs"]["error_tail"] and rows["hangs"]["seconds"] >= 3
    assert rows["capped"]["numbers"] == {"progress_percent": 40}
    assert "needs 2 GPUs, 1 visible" in rows["two_gpus"]["why"] and "no/such/file" in rows["needs_a_file"]["why"]
    assert report["summary"] == {"ok": 3, "failed": 2, "skipped": 3}
    assert {"torch", "transformers", "peft", "accelerate", "trl", "bitsandbytes", "gpus"} <= set(report["versions"])
    late = run_all([Step("late", py("pass"), 30)], ctx, tmp_path / "late.json", budget=5)
    assert late["steps"]["late"]["outcome"] == "skipped" and "budget" in late["steps"]["late"]["why"]


def _flags(argv: list[str]) -> list[str]:
    return [a.split("=")[0] for a in argv if a.startswith("--")]


def test_the_shipped_steps_are_valid_commands(tmp_path):
    ctx = Context(root=gpu_check.ROOT, work=tmp_path, gpus=8)
    steps = gpu_check.all_steps()
    assert len({s.name for s in steps}) == len(steps)
    names = {s.name for s in steps}
    helps = {}
    for step in steps:
        argv = step.command(ctx)
        assert all(isinstance(a, str) for a in argv), step.name
        assert all((ctx.root / f).exists() for f in step.files), step.name
        assert set(step.after) <= names, step.name
        if "logitguard.cli" in argv or "cli" in argv:  # logitguard train's own flags, and Trainer flags
            args = (
                argv[argv.index("logitguard.cli") + 1 :] if "logitguard.cli" in argv else argv[argv.index("--") + 1 :]
            )
            parsed, extra = _split_trainer_flags(build_parser(), args)
            assert build_parser().parse_args(parsed).command == "train", step.name
            trainer_flags(extra)  # every extra flag is a TrainingArguments field
        scripts = [a for a in argv if a.startswith("bench/")]
        for script in scripts:
            if script not in helps:
                helps[script] = subprocess.run([PY, script, "--help"], cwd=ctx.root, capture_output=True, text=True,
                                               timeout=120).stdout  # fmt: skip
            assert all(flag in helps[script] for flag in _flags(argv)), (step.name, helps[script])
    shipped = {"step_time_gpu", "memory_cuda", "eval_speed_cuda", "ddp", "fsdp2", "pytest_gpu_path", "pytest_rest"}
    assert shipped <= names


def test_the_train_and_cache_steps_run_on_a_tiny_model(tmp_path, capsys):
    """The 1B steps' making and commands, on a model of the same making at a tiny shape, on the CPU."""
    made = gpu_check.child_model(tmp_path, TINY, "cpu")
    assert made["parameters"] > 0 and (tmp_path / "model_1b" / "config.json").is_file()
    ctx = Context(root=gpu_check.ROOT, work=tmp_path, gpus=1)
    argv = gpu_check.train_flags(ctx, "run", 2) + [a.replace("{work}", str(tmp_path)) for a in gpu_check.MONITOR]
    argv += ["--gradient-checkpointing", "true"]
    capsys.readouterr()
    assert gpu_check.child_cli(argv) == 0
    result = gpu_check._train_result(ctx, capsys.readouterr().out)
    assert result["global_step"] == 2 and result["train_seconds"] > 0
    assert [c["step"] for c in result["monitor_checks"]] == [0]  # before training; every 5 steps after
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    cache = gpu_check.child_cache(tmp_path, "cpu")
    assert cache["tokens"] > 10_000 and cache["tokens_per_second"] > 0 and cache["fingerprint_seconds"] >= 0


def test_failed_tests_are_named_from_verbose_lines_in_one_process_and_under_xdist():
    output = (
        "tests/test_a.py::test_one PASSED                  [ 10%]\n"
        "tests/test_a.py::test_two FAILED                  [ 20%]\n"
        "[gw3] [ 30%] FAILED tests/test_b.py::test_x[1-2] \n"
        "[gw1] [ 40%] ERROR tests/test_c.py::test_y \n"
        "[gw0] [ 50%] PASSED tests/test_c.py::test_z \n"
        "FAILED tests/test_a.py::test_two - AssertionError: boom\n"
    )
    assert gpu_check.failed_test_ids(output) == [
        "tests/test_a.py::test_two", "tests/test_b.py::test_x[1-2]", "tests/test_c.py::test_y",
    ]  # fmt: skip


def test_the_suites_failures_run_again_alone_and_the_report_names_no_folder(tmp_path):
    """A capped suite step still names what failed; the last step runs exactly those again in one process (no
    xdist), and is skipped when nothing failed. Recorded commands carry {work} and `python`, not this machine's
    folders."""
    lines = "print('tests/test_a.py::test_two FAILED [ 20%]', flush=True); import time; time.sleep(60)"
    suite = Step("suite", py(lines, "{work}/x"), 3, gpu_check._pytest_numbers, capped_ok=True)
    again = Step("again", gpu_check._failed_again, 60, gpu_check._pytest_numbers)
    ctx = Context(root=tmp_path, work=tmp_path / "work", gpus=1)
    report = run_all([suite, again], ctx, tmp_path / "report.json", budget=120)
    rows = report["steps"]
    assert rows["suite"]["outcome"] == "ok"
    assert rows["suite"]["numbers"]["failed_tests"] == ["tests/test_a.py::test_two"]
    assert rows["suite"]["command"] == ["python", "-c", lines, "{work}/x"]
    assert rows["again"]["command"] == ["python", *gpu_check.PYTEST, "tests/test_a.py::test_two"]
    assert str(tmp_path) not in (tmp_path / "report.json").read_text()
    clean = run_all([again], Context(root=tmp_path, work=tmp_path / "w2", gpus=1), tmp_path / "r2.json", budget=60)
    assert clean["steps"]["again"] == {"outcome": "skipped", "seconds": 0.0, "numbers": {}, "why": "nothing to run"}
