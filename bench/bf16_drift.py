"""Where bfloat16 evaluation's held-out loss drift comes from: the body's rounding, or the output head's.

The held-out loss of the same conversations three ways, the adapter folded in each: float32 (the reference),
bfloat16 weights (eval.dtype bfloat16), and the bfloat16 body with a float32 output head (the logits computed from
the bfloat16 hidden states by the float32 head weight). Per path: the token-mean loss and its difference from
float32, and per conversation the mean and mean absolute difference with the standard error of the mean, so a
systematic drift is told from rounding noise that averages out. If the head's rounding were the drift, the third
path would agree with float32 at a fraction of float32's cost (the head is a quarter of a 0.5B model's FLOPs).

    python bench/bf16_drift.py --json out.json        # a small random model and synthetic sets (seconds; CI)
    python bench/bf16_drift.py --experiment real_qwen_benign --variant large \\
        --adapter runs/bench/real_qwen_benign--large/str-cannot --json bench/results/bf16_drift_real_qwen.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # eval_speed, beside this file

from eval_speed import emit, from_experiment, synthetic  # noqa: E402


def float32_head(model, weight: torch.Tensor) -> None:
    """Replace the model's output head by a float32 one holding `weight`, fed the hidden states upcast: the model's
    own transform of its logits (soft-cap, scale) still applies after it."""
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device)
    head.weight = torch.nn.Parameter(weight, requires_grad=False)
    head.register_forward_pre_hook(lambda _, args: (args[0].float(),))
    model.set_output_embeddings(head)


def drift(model_dir: str, adapter: str | None, conversations: list, max_length: int, batch_size: int) -> dict:
    from logitguard.eval.generate import load_model_for_eval
    from logitguard.eval.utility import conversation_losses

    per, seconds = {}, {}

    def run(name, model, tokenizer):
        start = time.perf_counter()
        per[name] = conversation_losses(model, tokenizer, conversations, max_length, batch_size)
        seconds[name] = round(time.perf_counter() - start, 2)

    model, tokenizer = load_model_for_eval(model_dir, adapter, "float32")
    run("float32", model, tokenizer)
    head = model.get_output_embeddings().weight.detach().clone()
    del model
    model, tokenizer = load_model_for_eval(model_dir, adapter, "bfloat16")
    run("bfloat16", model, tokenizer)
    float32_head(model, head)
    run("bfloat16_body_float32_head", model, tokenizer)

    def mean(pairs):
        return sum(nll for nll, _ in pairs) / sum(n for _, n in pairs)

    reference = per["float32"]
    out = {"conversations": sum(1 for _, n in reference if n), "tokens": sum(n for _, n in reference), "paths": {}}
    for name, pairs in per.items():
        record = {"loss": round(mean(pairs), 8), "seconds": seconds[name]}
        if name != "float32":
            diffs = [a / n - b / n for (a, n), (b, _) in zip(pairs, reference) if n]
            record.update(
                diff=round(mean(pairs) - mean(reference), 8),
                per_conversation_mean_diff=round(statistics.mean(diffs), 8),
                per_conversation_abs_diff=round(statistics.mean(map(abs, diffs)), 8),
                standard_error=round(statistics.stdev(diffs) / len(diffs) ** 0.5, 8) if len(diffs) > 1 else None,
            )
        out["paths"][name] = record
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", help="an experiment file's name: its model and held-out loss sets")
    parser.add_argument("--variant", help="the experiment's variant (its sets), e.g. large")
    parser.add_argument("--adapter", default="random", help="adapter folder, 'random' (default) or 'none'")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.experiment:
            adapter = None if args.adapter == "none" else args.adapter
            model_dir, adapter, sets, spec = from_experiment(args.experiment, 1.0, adapter, Path(tmp), args.variant)
            what = {"experiment": args.experiment, "variant": args.variant, "adapter": args.adapter}
        else:
            model_dir, adapter, sets, spec = synthetic(Path(tmp))
            what = {"experiment": None, "model": "random Qwen2-shaped, hidden 64, 2 layers, toy tokenizer"}
        if not sets["loss"]:
            parser.error("the experiment has no held-out loss data (eval.loss_data)")
        result = drift(model_dir, adapter, sets["loss"], spec["max_length"], spec["batch_size"])
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    report = {"what": what, **result, "versions": versions}
    emit(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
