"""Peak memory and step time at a real vocabulary: a stock transformers LoRA step against logitguard's.

Variants, each a LoRA step (forward, backward, AdamW step) on the same model and batches:
  stock            the model's own forward with labels: full (B, T, V) logits, plain cross-entropy
  logitguard_lora  logitguard's SafetyTrainer with reg_weight 0: cross-entropy chunked from the final hidden state
  str_cached       logitguard STR with the reference cache: the same, plus K safety logits from K head rows

Default shape: a Qwen-sized vocabulary (151,936), seq 512, batch 4, LoRA r 8, on a small random Llama (the
vocabulary is what the logits' memory scales with). Peak memory: on the CPU, the peak resident set of a fresh
child process per variant, counted from just before its first step (/proc/self/clear_refs resets the peak), so
it includes the resident model and optimizer but not set-up transients; on a GPU, torch.cuda.max_memory_allocated
per variant from a reset of the peak just before its steps, in one process (the CUDA mode: bf16 frozen weights,
fp32 adapters, every variant's forward under the Trainer's bf16 autocast, one GPU, the first visible).
Step times are interleaved in one process, rotating the order each round, as medians of per-round ratios.

    python bench/memory.py                    # CPU, about 5 minutes on 2 cores
    python bench/memory.py --json bench/results/memory_cpu.json
    python bench/memory.py --device cuda --json bench/results/memory_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from step_time import SAFETY_IDS, batches, build, build_cache, make_trainers  # noqa: E402
from step_time import step as trainer_step  # noqa: E402

SIZE = dict(hidden=256, layers=2, heads=4, inter=688, vocab=151936, seq=512, batch=4, rank=8)
VARIANTS = ("stock", "logitguard_lora", "str_cached")


def setup(device: str, steps: int, tmp: str, with_cache: bool):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # CUDA: as `logitguard train --precision bf16`
    model, examples = build(SIZE, device, dtype, steps)
    folder = build_cache(model, examples, SIZE, tmp, device)[0] if with_cache else None
    peft_model, trainers, optimizer = make_trainers(model, examples, SIZE, folder, tmp)
    return peft_model, trainers, optimizer, examples


def step(variant: str, model, trainers, optimizer, batch) -> None:
    if variant != "stock":  # the Trainer's own step (step_time.step)
        return trainer_step(model, trainers["lora" if variant == "logitguard_lora" else "cached"], optimizer, batch)
    model.train()
    # the model's own loss; on a GPU its forward runs under the accelerator's autocast, as the others' do
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(variant: str) -> int:
    """Peak RSS (bytes) of this process during two steps of `variant`, set-up transients excluded."""
    with tempfile.TemporaryDirectory() as tmp:
        model, trainers, optimizer, examples = setup("cpu", 2, tmp, variant == "str_cached")
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        for batch in batches(examples, SIZE, "cpu"):
            step(variant, model, trainers, optimizer, batch)
        return _status("VmHWM")


def peak_memory(device: str) -> dict[str, int]:
    if device == "cuda":
        peaks = {}
        with tempfile.TemporaryDirectory() as tmp:
            model, trainers, optimizer, examples = setup(device, 2, tmp, True)
            data = list(batches(examples, SIZE, device))
            step("logitguard_lora", model, trainers, optimizer, data[0])  # optimizer state exists for every variant
            for variant in VARIANTS:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                for batch in data:
                    step(variant, model, trainers, optimizer, batch)
                torch.cuda.synchronize()
                peaks[variant] = torch.cuda.max_memory_allocated()
        return peaks
    peaks = {}
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--memory-child", variant], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"memory child {variant} failed:\n{out.stderr[-2000:]}")
        peaks[variant] = int(out.stdout.strip().splitlines()[-1])
    return peaks


def step_times(device: str, rounds: int) -> dict[str, list[float]]:
    ratios: dict[str, list[float]] = {v: [] for v in VARIANTS[1:]}
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        model, trainers, optimizer, examples = setup(device, rounds, tmp, True)
        all_batches = list(batches(examples, SIZE, device))
        for variant in VARIANTS:  # warm-up: allocator growth and kernel choice land on no timed step
            step(variant, model, trainers, optimizer, all_batches[0])
        for r, batch in enumerate(all_batches):
            order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]
            took = {}
            for variant in order:
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                step(variant, model, trainers, optimizer, batch)
                if device == "cuda":
                    torch.cuda.synchronize()
                took[variant] = time.perf_counter() - start
            for variant in VARIANTS:
                seconds[variant].append(took[variant])
            for variant in VARIANTS[1:]:
                ratios[variant].append(took[variant] / took["stock"])
    return {"ratios": ratios, "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda if present")
    parser.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        torch.set_num_threads(2)
        print(memory_child(args.memory_child))
        return 0
    if args.device != "cpu":
        # One GPU (set before CUDA starts): several visible would make a Trainer wrap the model in DataParallel
        os.environ["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    peaks = peak_memory(device)
    times = step_times(device, args.rounds)
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "shape": SIZE,
        "safety_ids": SAFETY_IDS,
        "peak_memory_bytes": peaks,
        "peak_memory_ratio": {v: round(peaks[v] / peaks["stock"], 3) for v in VARIANTS[1:]},
        "step_time_ratio": {v: round(statistics.median(r), 3) for v, r in times["ratios"].items()},
        "step_seconds_median": {v: round(statistics.median(s), 3) for v, s in times["seconds"].items()},
        "rounds": args.rounds,
        "precision": "bf16 mixed" if device == "cuda" else "fp32",
        "torch": torch.__version__,
    }
    result["targets"] = {
        "str_cached peak <= 0.6x stock": result["peak_memory_ratio"]["str_cached"] <= 0.6,
        "str_cached step <= 1.05x stock": result["step_time_ratio"]["str_cached"] <= 1.05,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
