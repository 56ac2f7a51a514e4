"""Decoding cost against batch size and weight layout, on the real model: where a full-size evaluation's time goes.

The evaluation decodes HumanEval and the refusal prompts 20 rows at a time. This prints, for the model's MLP-up
projection (896 -> 4864 on Qwen2.5-0.5B) and for whole decode steps of the model on HumanEval prompts (their last
64 tokens, so that prefill stays cheap), the milliseconds per call at several batch sizes, with the weights in
their stored row-major layout and transposed in memory (column-major; same values and shape), and whether the
greedy tokens agree between the layouts. Run it alone on the machine (a second torch job halves every number).

    python bench/decode_batch.py --model <converted model folder> [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def median_seconds(call, reps: int = 9) -> float:
    call()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return sorted(times)[reps // 2]


def column_major(model) -> None:
    """Every linear weight stored transposed in memory (values and shape unchanged); a tied input embedding is the
    same tensor, so it is stored transposed too (one lookup a token: no cost that shows)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = module.weight.data.t().contiguous().t()


def decode_steps(model, prompts: list[list[int]], steps: int):
    """(prefill seconds, seconds per decode step, greedy tokens (B, steps)) for equal-length prompts."""
    from transformers import DynamicCache

    ids = torch.tensor(prompts)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        start = time.perf_counter()
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        prefill = time.perf_counter() - start
        tokens = []
        start = time.perf_counter()
        for _ in range(steps):
            token = logits.argmax(-1)
            tokens.append(token)
            logits = model(input_ids=token[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
        per_step = (time.perf_counter() - start) / steps
    return prefill, per_step, torch.stack(tokens, 1)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logitguard.eval.datasets import load_set
    from logitguard.eval.humaneval import humaneval_prompt

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model folder (the converted GGUF's)")
    parser.add_argument("--assets", default=str(ROOT / "experiments" / "assets"))
    parser.add_argument("--batches", default="1,8,20,40")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    out: dict = {"threads": torch.get_num_threads(), "linear": [], "decode": []}

    weight = torch.randn(4864, 896)
    transposed = weight.t().contiguous().t()  # the same matrix, stored column-major
    for rows in batches:
        x = torch.randn(rows, 896)
        row = median_seconds(lambda x=x: torch.nn.functional.linear(x, weight))
        col = median_seconds(lambda x=x: torch.nn.functional.linear(x, transposed))
        flops = 2 * rows * weight.numel()
        out["linear"].append({"rows": rows, "row_major_ms": 1e3 * row, "column_major_ms": 1e3 * col,
                              "row_major_gflops": flops / row / 1e9})  # fmt: skip
        print(f"linear 896->4864, {rows:3d} rows: {1e3 * row:6.2f} ms ({flops / row / 1e9:5.1f} GFLOP/s), "
              f"column-major {1e3 * col:6.2f} ms", flush=True)  # fmt: skip

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    problems = load_set("humaneval", args.assets)[: max(batches)]
    prompts = [
        tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": humaneval_prompt(p)}], tokenize=False,
                  add_generation_prompt=True), add_special_tokens=False)["input_ids"][-64:]
        for p in problems
    ]  # fmt: skip
    tokens = {}
    for layout in ("row-major", "column-major"):
        if layout == "column-major":
            column_major(model)
        for rows in batches:
            prefill, step, tokens[layout, rows] = decode_steps(model, prompts[:rows], args.steps)
            out["decode"].append({"layout": layout, "rows": rows, "prefill_s": prefill, "step_ms": 1e3 * step,
                                  "ms_per_row_token": 1e3 * step / rows})  # fmt: skip
            print(f"{layout}, batch {rows:2d}: prefill {prefill:5.1f} s ({rows * 64} tokens), decode "
                  f"{1e3 * step:6.0f} ms/step ({1e3 * step / rows:5.1f} ms per row)", flush=True)  # fmt: skip
    out["tokens_equal"] = {r: torch.equal(tokens["row-major", r], tokens["column-major", r]) for r in batches}
    print("greedy tokens equal across layouts:", out["tokens_equal"])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
