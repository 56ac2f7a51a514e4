"""The safety monitor under FSDP1 and FSDP2 on two CPU processes (gloo): no check before the root's first forward,
then the same greedy answers as the unsharded model, and training goes on afterwards on the same weights.

The model is sharded by hand as accelerate does it: on CPU processes `accelerate launch` with an FSDP config runs
DDP (accelerate enables FSDP for accelerator devices only), so the Trainer's FSDP path runs in the GPU check
(python -m logitguard.gpu_check, FSDP2 step with the monitor on)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_fsdp import ENV, free_port


@pytest.mark.slow  # two processes that import torch and transformers: ~20 s each
@pytest.mark.parametrize("version", [2, 1])
def test_monitor_generates_under_fsdp_as_the_unsharded_model(version, tokenizer_dir, tmp_path):
    out = tmp_path / "report.json"
    worker = Path(__file__).parent / "monitor_fsdp_worker.py"
    proc = subprocess.run([sys.executable, str(worker), free_port(), str(out), str(tokenizer_dir), str(version)],
                          capture_output=True, text=True, env=ENV, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["skipped_at_start"] and report["checked_steps"] == [1], report
    assert report["responses_equal"] and any(report["responses"]), report  # whole weights, not shards
    plain_1, sharded_1, plain_2, sharded_2 = report["losses"]
    assert sharded_1 == pytest.approx(plain_1, abs=1e-5) and sharded_2 == pytest.approx(plain_2, abs=1e-5), report
    assert plain_2 != pytest.approx(plain_1, abs=1e-4)  # the step changed the weights: the comparison means something
    assert report["inference_tensors"] == 0
    first, second = report["per_rank"]
    # ranks whose answers end at different steps generate in step (synced_gpus), each its own greedy answers
    assert first["diverged_equal"] and second["diverged_equal"], report
    assert first["stopped"] and second["stopped"], report  # a NaN in one rank's gradient shard stops both
    # safety_mix: self generates on the main process only; the other reads its file and mixes the same rows
    assert (first["generated"], second["generated"]) == (1, 0) and first["mixed"] == second["mixed"], report
