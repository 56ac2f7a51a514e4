"""experiments/real_model/eval_dtype_agreement.py on a tiny experiment: the aligned model and a trained run are
evaluated again in bfloat16 and paired item by item with their float32 rows."""

import importlib.util
import json
from pathlib import Path

from test_runner import _bench, _tiny_experiment

ROOT = Path(__file__).resolve().parents[1]


def test_bfloat16_evaluation_is_paired_with_the_float32_rows(tmp_path, model_dir):
    path = _tiny_experiment(tmp_path, model_dir, [{"name": "LoRA", "train": {"reg_weight": 0}}])
    _bench(tmp_path, path)
    spec = importlib.util.spec_from_file_location("agreement", ROOT / "experiments/real_model/eval_dtype_agreement.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "agreement.json"
    argv = ["--experiment", str(path), "--runs", "LoRA", "--results", str(tmp_path / "results"),
            "--runs-dir", str(tmp_path / "work"), "--work", str(tmp_path / "eval"), "--json", str(out)]  # fmt: skip
    assert module.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["dtype"] == "bfloat16" and set(report["models"]) == {"aligned base", "LoRA"}
    assert "experiment" not in report  # committed under results/, where `experiment report` would take it for a run
    lora = report["models"]["LoRA"]
    assert lora["items"]["refusal:harmful"]["items"] == 2 and lora["items"]["loss:chat"]["conversations"] > 0
    assert lora["items"]["loss:chat"]["max_mean_nll_diff"] < 0.1  # bf16 rounding, not a different model
    assert set(lora["minus_aligned"]["refusal_rate"]) == {"float32", "bfloat16"}
    assert "refusal_rate" in lora["dtype_minus_float32"] and set(lora["seconds"]["stages"]) == {"safety", "loss:chat"}
    assert lora["float32_row_seconds"]["eval_seconds"] > 0
