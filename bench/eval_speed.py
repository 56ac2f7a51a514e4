"""Evaluation speed: one evaluation spec through the reference path and the fast path, stage by stage, interleaved.

Reference path (what the runner did before): the adapter attached unmerged, `model.generate` over batches of
left-padded prompts until the batch's last row ends, multiple-choice items one at a time (each context once, shared
by its choices), held-out loss with the head over every position. Fast path (the runner's now): the adapter folded
into the float32 weights, greedy decoding that drops ended rows, lets waiting prompts take their places (continuous
batching) and prefills the prompts' shared prefix once, a HumanEval answer ended where its code block closes,
multiple choice batched with the prefix shared by every context run once, the head only at scored positions.

Per stage: seconds, useful tokens per second, and a roofline measured on this machine: every forward either
reads the weights once (bytes / measured memory bandwidth) or does its FLOPs (2 x parameters x rows, at the
measured matmul rate), whichever is longer, summed over the forwards the path actually ran. Agreement: greedy
outputs equal (or how many differ), HumanEval programs and pass/fail equal, multiple-choice choices equal and
the largest score difference, losses' difference.

    python bench/eval_speed.py --json out.json        # a small random model and synthetic sets (seconds; CI)
    python bench/eval_speed.py --experiment real_qwen_benign --variant large --scale 0.2 --dtype bfloat16 \\
        --json bench/results/eval_speed_real_qwen_fifth.json   # the real 0.5B model and its experiment's sets
        # (assets: python experiments/real_model/fetch_assets.py); --scale 0.5 halves every set
    --dtype bfloat16 adds a third path: the fast path with the adapter folded in float32 and the weights then
    rounded to bfloat16 (eval.dtype in an experiment file), timed and checked against the reference the same way.
    --batch-size N: the fast paths decode N rows at once (default: the spec's batch size, as the reference does).
    --no-float32 (with --dtype): the reference against the dtype's fast path alone, for full-size runs.
    --device cuda: every path and the machine's roofline on the GPU (float32 matmuls without TF32, so the float32
    paths are comparable to the CPU's; --dtype bfloat16 is then the GPU's native half precision). The bench the
    issue asks for at full size on a GPU, when a session has one:
        python bench/eval_speed.py --experiment real_qwen_benign --variant large --device cuda --dtype bfloat16 \
            --batch-size 40 --json bench/results/eval_speed_real_qwen_cuda.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def measure_machine(seconds: float = 1.0, device: str = "cpu") -> dict:
    """Memory bandwidth (GB/s, reading a 512 MiB tensor) and matmul rate (GFLOP/s, float32 and bfloat16) on
    `device`: 1024^3 on a CPU, 8192^3 on a GPU (a small matmul there measures the launch, not the arithmetic)."""
    from logitguard.eval.generate import cpu_has_native

    device = torch.device(device)
    n = 1024 if device.type == "cpu" else 8192
    big = torch.ones(128 * 1024 * 1024, device=device)  # 512 MiB
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)

    def rate(fn, amount):
        def run():  # a GPU's kernels return before they finish: wait for them inside the timing
            fn()
            torch.accelerator.synchronize() if device.type != "cpu" else None

        run()
        best, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < seconds:
            t = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t)
        return amount / best / 1e9

    a16, b16 = a.bfloat16(), b.bfloat16()
    machine = {
        "bandwidth_gb_s": rate(lambda: big.sum(), big.numel() * 4),
        "matmul_gflop_s": rate(lambda: a @ b, 2 * n**3),
        "matmul_gflop_s_bfloat16": rate(lambda: a16 @ b16, 2 * n**3),
    }
    if device.type == "cpu":
        return {**machine, "bf16_instructions": cpu_has_native("bfloat16"), "threads": torch.get_num_threads()}
    return {**machine, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type}


class Roofline:
    """Counts what each forward does (rows through the body and through the head) and its roofline seconds."""

    def __init__(self, model, machine: dict):
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        head = model.get_output_embeddings()
        self.head_params = head.weight.numel()
        self.body_params = sum(m.weight.numel() for m in linears if m is not head)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        half = next(model.parameters()).dtype == torch.bfloat16
        self.bw = machine["bandwidth_gb_s"] * 1e9
        self.flops = machine["matmul_gflop_s_bfloat16" if half else "matmul_gflop_s"] * 1e9
        self.seconds, self.forwards, self._rows = 0.0, 0, 0
        self.hooks = [
            model.get_input_embeddings().register_forward_pre_hook(self._body),
            head.register_forward_pre_hook(self._head),
        ]

    def _body(self, _, args):
        self._rows = args[0].numel()

    def _head(self, _, args):
        rows = args[0].shape[:-1].numel()
        work = 2 * (self.body_params * self._rows + self.head_params * rows)
        self.seconds += max(work / self.flops, self.weight_bytes / self.bw)
        self.forwards += 1

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def remove(self):
        for h in self.hooks:
            h.remove()


def timed(fn, roof: Roofline):
    roof.take()
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start, roof.take()


def stage_record(seconds: dict, roofs: dict, tokens: dict, agreement) -> dict:
    """agreement(other_path) -> that path's agreement with the reference path."""
    others = [k for k in seconds if k != "reference"]
    return {
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "tokens": tokens,
        "tokens_per_s": {k: round(tokens[k] / seconds[k], 1) for k in seconds if tokens.get(k)},
        "roofline_s": {k: round(v, 2) for k, v in roofs.items()},
        "share_of_roofline": {k: round(roofs[k] / seconds[k], 3) for k in seconds},
        "speedup": {k: round(seconds["reference"] / seconds[k], 2) for k in others},
        "agreement": {k: agreement(k) for k in others},
    }


