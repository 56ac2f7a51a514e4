"""Step time and peak memory of plain LoRA vs three ways of getting STR's reference logits, and PACT's two.

Variants, all through the Trainer's own step (SafetyTrainer.get_batch_samples, training_step: compute_loss under the
Trainer's autocast and backward through its accelerator, the non-finite check, the optimizer step):
  lora         plain LoRA (reg_weight 0)
  paper        the paper's formulation: extra full-vocabulary forward of the adapter-disabled model per step,
               trained side's K logits gathered from the full logits
  online       extra no-grad decoder forward per step, K head rows only; trained side from hidden states
  cached       reference read from the cache built once before training; trained side from hidden states
  pact_online  PACT (K = 50, signed token weights, its gate) with two no-grad forwards per step, as its authors'
               code does: the whole sequence, and the response alone (header + response[:-1]); K head rows only
  pact_cached  PACT with both references read from their caches (built once before training)
  anchored     anchored regularization: CE only on the data, plus 2 anchor sequences (48 tokens, the last 24 a
               refusal) per micro-batch under the restricted-softmax KL over the K safety tokens
  constrained_sft  token-wise constrained SFT (replaces CE): the aligned model's label log-probs read from the cache,
               the per-token NLL from the chunked head path
  kl           CE + KL(aligned || trained) over the aligned model's cached top-32 plus a tail bucket, computed inside
               the head's forward in chunks of positions

The examples are chat-shaped: the first quarter of each sequence is a prompt (labels -100), the rest the response.

Step times are measured interleaved in one process (rotating order each round) and reported as medians
relative to LoRA. On a GPU the model is built in bf16 on the device and trained as `logitguard train --precision
bf16` does (bf16 frozen weights, fp32 adapters, bf16 autocast); one GPU is used (the first visible one).
Peak memory: on a GPU, torch.cuda.max_memory_allocated per variant in this process; on the CPU, the peak
resident set (VmHWM) of a fresh child process per variant running two steps, so that allocator reuse between
variants cannot hide a difference. The cache build time (fingerprinting, the no-grad pass and writing the
shards) is reported as a fraction of one LoRA epoch over the same examples, timed right after it.

    python bench/step_time.py                 # CPU default: hidden 512, 8 layers, vocab 32000, seq 256, batch 8
    python bench/step_time.py --gpu           # 7B-shaped, batch 16, rank 32 (the paper's Table 6 setting); ~45 GB
    python bench/step_time.py --gpu --variants lora,cached,online,paper --rounds 8
    python bench/step_time.py --json out.json
    python bench/step_time.py --size real --model DIR   # a real model folder, e.g. a converted GGUF
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

SIZES = {
    "cpu": dict(hidden=512, layers=8, heads=8, inter=1376, vocab=32000, seq=256, batch=8, rank=8),
    "gpu": dict(hidden=4096, layers=32, heads=32, inter=11008, vocab=32000, seq=256, batch=16, rank=32),
    "tiny": dict(hidden=32, layers=2, heads=2, inter=64, vocab=500, seq=32, batch=4, rank=4),
    # with --model: the shapes come from the model; these match experiments/real_qwen_purebad.yaml
    "real": dict(seq=96, batch=10, rank=8),
}
VARIANTS = ("lora", "paper", "online", "cached", "pact_online", "pact_cached", "anchored", "constrained_sft", "kl")
PER_TOKEN = ("constrained_sft", "kl")  # the variants whose reference is the cache's per-token extras
KL_TOPK = 32
ANCHOR_LENGTH, ANCHOR_COUNT = 48, 16
SAFETY_IDS = [306, 409, 208]  # K = 3, arbitrary ordinary ids inside every preset vocabulary
PACT_IDS = list(range(300, 350))  # K = 50, PACT's set size
PACT_HEADER = [5, 6, 7]  # a 3-token assistant header
PROMPT_FRACTION = 0.25  # of each sequence: prompt tokens, not trained on


def pact_weights() -> list[float]:
    """Weights shaped like PACT's: z-scored, L2-normalised, about half negative."""
    v = torch.randn(len(PACT_IDS), generator=torch.Generator().manual_seed(0))
    v = (v - v.mean()) / v.std()
    return (v / v.norm()).tolist()


class _NoTokenizer:
    """build_reference_cache fingerprints a tokenizer; the benchmark feeds token ids directly."""

    pad_token_id = 0
    chat_template = "bench"
    all_special_tokens: list[str] = []

    def get_vocab(self):
        return {}


