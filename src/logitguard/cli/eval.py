"""`logitguard eval`: greedy generation on harmful (and optional benign / borderline) prompt files, keyword
refusal scoring, utility and commonsense benchmarks; summary.json, records.jsonl (harmful responses redacted) and
items.json (per-item outcomes) in --out, through eval/pipeline.py as the experiment runner evaluates.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ConfigError
from ..eval.keyword import DETECTORS, REFUSAL_LISTS
from ..eval.pipeline import judge_measured, measure, read_inputs
from ..eval.stages import evaluation_key
from ..experiment import EvalSpec
from ..files import ContentHashes, write_json_atomic
from ..models import DTYPES, release_memory


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="safety (keyword refusal / ASR, judge HRR, over-refusal) and commonsense accuracy"
    )
    p.add_argument("--model", help="base model folder or hub name")
    p.add_argument("--gguf-file", help="a GGUF model file instead of --model (converted once, then cached)")
    p.add_argument("--adapter", help="PEFT adapter folder (e.g. a `logitguard train` output folder)")
    p.add_argument(
        "--harmful",
        help="harmful prompts: .txt (one a line), .jsonl/.json, .csv or a set name "
        "(advbench, harmbench, donotanswer, pasttense, strongreject, uncensorbench; NAME:N samples N); "
        "a comma list is scored per set and pooled",
    )
    p.add_argument("--benign", help="benign prompts, for over-refusal (a file, or the set pyrit-benign)")
    p.add_argument("--borderline", help="safe but harmful-sounding prompts, for over-refusal (a file, or lookalike)")
    p.add_argument(
        "--keywords",
        default="qi2023",
        choices=sorted(REFUSAL_LISTS) + sorted(DETECTORS),
        help="refusal keyword list (qi2023, qi2024), or the opening-phrase detector (opening)",
    )
    p.add_argument(
        "--engine",
        help="generation on an OpenAI-compatible server instead of in-process: endpoint:URL[#MODEL], e.g. "
        "endpoint:http://localhost:8000/v1#my-adapter (vLLM serving the adapter by name; docs/endpoint.md). "
        "Only generation moves there: --commonsense and hellaswag / truthfulqa (multiple-choice scoring) still "
        "load --model in-process; without them --model is not loaded at all",
    )
    p.add_argument("--judge", help="HRR judge: llama-guard:PATH or endpoint:URL[#MODEL] (OpenAI-compatible)")
    p.add_argument("--judge-timeout", type=float, default=60.0, help="endpoint judge: seconds per request")
    p.add_argument("--commonsense", help="folder of the LLM-Adapters commonsense test sets")
    p.add_argument("--commonsense-mode", default="loglik", choices=["loglik", "generate"])
    p.add_argument(
        "--utility",
        help="comma list of utility benchmarks: humaneval (pass@1, sandboxed), gsm8k, "
        "hellaswag, truthfulqa (NAME:N samples N)",
    )
    p.add_argument("--utility-max-new-tokens", type=int, default=512, help="humaneval / gsm8k answer length")
    p.add_argument(
        "--assets",
        help="folder the set names are read from (default $LOGITGUARD_ASSETS or "
        "experiments/assets; filled by experiments/real_model/fetch_assets.py)",
    )
    p.add_argument("--limit", type=int, help="at most this many prompts / items per file (smoke runs)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--continuous-batching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="waiting prompts join the batch as rows end (default); --no-continuous-batching decodes batch by batch",
    )
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="default: the checkpoint's (bf16 as float16 on GPUs without it), float32 on CPU")  # fmt: skip
    p.add_argument("--cache-dir", help="where GGUF conversions are kept (default: logitguard's cache)")
    add_trust_remote_code(p)
    p.add_argument(
        "--out",
        required=True,
        help="folder for summary.json, records.jsonl, items.json and "
        "stages/ (finished stages, read back when the same command runs again after a kill)",
    )
    p.set_defaults(func=run)


def add_trust_remote_code(p) -> None:
    """The flag of every command that loads a model by name (train has it from TrainConfig)."""
    p.add_argument(
        "--trust-remote-code", action="store_true", help="run the model folder's own code (config.json's auto_map)"
    )


def run(args) -> int:
    from ..config import default_cache_dir
    from ..eval.endpoint import generation_engine, in_process_parts, parse_engine
    from ..eval.generate import load_model_for_eval
    from ..eval.safety import write_eval

    if not args.harmful and not args.commonsense and not args.utility:
        raise ConfigError("eval needs --harmful prompts, --commonsense test sets or --utility benchmarks")
    engine = parse_engine(args.engine)
    in_process = in_process_parts(commonsense=args.commonsense, utility=args.utility) if engine else ["all"]
    if in_process and bool(args.model) == bool(args.gguf_file):
        why = f" (--engine generates, but {', '.join(in_process)} runs in-process)" if engine else ""
        raise ConfigError(f"eval needs exactly one of --model and --gguf-file{why}")
    if engine and not in_process and args.adapter:
        raise ConfigError(
            "--adapter is not used with --engine when everything is generated there: serve the adapter and name "
            "it in endpoint:URL#NAME (docs/endpoint.md)"
        )
    if args.judge and not args.harmful:
        raise ConfigError("--judge scores responses to --harmful prompts; give that file too")
    # Read every input before loading the model, so a typo fails in a second, not after the load.
    spec = EvalSpec(
        harmful=args.harmful, benign=args.benign, borderline=args.borderline, commonsense=args.commonsense,
        commonsense_mode=args.commonsense_mode, utility=args.utility, limit=args.limit,
        utility_max_new_tokens=args.utility_max_new_tokens, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, keywords=args.keywords, continuous_batching=args.continuous_batching,
    )  # fmt: skip
    inputs = read_inputs(spec, args.assets)
    judge = None
    if args.judge:
        from ..eval.judge import make_judge

        options = {"timeout": args.judge_timeout} if args.judge.startswith("endpoint:") else {}
        judge = make_judge(args.judge, **options)
    model, tokenizer = None, None  # an engine that generates everything needs no model here
    model_path = args.model
    if in_process:
        if args.gguf_file:
            from ..models import gguf_folder

            model_path = str(gguf_folder(args.gguf_file, args.cache_dir or default_cache_dir()))
        model, tokenizer = load_model_for_eval(
            model_path, args.adapter, args.dtype, trust_remote_code=args.trust_remote_code
        )
    hashes = ContentHashes(Path(args.cache_dir or default_cache_dir()) / "content-hashes.json")  # kept across runs
    with generation_engine(engine):  # inside, generate_responses posts to the engine's server (None: in-process)
        # the same command again after a kill resumes at its first unfinished stage; a judged one starts over (the
        # judge reads whole responses, which are never kept on disk)
        resume = None if judge else evaluation_key(model_path, args.adapter, model, spec, inputs, hashes)
        result = measure(model, tokenizer, spec, inputs, args.out, resume=resume)
    if judge is not None:  # Llama Guard loads into the memory the evaluated model held
        del model
        release_memory()
        judge_measured(result, judge)  # no folder: the summary and records are written just below
    summary, records = result.summary, result.records
    summary.update(model=args.model, gguf_file=args.gguf_file, adapter=args.adapter, limit=args.limit)
    if result.dtype:
        summary["dtype"] = result.dtype  # what an unset --dtype resolved to on this machine
    if engine:
        summary["engine"] = engine.name
    sets = {name: getattr(args, name) for name in ("harmful", "benign", "borderline")}
    summary["prompt_files"] = {**sets, "commonsense": args.commonsense, "utility": args.utility}
    summary_path, records_path = write_eval(args.out, summary, records)
    if result.items:  # per-item outcomes (no text), for paired comparisons of two runs (logitguard.stats)
        write_json_atomic(Path(args.out) / "items.json", result.items)
    print(json.dumps(summary))
    print(f"summary in {summary_path}, per-prompt records (harmful responses cut to 10 words) in {records_path}"
          + (", per-item outcomes in items.json" if result.items else ""))  # fmt: skip
    return 0