def run_pair(stage: str, flip: bool, paths: dict, job) -> tuple[dict, dict, dict]:
    """job(path_name, model, tokenizer) -> result; every path, in reversed order on alternate stages."""
    out, secs, roofs = {}, {}, {}
    for name in reversed(paths) if flip else paths:
        model, tokenizer, roof = paths[name]
        print(f"[{stage}] {name} ...", file=sys.stderr, flush=True)
        out[name], secs[name], roofs[name] = timed(lambda n=name, m=model, t=tokenizer: job(n, m, t), roof)
        print(f"[{stage}] {name}: {secs[name]:.1f} s", file=sys.stderr, flush=True)
    return out, secs, roofs


def token_count(tokenizer, texts: list[str]) -> int:
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


def bench(model_dir, adapter, sets: dict, spec: dict, machine: dict, dtype: str | None = None,
          fast_batch: int | None = None, float32: bool = True, device: str = "cpu") -> dict:  # fmt: skip
    """The reference path and the fast path in float32; with `dtype`, the fast path in that dtype as well.
    fast_batch: rows the fast paths decode at once (default: the spec's batch size, the reference's).
    float32=False leaves the float32 fast path out (it needs `dtype`): at full size it costs as much as the
    reference, and its exactness is shown at a smaller scale. device: where every path runs."""
    from logitguard.eval.decode import joining
    from logitguard.eval.generate import load_model_for_eval

    if not (float32 or dtype):
        raise ValueError("leaving the float32 fast path out needs another fast path: give dtype")
    # float32 named, not left to the device's default (the checkpoint's dtype on a GPU): the reference is exact
    loads = {"reference": (False, "float32"), **({"fast": (True, "float32")} if float32 else {})}
    if dtype:
        loads[f"fast_{dtype}"] = (True, dtype)
    paths, load_seconds = {}, {}
    for name, (merge, path_dtype) in loads.items():
        start = time.perf_counter()
        model, tokenizer = load_model_for_eval(model_dir, adapter, path_dtype, device, merge=merge)
        load_seconds[name] = time.perf_counter() - start
        paths[name] = (model, tokenizer, Roofline(model, machine))
    fast = {name: merge for name, (merge, _) in loads.items()}
    batch = spec["batch_size"]
    rows = {name: (fast_batch or batch) if merge else batch for name, merge in fast.items()}  # decoded at once
    with joining(True):  # the fast paths' continuous batching (the reference's model.generate has none)
        stages = _stages(paths, fast, rows, sets, spec)
    for _, _, roof in paths.values():
        roof.remove()
    total = {k: load_seconds[k] + sum(s["seconds"][k] for s in stages.values()) for k in paths}
    return {
        "load_seconds": {k: round(v, 2) for k, v in load_seconds.items()},
        "stages": stages,
        "total_seconds": {k: round(v, 2) for k, v in total.items()},
        "speedup": {k: round(total["reference"] / total[k], 2) for k in paths if k != "reference"},
    }


