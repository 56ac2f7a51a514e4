"""The step-time benchmark runs end to end and writes the documented JSON keys (tiny size; no timing asserts)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench" / "step_time.py"


@pytest.mark.slow
def test_step_time_bench_tiny(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--size", "tiny", "--rounds", "2", "--steps", "2", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    for key in ("ratio", "memory_ratio"):
        variants = {
            "lora",
            "paper",
            "online",
            "cached",
            "pact_online",
            "pact_cached",
            "anchored",
            "constrained_sft",
            "kl",
        }
        assert set(result[key]) == variants and result[key]["lora"] == 1.0
    assert result["cache_build_epoch_fraction"] > 0 and result["pact_cache_build_epoch_fraction"] > 0
    assert "| cached |" in proc.stdout and "| pact_cached |" in proc.stdout and "| kl |" in proc.stdout
    assert result["extras_cache_build_epoch_fraction"] > 0 and result["kl_topk"] == 32


def test_decode_batch_bench_runs_on_a_tiny_model(tmp_path, tokenizer):
    # the script's shape on a tiny model and the fake assets: both layouts decode the same greedy tokens
    from conftest import tiny_llama
    from fake_assets import write_fake_assets

    folder = tmp_path / "model"
    tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "decode.json"
    bench = Path(__file__).parents[1] / "bench" / "decode_batch.py"
    cmd = [sys.executable, str(bench), "--model", str(folder), "--assets", str(write_fake_assets(tmp_path / "a")),
           "--batches", "1,3", "--steps", "2", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [d["rows"] for d in result["decode"]] == [1, 3, 1, 3] and set(result["tokens_equal"]) == {"1", "3"}
    assert all(d["step_ms"] > 0 for d in result["decode"]) and len(result["linear"]) == 2


@pytest.mark.slow
def test_eval_speed_bench_times_three_paths_and_checks_them(tmp_path):
    # the synthetic sets on a small random model: every stage on every path, and the float32 fast path agrees
    out = tmp_path / "speed.json"
    bench = Path(__file__).parents[1] / "bench" / "eval_speed.py"
    cmd = [sys.executable, str(bench), "--threads", "1", "--dtype", "bfloat16", "--batch-size", "3", "--json",
           str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["speedup"]) == {"fast", "fast_bfloat16"}
    assert result["spec"]["fast_batch_size"] == 3  # the fast paths decode 3 rows at once, the reference 8
    stages = result["stages"]
    assert set(stages) == {"generation", "humaneval", "multiple_choice", "loss"}
    assert stages["generation"]["agreement"]["fast"]["differ"] == 0
    assert stages["multiple_choice"]["agreement"]["fast"]["choices_differ"] == 0
    assert stages["loss"]["agreement"]["fast"]["abs_diff"] < 1e-4
    paths = {"reference", "fast", "fast_bfloat16"}
    assert all(set(s["seconds"]) == set(s["roofline_s"]) == paths for s in stages.values())


@pytest.mark.slow
def test_eval_speed_bench_can_leave_the_float32_fast_path_out(tmp_path):
    # a full-size run times the reference against the bf16 path alone: every stage still reports both
    out = tmp_path / "speed.json"
    bench = Path(__file__).parents[1] / "bench" / "eval_speed.py"
    cmd = [sys.executable, str(bench), "--threads", "1", "--dtype", "bfloat16", "--no-float32", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["speedup"]) == {"fast_bfloat16"}
    stages = result["stages"]
    assert all(set(s["seconds"]) == {"reference", "fast_bfloat16"} for s in stages.values())
    assert stages["loss"]["tokens"]["fast_bfloat16"] > 0


def test_eval_speed_bench_refuses_no_float32_without_a_dtype():
    bench = Path(__file__).parents[1] / "bench" / "eval_speed.py"
    proc = subprocess.run([sys.executable, str(bench), "--no-float32"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--no-float32 needs --dtype" in proc.stderr


def test_bf16_drift_bench_splits_the_drift_between_body_and_head(tmp_path):
    # the synthetic model: float32 agrees with itself by construction; the two bfloat16 paths each report a
    # difference with its standard error, and the float32 head changes the numbers (it is really swapped in)
    out = tmp_path / "drift.json"
    bench = Path(__file__).parents[1] / "bench" / "bf16_drift.py"
    proc = subprocess.run([sys.executable, str(bench), "--threads", "1", "--json", str(out)], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    paths = result["paths"]
    assert set(paths) == {"float32", "bfloat16", "bfloat16_body_float32_head"} and result["tokens"] > 0
    half, mixed = paths["bfloat16"], paths["bfloat16_body_float32_head"]
    assert half["per_conversation_abs_diff"] > 0 and half["standard_error"] is not None
    assert mixed["per_conversation_abs_diff"] != half["per_conversation_abs_diff"]