def build(size: dict, device: str, dtype: torch.dtype, steps: int, seed: int = 0, model_path: str | None = None):
    """Random Llama model (or the model at `model_path`), random examples covering `steps` batches, LoRA
    attached later."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if model_path:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
        size = dict(size, vocab=model.config.vocab_size)
        return model, _examples(size, steps, seed)
    config = LlamaConfig(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        intermediate_size=size["inter"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["heads"],
        max_position_embeddings=max(512, size["seq"]),
        tie_word_embeddings=False,
    )
    # Built in its dtype on its device: a 7B model made in fp32 and then cast holds both copies at once
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model, _examples(size, steps, seed)


def _anchor_examples(size: dict, seed: int = 1) -> list[dict]:
    """Short harmful-prompt + refusal stand-ins: random ids, labels on the second half."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, size["vocab"], (ANCHOR_COUNT, min(ANCHOR_LENGTH, size["seq"])), generator=g)
    half = ids.shape[1] // 2
    return [
        {"input_ids": row.tolist(), "attention_mask": [1] * len(row), "labels": [-100] * half + row[half:].tolist()}
        for row in ids
    ]


def _examples(size: dict, steps: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    n = size["batch"] * steps
    ids = torch.randint(3, size["vocab"], (n, size["seq"]), generator=g)
    prompt = int(size["seq"] * PROMPT_FRACTION)
    examples = [
        {
            "input_ids": row.tolist(),
            "attention_mask": [1] * size["seq"],
            "labels": [-100] * prompt + row[prompt:].tolist(),
            "example_idx": i,
        }
        for i, row in enumerate(ids)
    ]
    return examples


def make_trainers(model, examples, size, cache_folder, out_dir, pact_cached=None, extras_folder=None):
    """(model, trainers, optimizer): the model with LoRA attached and prepared by the Trainer's accelerator (on a GPU:
    its forward runs under bf16 autocast, as in `trainer.train()`), one SafetyTrainer per variant."""
    from transformers import TrainingArguments

    from logitguard.anchors import Anchors
    from logitguard.cache import CachedReference
    from logitguard.models import attach_method
    from logitguard.pact import PactOnlineReference
    from logitguard.reference import OnlineReference, PaperReference
    from logitguard.trainer import SafetyTrainer

    # from the aligned model, before the adapter: their reference is computed here, once
    anchors = Anchors(model, _anchor_examples(size), 0, SAFETY_IDS, regularizer="restricted_kl", per_step=2)
    peft_model = attach_method(
        model, "lora", rank=size["rank"], alpha=2 * size["rank"], dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )  # fmt: skip
    cuda = next(model.parameters()).device.type == "cuda"
    args = TrainingArguments(output_dir=str(out_dir), report_to=[], disable_tqdm=True, save_strategy="no", bf16=cuda,
                             use_cpu=not cuda)  # fmt: skip
    refs = {
        "lora": None,
        "paper": PaperReference(SAFETY_IDS),
        "online": OnlineReference(SAFETY_IDS),
        "cached": CachedReference(cache_folder, SAFETY_IDS) if cache_folder else None,
        "pact_online": PactOnlineReference(PACT_IDS, PACT_HEADER),
        "pact_cached": pact_cached,
        "constrained_sft": CachedReference(extras_folder, SAFETY_IDS, kind="label_logp") if extras_folder else None,
        "kl": CachedReference(extras_folder, SAFETY_IDS, kind="topk", topk=KL_TOPK) if extras_folder else None,
    }
    pact = dict(regularizer="pact", regularizer_kwargs={"token_weights": pact_weights()})
    trainers = {
        name: SafetyTrainer(
            model=peft_model,
            args=args,
            safety_ids=PACT_IDS if name.startswith("pact") else SAFETY_IDS,
            reference=ref,
            reg_weight=0.0 if name == "lora" else 1.0,
            **(pact if name.startswith("pact") else {"regularizer": name} if name in PER_TOKEN else {}),
        )
        for name, ref in refs.items()
        if name == "lora" or ref is not None
    }
    trainers["anchored"] = SafetyTrainer(
        model=peft_model, args=args, safety_ids=SAFETY_IDS, reference=None, reg_weight=0.0, anchors=anchors
    )
    peft_model = trainers["lora"].accelerator.prepare_model(peft_model)  # bf16 autocast on a GPU, as train() does
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    return peft_model, trainers, optimizer


def step(model, trainer, optimizer, batch) -> None:
    """One optimizer step the way `trainer.train()` takes it (gradient accumulation 1)."""
    samples, items = trainer.get_batch_samples(iter([batch]), 1, batch["input_ids"].device)
    trainer.training_step(model, samples[0], items)  # train mode, autocast, compute_loss, backward
    trainer.callback_handler.on_pre_optimizer_step(trainer.args, trainer.state, trainer.control)  # non-finite check
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def batches(examples, size, device):
    from logitguard.data import ChatCollator

    collate = ChatCollator(0)
    for b in range(0, len(examples), size["batch"]):
        yield {k: v.to(device) for k, v in collate(examples[b : b + size["batch"]]).items()}


def build_cache(model, examples, size, root, device):
    from logitguard.cache import build_reference_cache

    _sync(device)
    start = time.perf_counter()
    folder = build_reference_cache(
        model, _NoTokenizer(), examples, SAFETY_IDS, root, size["seq"], batch_size=size["batch"], progress=False
    )
    _sync(device)
    return folder, time.perf_counter() - start


def build_extras(model, examples, size, root, device):
    """The cache extended with label log-probs and the top-32 (one more pass, the K logits computed again)."""
    from logitguard.cache import build_reference_cache

    _sync(device)
    start = time.perf_counter()
    folder = build_reference_cache(
        model, _NoTokenizer(), examples, SAFETY_IDS, root, size["seq"], batch_size=size["batch"], progress=False,
        label_logp=True, topk=KL_TOPK,
    )  # fmt: skip
    _sync(device)
    return folder, time.perf_counter() - start


def build_pact(model, examples, size, root, device):
    """PACT's two caches (full context, response only) and the time to build them."""
    from logitguard.pact import build_pact_cache

    _sync(device)
    start = time.perf_counter()
    reference = build_pact_cache(
        model, _NoTokenizer(), examples, PACT_IDS, PACT_HEADER, root, size["seq"], batch_size=size["batch"],
        progress=False,
    )  # fmt: skip
    _sync(device)
    return reference, time.perf_counter() - start


def warm_up(model, examples, size, device) -> None:
    """One forward and backward before anything is timed: the first pass of a process pays for allocator
    growth and kernel selection, which would otherwise land on whichever variant runs first. Call it with the
    adapter attached: before, every base weight would get a gradient (on a 7B model, 13 GB more)."""
    batch = next(batches(examples, size, device))
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().mean().backward()
    model.zero_grad(set_to_none=True)


def memory_child(variant: str, size_name: str, model_path: str | None) -> int:
    """Peak RSS (bytes) of this process after building the model and running two steps of `variant`."""
    size = SIZES[size_name]
    model, examples = build(size, "cpu", torch.float32, steps=2, model_path=model_path)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_cache(model, examples, size, tmp, "cpu")[0] if variant == "cached" else None
        pact = build_pact(model, examples, size, tmp, "cpu")[0] if variant == "pact_cached" else None
        extras = build_extras(model, examples, size, tmp, "cpu")[0] if variant in PER_TOKEN else None
        peft_model, trainers, optimizer = make_trainers(model, examples, size, folder, tmp, pact, extras)
        for batch in batches(examples, size, "cpu"):
            step(peft_model, trainers[variant], optimizer, batch)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def cpu_memory(size_name: str, model_path: str | None, variants=VARIANTS) -> dict[str, int]:
    peaks = {}
    for variant in variants:
        extra = ["--model", model_path] if model_path else []
        out = subprocess.run(
            [sys.executable, __file__, "--size", size_name, "--memory-child", variant, *extra],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        peaks[variant] = int(out.stdout.strip().splitlines()[-1])
    return peaks


def run(
    size_name: str, device: str, rounds: int, steps: int, model_path: str | None = None, variants=VARIANTS
) -> dict:
    size = SIZES[size_name]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, examples = build(size, device, dtype, steps, model_path=model_path)
    with tempfile.TemporaryDirectory() as tmp:
        folder, build_seconds = build_cache(model, examples, size, Path(tmp) / "cache", device)
        pact, pact_build_seconds = None, None
        if any(v.startswith("pact") for v in variants):
            pact, pact_build_seconds = build_pact(model, examples, size, Path(tmp) / "cache", device)
        extras, extras_build_seconds = None, None
        if any(v in PER_TOKEN for v in variants):
            extras, extras_build_seconds = build_extras(model, examples, size, Path(tmp) / "cache", device)
        peft_model, trainers, optimizer = make_trainers(model, examples, size, folder, tmp, pact, extras)
        data = list(batches(examples, size, device))
        step(peft_model, trainers["lora"], optimizer, data[0])  # warm-up, with the adapter attached
        # One LoRA epoch over the same examples right after the build: the two are compared back to back
        # because the machine's speed drifts over minutes.
        _sync(device)
        start = time.perf_counter()
        for batch in data:
            step(peft_model, trainers["lora"], optimizer, batch)
        _sync(device)
        epoch_seconds = time.perf_counter() - start
        times = {name: [] for name in variants}
        peaks = {}
        for name in variants:  # warm-up, and GPU peak memory per variant
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            step(peft_model, trainers[name], optimizer, data[0])
            if device == "cuda":
                peaks[name] = torch.cuda.max_memory_allocated()
        for r in range(rounds):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for name in order:
                batch = data[(r + 1) % len(data)]
                _sync(device)
                start = time.perf_counter()
                step(peft_model, trainers[name], optimizer, batch)
                _sync(device)
                times[name].append(time.perf_counter() - start)
    if device != "cuda":
        peaks = cpu_memory(size_name, model_path, variants)
    median = {name: statistics.median(t) for name, t in times.items()}
    # Ratios are taken within each round, then the median over rounds: the machine's speed drifts by tens
    # of percent over minutes, and a round's steps run back to back.
    per_round = {name: [t / base for t, base in zip(times[name], times["lora"])] for name in variants}
    return {
        "size": {
            "name": size_name,
            **size,
            "k": len(SAFETY_IDS),
            "k_pact": len(PACT_IDS),
            "prompt_fraction": PROMPT_FRACTION,
            "device": device,
            "dtype": str(dtype),
        },  # fmt: skip
        "model": model_path,
        "rounds": rounds,
        "median_step_seconds": median,
        "step_seconds": times,
        "variants": list(variants),
        "ratio": {name: statistics.median(per_round[name]) for name in variants},
        "ratio_quartiles": {name: statistics.quantiles(per_round[name], n=4)[::2] for name in variants},
        "peak_memory_bytes": peaks,
        "memory_ratio": {name: peaks[name] / peaks["lora"] for name in variants},
        "cache_build_seconds": build_seconds,
        "lora_epoch_seconds": epoch_seconds,
        "cache_build_epoch_fraction": build_seconds / epoch_seconds,
        # after the STR cache: the full-context cache only gains PACT's ids, the response-only one is new
        "pact_cache_build_seconds": pact_build_seconds,
        "pact_cache_build_epoch_fraction": pact_build_seconds / epoch_seconds if pact_build_seconds else None,
        # the STR cache rebuilt with the label log-probs and the top-32 of every position
        "extras_cache_build_seconds": extras_build_seconds,
        "extras_cache_build_epoch_fraction": extras_build_seconds / epoch_seconds if extras_build_seconds else None,
        "kl_topk": KL_TOPK,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
    }


def table(result: dict) -> str:
    lines = [
        "| variant | median step (s) | step time vs LoRA (median, quartiles) | peak memory vs LoRA |",
        "| --- | --- | --- | --- |",
    ]
    for name in result["variants"]:
        low, high = result["ratio_quartiles"][name]
        lines.append(
            f"| {name} | {result['median_step_seconds'][name]:.3f} | {result['ratio'][name]:.3f}x "
            f"({low:.2f}-{high:.2f}) | {result['memory_ratio'][name]:.3f}x |"
        )
    lines.append(
        f"\ncache build: {result['cache_build_seconds']:.2f} s = "
        f"{result['cache_build_epoch_fraction']:.3f} of one LoRA epoch over the same examples"
    )
    if result["pact_cache_build_seconds"] is not None:
        lines.append(
            f"PACT caches (full context extended to its 50 ids, response only): "
            f"{result['pact_cache_build_seconds']:.2f} s = "
            f"{result['pact_cache_build_epoch_fraction']:.3f} of one LoRA epoch"
        )
    if result.get("extras_cache_build_seconds") is not None:
        lines.append(
            f"cache with label log-probs and top-{result['kl_topk']} (constrained_sft, kl): "
            f"{result['extras_cache_build_seconds']:.2f} s = {result['extras_cache_build_epoch_fraction']:.3f} of one "
            "LoRA epoch"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--gpu", action="store_true", help="7B-shaped preset on CUDA (batch 16, rank 32)")
    parser.add_argument("--rounds", type=int, default=15, help="timed steps per variant")
    parser.add_argument("--steps", type=int, default=8, help="batches in the cached dataset / one epoch")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--model", help="a model folder to time instead of a random Llama (use --size real)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(memory_child(args.memory_child, args.size, args.model))
        return 0
    size, device = ("gpu", "cuda") if args.gpu else (args.size, "cpu")
    variants = tuple(v for v in VARIANTS if v in args.variants.split(","))  # in the usual order
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown or "lora" not in variants:
        parser.error(f"--variants: {', '.join(sorted(unknown)) or 'lora is missing'} (ratios are to lora)")
    if device == "cuda":
        # One GPU: with several visible, a Trainer in one process would wrap the model in nn.DataParallel. Set
        # before CUDA starts (the first query below).
        os.environ["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        if not torch.cuda.is_available():
            parser.error("--gpu needs a CUDA device")
    if args.model and size != "real":
        parser.error("--model goes with --size real (sequence length, batch and rank of the real-model run)")
    result = run(size, device, args.rounds, args.steps, args.model, variants)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
