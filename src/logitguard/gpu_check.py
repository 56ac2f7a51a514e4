"""`python -m logitguard.gpu_check`: the checks that need a GPU, in one command (about 10 minutes on one H100 / H200).

Run it from a source checkout (it uses bench/, examples/ and tests/). It writes `bench/results/gpu_check.json`:
the versions and GPUs, and per step its outcome (ok / failed / skipped), seconds, the numbers it measured and,
when it failed, the tail of its output. Each step runs in its own process under its own timeout, so a failed,
hung or out-of-memory step does not stop the others; the file is rewritten after every step. Single-GPU steps
see one GPU (the first visible); with two or more GPUs the DDP and FSDP2 steps launch on all of them. A whole
run stays inside `--budget` seconds: a step gets what is left, and is skipped when too little is.

Without a CUDA device it prints one line, runs nothing and exits 0.

    python -m logitguard.gpu_check
    python -m logitguard.gpu_check --only train_1b_4bit,monitor_cuda --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the source checkout (src/logitguard/gpu_check.py)
BUDGET = 570  # seconds for a whole run: ten minutes, less start-up
MIN_STEP = 20  # a step with less time than this left is skipped
TAIL = 3000  # characters of a failed step's output kept in the report
MARK = "GPU_CHECK "  # a child's line of numbers: MARK + JSON

# Llama-3.2-1B's shape, random weights: what `logitguard train` meets with a real 1B model (vocabulary 128,256)
SHAPE_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0)  # fmt: skip


@dataclasses.dataclass
class Context:
    root: Path  # the source checkout
    work: Path  # scratch folder of this run (model, data, outputs)
    gpus: int  # visible CUDA devices
    python: str = sys.executable
    failed_tests: list[str] = dataclasses.field(default_factory=list)  # test ids the suite's steps saw fail

    @property
    def model(self) -> Path:
        return self.work / "model_1b"


@dataclasses.dataclass
class Step:
    name: str
    command: Callable[[Context], list[str]]  # argv, run in the checkout's root
    timeout: int  # seconds
    numbers: Callable[[Context, str], dict] = lambda ctx, output: last_marked(output)  # what it measured
    gpus: int = 1  # skipped with fewer visible GPUs; a 1-GPU step sees only the first
    after: tuple[str, ...] = ()  # steps it needs (their outputs); skipped when one of them did not pass
    files: tuple[str, ...] = ()  # checkout files it needs
    capped_ok: bool = False  # a run cut by its time cap with no failure seen counts as ok (the test suite)


def last_marked(output: str) -> dict:
    """The numbers a child printed last (a line MARK + JSON), or {}."""
    lines = [line[len(MARK) :] for line in output.splitlines() if line.startswith(MARK)]
    return json.loads(lines[-1]) if lines else {}


def _json_file(name: str) -> Callable[[Context, str], dict]:
    def read(ctx: Context, output: str) -> dict:
        path = ctx.work / name
        return json.loads(path.read_text()) if path.is_file() else {}

    return read


def _child(*args: str) -> Callable[[Context], list[str]]:
    return lambda ctx: [ctx.python, "-m", "logitguard.gpu_check", "--child", *args, "--work", str(ctx.work)]


def _train(name: str, *flags: str, steps: int = 20) -> Callable[[Context], list[str]]:
    """`logitguard train` (through a child that reports peak memory) on the random 1B model, bf16 mixed."""

    def argv(ctx: Context) -> list[str]:
        return _child("cli")(ctx) + ["--", *train_flags(ctx, name, steps), *flags]

    return argv


def train_flags(ctx: Context, name: str, steps: int) -> list[str]:
    return [
        "train", "--model", str(ctx.model), "--data", str(ctx.work / "train.jsonl"),
        "--output-dir", str(ctx.work / name), "--cache-dir", str(ctx.work / "cache"), "--max-length", "256",
        "--batch-size", "4", "--precision", "bf16", "--safety-words", "I,cannot", "--reg-weight", "1.0",
        "--logging-steps", "5", "--save-steps", "1000", "--disable-tqdm", "true", "--max-steps", str(steps),
    ]  # fmt: skip


def _launch(config: str, name: str, *flags: str) -> Callable[[Context], list[str]]:
    """`accelerate launch` with a shipped config, one process per visible GPU."""

    def argv(ctx: Context) -> list[str]:
        return [
            ctx.python, "-m", "accelerate.commands.launch", "--config_file", str(ctx.root / config),
            "--num_processes", str(ctx.gpus), "-m", "logitguard.cli", *train_flags(ctx, name, 10), *flags,
        ]  # fmt: skip

    return argv


def _train_result(ctx: Context, output: str) -> dict:
    """From `logitguard train`'s result line and the child's peak-memory line."""
    rows = [json.loads(line) for line in output.splitlines() if line.startswith('{"output_dir"')]
    out = dict(last_marked(output))
    if rows:
        r = rows[-1]
        out.update({k: r.get(k) for k in ("global_step", "train_seconds", "step_seconds", "train_loss")})
        if r.get("safety_monitor"):
            out["monitor_checks"] = [{k: c[k] for k in ("step", "refusal", "seconds")} for c in r["safety_monitor"]]
    return out


def _pytest_numbers(ctx: Context, output: str) -> dict:
    """Counts from pytest's summary line, how far it got, and the ids of the tests that failed. The ids come from
    the verbose per-test lines, so a run cut by its time cap (no summary) still names them."""
    summary = re.findall(r"(\d+) (passed|failed|error|errors|skipped|deselected)", output)
    percent = re.findall(r"\[\s*(\d+)%\]", output)
    out = {kind: int(n) for n, kind in summary}
    if percent:
        out["progress_percent"] = int(percent[-1])
    failed = failed_test_ids(output)
    if failed:
        out["failed_tests"] = failed
        ctx.failed_tests.extend(t for t in failed if t not in ctx.failed_tests)
    return out


def failed_test_ids(output: str) -> list[str]:
    """Test ids marked FAILED or ERROR in pytest's verbose output, in order, once each: "tests/a.py::t FAILED"
    (one process), "[gw3] [ 5%] FAILED tests/a.py::t" (pytest-xdist) and the summary's "FAILED tests/a.py::t - ..."."""
    ids = re.findall(r"^(tests/\S+::\S+) (?:FAILED|ERROR)\b", output, re.M)
    ids += re.findall(r"(?:^|\] )(?:FAILED|ERROR) (tests/\S+::\S+)", output, re.M)
    return list(dict.fromkeys(ids))


