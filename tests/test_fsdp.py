"""FSDP2 on CPU processes (gloo): the head's weight is read only inside its forward, and `logitguard train` runs
under `accelerate launch` with FSDP, saving collectively."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from helpers import ASSETS
from safetensors.torch import load_file

# CPU processes (gloo) also where a GPU is visible: one GPU cannot hold two ranks, and the references are on the CPU
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_head_tap_under_fsdp2_matches_the_unsharded_model(tmp_path):
    out = tmp_path / "report.json"
    worker = Path(__file__).parent / "fsdp_worker.py"
    proc = subprocess.run([sys.executable, str(worker), free_port(), str(out)], capture_output=True, text=True,
                          env=ENV, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ce_equal"] and report["safety_equal"] and report["head_grad_equal"], report
    # what a read of head.weight[ids] outside the forward would have seen: half of the 300 rows
    assert report["local_rows_outside_forward"] == 150


def test_logitguard_train_under_accelerate_fsdp(tmp_path, model_dir):
    config = tmp_path / "fsdp.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_machines: 1\nnum_processes: 2\n"
        "machine_rank: 0\nmixed_precision: 'no'\nuse_cpu: true\nfsdp_config:\n  fsdp_version: 2\n"
        "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer\n"
        "  fsdp_state_dict_type: FULL_STATE_DICT\n  fsdp_cpu_ram_efficient_loading: false\n"
        f"main_process_port: {free_port()}\n"
    )
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "-m", "logitguard.cli", "train", "--model", str(model_dir), "--data", str(ASSETS / "chat.jsonl"),
        "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--max-length", "64",
        "--batch-size", "2", "--epochs", "2", "--logging-steps", "1", "--disable-tqdm", "true",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{"output_dir"')]
    assert len(results) == 1 and results[0]["global_step"] == 4
    adapter = load_file(out / "adapter_model.safetensors")  # gathered whole, not one rank's shard
    a = next(v for k, v in adapter.items() if k.endswith("q_proj.lora_A.weight"))
    assert tuple(a.shape) == (8, 16)
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("reg", 0) > 0 for row in logs)