def _stages(paths: dict, fast: dict, rows: dict, sets: dict, spec: dict) -> dict:
    """Every stage the sets ask for, through every path: {stage: stage_record}."""
    from logitguard.eval.generate import StopRule, generate_responses
    from logitguard.eval.humaneval import build_program, code_closed, execute, humaneval_prompt
    from logitguard.eval.keyword import is_refusal
    from logitguard.eval.multiple_choice import TASKS, score_items
    from logitguard.eval.utility import conversation_losses, eval_loss

    batch, max_new, util_new = spec["batch_size"], spec["max_new_tokens"], spec["utility_max_new_tokens"]
    stages = {}

    def tokens_of(out):
        return {k: token_count(paths[k][1], v) for k, v in out.items()}

    prompts = sets["prompts"]
    if prompts:
        out, secs, roofs = run_pair("generation", False, paths, lambda n, m, t: generate_responses(
            m, t, prompts, max_new, rows[n], progress=False, fast=fast[n]))  # fmt: skip
        refused = {k: [is_refusal(r) for r in v] for k, v in out.items()}
        stages["generation"] = stage_record(secs, roofs, tokens_of(out), lambda k: {
            "responses": len(prompts),
            "differ": sum(a != b for a, b in zip(out["reference"], out[k])),
            "refusal_label_differ": sum(a != b for a, b in zip(refused["reference"], refused[k])),
            "refusals": {"reference": sum(refused["reference"]), k: sum(refused[k])},
        })  # fmt: skip

    problems = sets["humaneval"]
    if problems:
        he_prompts = [humaneval_prompt(p) for p in problems]

        def humaneval(name, m, t):
            stop = StopRule(code_closed, "`") if fast[name] else None
            completions = generate_responses(m, t, he_prompts, util_new, rows[name], progress=False, fast=fast[name],
                                             stop=stop)  # fmt: skip
            return completions, execute(problems, completions)

        out, secs, roofs = run_pair("humaneval", True, paths, humaneval)
        programs = {k: [build_program(p, c) for p, c in zip(problems, v[0])] for k, v in out.items()}
        passed = {k: [r["passed"] for r in v[1]] for k, v in out.items()}
        stages["humaneval"] = stage_record(secs, roofs, tokens_of({k: v[0] for k, v in out.items()}), lambda k: {
            "problems": len(problems),
            "programs_differ": sum(a != b for a, b in zip(programs["reference"], programs[k])),
            "pass_differ": sum(a != b for a, b in zip(passed["reference"], passed[k])),
            "pass@1": {j: sum(passed[j]) / len(problems) for j in ("reference", k)},
        })  # fmt: skip

    gsm = sets["gsm8k"]
    if gsm:
        from logitguard.eval.gsm8k import gsm8k_prompt

        gsm_prompts = [gsm8k_prompt(i["prompt"]) for i in gsm]
        out, secs, roofs = run_pair("gsm8k", False, paths, lambda n, m, t: generate_responses(
            m, t, gsm_prompts, util_new, rows[n], progress=False, fast=fast[n]))  # fmt: skip
        stages["gsm8k"] = stage_record(secs, roofs, tokens_of(out), lambda k: {
            "responses": len(gsm), "differ": sum(a != b for a, b in zip(out["reference"], out[k]))})  # fmt: skip

    mc = {task: [TASKS[task](r) for r in rows] for task, rows in sets["multiple_choice"].items()}
    if mc:
        items = [(task, item) for task, its in mc.items() for item in its]

        def score(name, m, t):
            per = {task: score_items(m, t, its, task, progress=False, batch_items=8 if fast[name] else 1)[1]
                   for task, its in mc.items()}  # fmt: skip
            return [r for task in mc for r in per[task]]

        out, secs, roofs = run_pair("multiple_choice", True, paths, score)
        tok = paths["reference"][1]
        cont_tokens = sum(len(tok(" " + c, add_special_tokens=False)["input_ids"]) for _, i in items
                          for c in i["choices"])  # fmt: skip
        choice = {k: [max(range(len(r["scores"])), key=r["scores"].__getitem__) for r in v] for k, v in out.items()}

        def mc_agreement(k):
            pairs = [(a, b) for ra, rb in zip(out["reference"], out[k]) for a, b in zip(ra["scores"], rb["scores"])]
            return {"items": len(items), "choices_differ": sum(a != b for a, b in zip(choice["reference"], choice[k])),
                    "max_score_diff": max(abs(a - b) for a, b in pairs)}  # fmt: skip

        stages["multiple_choice"] = stage_record(secs, roofs, dict.fromkeys(out, cont_tokens), mc_agreement)

    conversations = sets["loss"]
    if conversations:
        max_length = spec["max_length"]

        def loss(name, m, t):
            if not fast[name]:
                return eval_loss(m, t, conversations, max_length, batch, fast=False), None
            pairs = conversation_losses(m, t, conversations, max_length, batch)
            return sum(x for x, _ in pairs) / sum(n for _, n in pairs), sum(n for _, n in pairs)

        out, secs, roofs = run_pair("loss", False, paths, loss)
        scored = next(v[1] for k, v in out.items() if fast[k])  # positions scored: the same on every fast path
        stages["loss"] = stage_record(secs, roofs, dict.fromkeys(out, scored), lambda k: {
            "conversations": len(conversations), "loss": {j: out[j][0] for j in ("reference", k)},
            "abs_diff": abs(out["reference"][0] - out[k][0]),
        })  # fmt: skip

    return stages