def _bench(script: str, result: str, *flags: str) -> Callable[[Context], list[str]]:
    """A bench/ script, writing its JSON into the work folder."""
    return lambda ctx: [ctx.python, script, *flags, "--json", str(ctx.work / result)]


MONITOR = ("--monitor-harmful", "{work}/harmful.txt", "--monitor-benign", "{work}/benign.txt", "--monitor-every", "5")
STEP_TIME = ("--gpu", "--variants", "lora,cached,online,paper", "--rounds", "8", "--steps", "4")
NEEDS_MODEL = ("model_1b",)

# fmt: off
STEPS: list[Step] = [
    Step("model_1b", _child("model"), 180),
    Step("train_1b_bf16", _train("train_bf16"), 150, _train_result, after=NEEDS_MODEL),
    Step("train_1b_4bit", _train("train_4bit", "--quantize", "4bit"), 150, _train_result, after=NEEDS_MODEL),
    Step("train_1b_gradient_checkpointing", _train("train_gc", "--gradient-checkpointing", "true"), 150,
         _train_result, after=NEEDS_MODEL),
    Step("cache_build", _child("cache"), 150, after=NEEDS_MODEL),
    Step("monitor_cuda", _train("train_monitor", *MONITOR, steps=10), 150, _train_result, after=NEEDS_MODEL),
    Step("step_time_gpu", _bench("bench/step_time.py", "step_time_gpu.json", *STEP_TIME), 300,
         _json_file("step_time_gpu.json"), files=("bench/step_time.py",)),
    Step("memory_cuda", _bench("bench/memory.py", "memory_cuda.json", "--device", "cuda", "--rounds", "3"), 200,
         _json_file("memory_cuda.json"), files=("bench/memory.py",)),
    Step("ddp", _launch("examples/accelerate/ddp.yaml", "ddp"), 200, _train_result, gpus=2, after=NEEDS_MODEL,
         files=("examples/accelerate/ddp.yaml",)),
    Step("fsdp2", _launch("examples/accelerate/fsdp.yaml", "fsdp2", *MONITOR), 200, _train_result, gpus=2,
         after=NEEDS_MODEL, files=("examples/accelerate/fsdp.yaml",)),
]
# fmt: on

