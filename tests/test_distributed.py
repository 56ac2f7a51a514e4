"""`logitguard train` unchanged under `accelerate launch` with 2 CPU processes (DDP over gloo)."""

import json
import os
import subprocess
import sys

from helpers import ASSETS


def test_two_process_ddp_training(tmp_path, model_dir):
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "logitguard.cli", "train", "--model", str(model_dir), "--data", str(ASSETS / "chat.jsonl"),
        "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--max-length", "64",
        "--batch-size", "2", "--epochs", "2", "--logging-steps", "1", "--trainer", '{"disable_tqdm": true}',
    ]  # fmt: skip
    # CPU processes on a GPU machine too (conftest leaves at most one GPU visible, and two processes cannot share it)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{"output_dir"')]
    assert len(results) == 1  # only the main process reports
    # 8 examples, 2 per process, 2 processes: 2 optimizer steps per epoch
    assert results[0]["global_step"] == 4
    assert (out / "adapter_model.safetensors").exists()
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("reg" in row for row in logs)