def synthetic(folder: Path) -> tuple[str, str, dict, dict]:
    """A small random Qwen2-shaped model on the toy tokenizer, a random LoRA adapter, and sets built from the
    toy corpus: every stage runs in seconds."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from logitguard.toy.corpus import corpus_texts, make_corpus
    from logitguard.toy.tokenizer import build_tokenizer

    corpus = make_corpus()
    tokenizer = build_tokenizer(folder / "model", corpus_texts(corpus))
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(folder / "model")
    adapter = get_peft_model(Qwen2ForCausalLM(config), LoraConfig(r=8, init_lora_weights=False,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))  # fmt: skip
    adapter.save_pretrained(folder / "adapter")

    def user(r):
        return r["messages"][0]["content"]

    prompts = [user(r) for split in ("harmful", "benign") for r in corpus[split]["test"]][:40]
    texts = [user(r) for r in corpus["benign"]["test"]]
    humaneval = [{"task_id": f"t/{i}", "prompt": f"def f{i}(x):\n    \"\"\"{texts[i]}\"\"\"\n", "entry_point": f"f{i}",
                  "test": f"def check(c):\n    assert c(1) == {i}\n"} for i in range(4)]  # fmt: skip
    mc = {"truthfulqa": [{"id": str(i), "question": texts[i], "choices": texts[i + 1 : i + 4], "expected_index": 0}
                         for i in range(8)]}  # fmt: skip
    loss = [r["messages"] for r in corpus["benign"]["test"][:16]]
    sets = {"prompts": prompts, "humaneval": humaneval, "gsm8k": [], "multiple_choice": mc, "loss": loss}
    spec = {"batch_size": 8, "max_new_tokens": 16, "utility_max_new_tokens": 32, "max_length": 96}
    return str(folder / "model"), str(folder / "adapter"), sets, spec


def from_experiment(
    name: str, scale: float, adapter: str | None, folder: Path, variant: str | None = None
) -> tuple[str, str, dict, dict]:
    """The experiment file's evaluation spec and sets (each cut to `scale` of its size) on its model; adapter
    'random' makes a LoRA adapter of the experiment's rank on the model's attention and MLP projections."""
    import dataclasses

    from logitguard.eval.pipeline import conversations
    from logitguard.eval.prompts import read_prompt_sets, read_prompts
    from logitguard.eval.utility_suite import load_utility_sets, parse_utility
    from logitguard.experiment import Placeholders, load_experiment

    exp = load_experiment(name, variant)
    ph = Placeholders(exp)
    model_dir, spec = ph.model(), ph.eval_spec()

    def cut(xs):
        return xs[: max(1, round(len(xs) * scale))] if xs else xs

    prompts = [p for ps in read_prompt_sets(spec.harmful).values() for p in cut(ps)]
    for path in (spec.benign, spec.borderline):
        prompts += cut(read_prompts(path)) if path else []
    utility = load_utility_sets(parse_utility(spec.utility)) if spec.utility else {}
    loss = [c for p in (spec.loss_data or "").split(",") if p.strip() for c in cut(conversations(p.strip(), None))]
    sets = {
        "prompts": prompts,
        "humaneval": cut(utility.get("humaneval", [])),
        "gsm8k": cut(utility.get("gsm8k", [])),
        "multiple_choice": {k: cut(v) for k, v in utility.items() if k in ("hellaswag", "truthfulqa")},
        "loss": loss,
    }
    if adapter == "random":
        from peft import LoraConfig, get_peft_model

        from logitguard.models import load_model

        torch.manual_seed(0)
        peft = get_peft_model(load_model(model_dir, "float32"), LoraConfig(
            r=exp.train.get("rank", 8), lora_alpha=exp.train.get("alpha", 16), init_lora_weights="gaussian",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))  # fmt: skip
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=1e-3)  # trained adapters are not zero: the output must change
        peft.save_pretrained(folder / "adapter")
        adapter = str(folder / "adapter")
    return model_dir, adapter, sets, dataclasses.asdict(spec)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", help="an experiment file's name: its model and evaluation sets")
    parser.add_argument("--variant", help="the experiment's variant (its sets), e.g. large")
    parser.add_argument("--adapter", default="random", help="adapter folder, 'random' (default) or 'none'")
    parser.add_argument("--scale", type=float, default=1.0, help="share of each set to use (default: all)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float16"],
        help="also time the fast path in this dtype (fast on CPUs with bf16 instructions)",
    )
    parser.add_argument("--batch-size", type=int, help="rows the fast paths decode at once (default: the spec's)")
    parser.add_argument(
        "--no-float32",
        action="store_true",
        help="leave the float32 fast path out (needs --dtype; its exactness is shown at a smaller --scale)",
    )
    parser.add_argument("--device", default="cpu", help="where every path runs: cpu (default) or cuda")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.no_float32 and not args.dtype:
        parser.error("--no-float32 needs --dtype: the fast path must run in some dtype")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("highest")  # float32 means float32 on a GPU too (no TF32's 10-bit rounding)
    machine = measure_machine(device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        if args.experiment:
            adapter = None if args.adapter == "none" else args.adapter
            model_dir, adapter, sets, spec = from_experiment(
                args.experiment, args.scale, adapter, Path(tmp), args.variant
            )
            what = {
                "experiment": args.experiment,
                "variant": args.variant,
                "scale": args.scale,
                "adapter": args.adapter,
            }
        else:
            model_dir, adapter, sets, spec = synthetic(Path(tmp))
            what = {"experiment": None, "model": "random Qwen2-shaped, hidden 64, 2 layers, toy tokenizer"}
        sizes = {k: (sum(len(x) for x in v.values()) if isinstance(v, dict) else len(v)) for k, v in sets.items()}
        result = bench(model_dir, adapter, sets, spec, machine, args.dtype, args.batch_size, not args.no_float32,
                       args.device)  # fmt: skip
        spec["fast_batch_size"] = args.batch_size or spec["batch_size"]
    import transformers

    keep = ("batch_size", "fast_batch_size", "max_new_tokens", "utility_max_new_tokens", "max_length")
    report = {"what": what, "set_sizes": sizes, "spec": {k: spec[k] for k in keep}, "machine": {**machine, "cpu":
              platform.processor() or platform.machine()}, "versions": {"torch": torch.__version__, "transformers":
              transformers.__version__}, **result}  # fmt: skip
    emit(report, args.json)
    return 0


def emit(report: dict, path: str | None) -> None:
    """Print the report as JSON and, given a path, write it there too."""
    text = json.dumps(report, indent=2)
    print(text)
    if path:
        Path(path).write_text(text + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