# ---- More GPU-only checks go here -------------------------------------------------------------------------------
# Append Step(...) entries: a name, an argv builder (run in the checkout's root), a timeout in seconds, and how to
# read its numbers (default: the last line "GPU_CHECK {json}" it printed). `after=("model_1b",)` gives it the random
# 1B model in ctx.model and the data in ctx.work (train.jsonl, harmful.txt, benign.txt).
# The per-token terms in bf16 on the random 1B model (vocabulary 128,256): the cache's label log-probs and top-32 from
# the chunked head path, constrained_sft's per-token NLL and kl's fused projection under autocast (CPU tests run fp32).
EXTRA_STEPS: list[Step] = [
    Step("train_1b_constrained_sft", _train("train_csft", "--regularizer", "constrained_sft", steps=10), 150,
         _train_result, after=NEEDS_MODEL),
    Step("train_1b_kl", _train("train_kl", "--regularizer", "kl", steps=10), 150, _train_result, after=NEEDS_MODEL),
    # evaluation on CUDA: the fast path (adapter folded in float32, continuous batching; bf16 with the adapter kept
    # apart) against the reference path on the bench's small random model, outputs compared, every stage timed
    Step("eval_speed_cuda", _bench("bench/eval_speed.py", "eval_speed_cuda.json", "--device", "cuda", "--dtype",
         "bfloat16"), 150, _json_file("eval_speed_cuda.json"), files=("bench/eval_speed.py",)),
]  # fmt: skip
# -----------------------------------------------------------------------------------------------------------------

# Last: the test suite on CUDA with the time that is left; first the files that reach the GPU path, then the rest,
# then the tests that failed, again in one process: a failure that does not come back there came from running
# beside other tests (pytest-xdist), not from the GPU. Verbose, so a run cut by its cap still names its failures;
# not -x, so one failure does not hide the rest (device time is what such a run is short of).
GPU_TESTS = ("tests/test_gpu_path.py", "tests/test_syncs.py", "tests/test_trainer.py", "tests/test_monitor.py")
PYTEST = ("-m", "pytest", "-v", "-p", "no:cacheprovider", "-p", "no:benchmark")


def _pytest(*args: str, parallel: bool = True) -> Callable[[Context], list[str]]:
    """pytest on these files, over the machine's cores where pytest-xdist is installed (one GPU serves them all)."""

    def argv(ctx: Context) -> list[str]:
        workers = ["-n", str(min(os.cpu_count() or 1, 16))] if parallel and _has("xdist") else []
        return [ctx.python, *PYTEST, *workers, *args]

    return argv


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _failed_again(ctx: Context) -> list[str]:
    """The failed tests once more, in one process; no command (skipped) when none failed."""
    return _pytest(*ctx.failed_tests, parallel=False)(ctx) if ctx.failed_tests else []


# fmt: off
TESTS = [
    Step("pytest_gpu_path", _pytest(*GPU_TESTS), 200, _pytest_numbers, files=GPU_TESTS),
    Step("pytest_rest", _pytest("tests", *(f"--ignore={t}" for t in GPU_TESTS)), 300, _pytest_numbers,
         files=("tests",), capped_ok=True),
    Step("pytest_failed_alone", _failed_again, 150, _pytest_numbers, files=("tests",)),
]
# fmt: on


def all_steps() -> list[Step]:
    return [*STEPS, *EXTRA_STEPS, *TESTS]


def versions() -> dict:
    import importlib.metadata as md

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "peft", "accelerate", "trl", "bitsandbytes", "logitguard"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    out["gpus"] = []
    for i in range(torch.cuda.device_count()):
        memory = torch.cuda.get_device_properties(i).total_memory / 2**30
        out["gpus"].append({"name": torch.cuda.get_device_name(i), "memory_gb": round(memory, 1)})
    try:
        smi = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        out["driver"] = subprocess.run(smi, capture_output=True, text=True, timeout=20).stdout.split("\n")[0].strip()
    except (OSError, subprocess.SubprocessError):
        out["driver"] = None
    return out


def _env(step: Step) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if step.gpus == 1:  # one GPU: a Trainer seeing several in one process would use nn.DataParallel
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    return env


def run_step(step: Step, ctx: Context, timeout: float) -> dict:
    """Run one step; its outcome, seconds, numbers and (when it failed) the tail of its output."""
    argv = [a.replace("{work}", str(ctx.work)) for a in step.command(ctx)]
    start = time.perf_counter()
    # its own process group: on a timeout the whole group goes (accelerate's workers hold GPU memory too)
    proc = subprocess.Popen(argv, cwd=ctx.root, env=_env(step), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        rc, timed_out = proc.returncode, False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        rc, timed_out = None, True
    output = stdout + stderr
    seconds = round(time.perf_counter() - start, 1)
    try:
        numbers = step.numbers(ctx, output)
    except Exception as e:  # a parse problem is reported, not fatal
        numbers = {"unreadable": f"{type(e).__name__}: {e}"}
    ok = rc == 0 or (timed_out and step.capped_ok and not numbers.get("failed") and not numbers.get("error"))
    row = {"outcome": "ok" if ok else "failed", "seconds": seconds, "numbers": numbers,
           "command": portable(argv, ctx)}  # fmt: skip
    if timed_out:
        row["timed_out_after"] = round(timeout)
    if not ok:
        tail = portable_text(output[-TAIL:], ctx)
        row["error_tail"] = tail if not timed_out else f"timed out after {timeout:.0f} s\n{tail}"
    return row


def portable(argv: list[str], ctx: Context) -> list[str]:
    """A command as the report records it: the scratch folder as {work}, the checkout as `.` and the interpreter
    as `python`, so the report names no folder of the machine it ran on (it is committed as
    bench/results/gpu_check.json)."""
    return ["python" if a == ctx.python else portable_text(a, ctx) for a in argv]


def portable_text(text: str, ctx: Context) -> str:
    return text.replace(str(ctx.work), "{work}").replace(str(ctx.root), ".")


def run_all(steps: list[Step], ctx: Context, out: Path, budget: float = BUDGET) -> dict:
    from .files import write_json_atomic

    deadline = time.monotonic() + budget
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_seconds": budget, "versions": versions(),
              "steps": {}}  # fmt: skip
    for step in steps:
        left = deadline - time.monotonic()
        why = None
        if step.gpus > ctx.gpus:
            why = f"needs {step.gpus} GPUs, {ctx.gpus} visible"
        elif missing := [f for f in step.files if not (ctx.root / f).exists()]:
            why = f"needs {', '.join(missing)} (run from a source checkout)"
        elif failed := [a for a in step.after if report["steps"].get(a, {}).get("outcome") != "ok"]:
            why = f"needs {', '.join(failed)}, which did not pass"
        elif left < MIN_STEP:
            why = f"{left:.0f} s left of the {budget:.0f} s budget"
        elif not step.command(ctx):
            why = "nothing to run"
        if why:
            report["steps"][step.name] = {"outcome": "skipped", "seconds": 0.0, "numbers": {}, "why": why}
        else:
            print(f"gpu_check: {step.name} ...", flush=True)
            report["steps"][step.name] = run_step(step, ctx, min(step.timeout, left - 5))
            print(f"gpu_check: {step.name} {report['steps'][step.name]['outcome']}", flush=True)
        write_json_atomic(out, report)  # after every step: a killed run keeps what it measured
    outcomes = [row["outcome"] for row in report["steps"].values()]
    report["summary"] = {k: outcomes.count(k) for k in ("ok", "failed", "skipped")}
    write_json_atomic(out, report)
    return report


# ---- children: the steps that are Python code, each in its own process --------------------------------------------


def child_model(work: Path, shape: dict = SHAPE_1B, device: str = "cuda") -> dict:
    """The random 1B model (bf16, built on the GPU) with the toy tokenizer, and the data the steps train on."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .toy.corpus import corpus_texts, make_corpus, write_jsonl
    from .toy.tokenizer import build_tokenizer

    start = time.perf_counter()
    corpus = make_corpus(0)
    tokenizer = build_tokenizer(work / "model_1b", corpus_texts(corpus))
    config = LlamaConfig(**shape, max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):  # built in bf16 where it is made: no fp32 copy
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(work / "model_1b")
    write_jsonl(corpus["benign"]["train"] + corpus["attack"]["train"], work / "train.jsonl")
    (work / "harmful.txt").write_text("\n".join(it["messages"][0]["content"] for it in corpus["harmful"]["test"][:16]))
    (work / "benign.txt").write_text("\n".join(it["messages"][0]["content"] for it in corpus["benign"]["test"][:8]))
    return {"parameters": sum(p.numel() for p in model.parameters()), "seconds": round(time.perf_counter() - start, 1)}


def child_cache(work: Path, device: str = "cuda") -> dict:
    """The reference cache build's throughput on the 1B model: tokens per second, and how much of the time the
    model fingerprint (a hash of every weight) takes."""
    import torch

    from .cache import build_reference_cache, model_fingerprint
    from .data import load_rows, tokenize_rows
    from .models import load_model, load_tokenizer
    from .tokens import SafetyTokens

    tokenizer = load_tokenizer(str(work / "model_1b"))
    model = load_model(str(work / "model_1b"), "bfloat16", device=torch.device(device))
    examples = tokenize_rows(tokenizer, load_rows(work / "train.jsonl") * 4, 256)
    ids = list(SafetyTokens.from_words(tokenizer, "I,cannot").ids)
    start = time.perf_counter()
    model_fingerprint(model)
    fingerprint_seconds = time.perf_counter() - start
    start = time.perf_counter()
    build_reference_cache(model, tokenizer, examples, ids, work / "cache_throughput", 256, batch_size=16,
                          progress=False)  # fmt: skip
    seconds = time.perf_counter() - start  # the build ends with its shards on disk: nothing left on the device
    tokens = sum(len(ex["input_ids"]) for ex in examples)
    return {
        "examples": len(examples), "tokens": tokens, "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds), "fingerprint_seconds": round(fingerprint_seconds, 2),
        "tokens_per_second_after_fingerprint": round(tokens / max(seconds - fingerprint_seconds, 1e-6)),
        "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
    }  # fmt: skip


def child_cli(argv: list[str]) -> int:
    """`logitguard ARGV` in this process, then its peak GPU memory as a numbers line."""
    import torch

    from .cli import main

    rc = main(argv)
    if torch.cuda.is_available():
        print(MARK + json.dumps({"peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}))
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m logitguard.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="report file (default: bench/results/gpu_check.json in the checkout)")
    parser.add_argument("--work", help="scratch folder (default: a new temporary folder)")
    parser.add_argument("--only", help="comma-separated step names (with the steps they need)")
    parser.add_argument("--budget", type=float, default=BUDGET, help="seconds for the whole run")
    parser.add_argument("--child", choices=["model", "cache", "cli"], help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = parser.parse_args(argv)
    if args.child:
        work = Path(args.work)
        if args.child == "cli":
            return child_cli(rest)
        numbers = child_model(work) if args.child == "model" else child_cache(work)
        print(MARK + json.dumps(numbers))
        return 0

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; nothing was run")
        return 0
    import tempfile

    steps = all_steps()
    if args.only:
        names = set(args.only.split(","))
        unknown = sorted(names - {s.name for s in steps})
        if unknown:
            parser.error(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(s.name for s in steps)}")
        names |= {a for s in steps if s.name in names for a in s.after}
        steps = [s for s in steps if s.name in names]
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / "gpu_check.json"
    ctx = Context(root=ROOT, work=work, gpus=torch.cuda.device_count())
    report = run_all(steps, ctx, out, args.budget)
    print(f"gpu_check: {report['summary']} -> {out}")
    return 0 if not report["summary"]["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
