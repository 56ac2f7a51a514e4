"""The `logitguard` command line: tokens | train | eval | demo | safelora | bench | sweep."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing

from .config import ConfigError, TrainConfig, load_config


def _add_tokens(sub) -> None:
    p = sub.add_parser(
        "tokens",
        help="show which token ids safety words resolve to, or mine them from refusals ('tokens mine')",
    )
    p.add_argument("action", nargs="?", choices=["mine"], help="mine: rank tokens by refusal specificity")
    p.add_argument("--model", required=True, help="model or tokenizer folder, or hub name")
    p.add_argument("--words", default="I,cannot,can't", help="comma-separated safety words")
    p.add_argument("--strategy", default="first", help="first | all | whole")
    p.add_argument(
        "--allow-punctuation",
        action="store_true",
        help="also choose pieces that are only whitespace or punctuation (skipped by default)",
    )
    p.add_argument("--random", type=int, metavar="SEED", help="print a random control set of the same size")
    p.add_argument("--harmful", help="mine: harmful prompts file (text, JSONL, JSON or CSV)")
    p.add_argument("--benign", help="mine: benign prompts file")
    p.add_argument("--base", help="mine: the unaligned base model, to rank by aligned-minus-base probability too")
    p.add_argument(
        "--rule",
        choices=["log_odds", "pact"],
        default="log_odds",
        help="mine: log_odds (refusal vs. answer openings; needs --benign) or pact (PACT's top-k by the aligned "
        "model's probability on its own refusals, weights from the aligned-minus-base difference with --base)",
    )
    p.add_argument(
        "--pairs",
        metavar="FILE",
        help="mine, --rule pact: fixed (prompt, refusal) pairs instead of --harmful (no generation, no refusal "
        'filter), as PACT\'s authors mine: their layout (a JSON list of {"input", "output"}, safe_direction.json) or '
        'ours (JSONL of {"messages": [user, assistant]} or {"prompt", "response"})',
    )
    p.add_argument(
        "--max-pairs",
        type=int,
        help="mine, with --pairs: use the first N pairs (default 512, the authors' --K 512)",
    )
    from .eval.keyword import DETECTORS, REFUSAL_LISTS

    p.add_argument(
        "--keywords",
        choices=sorted(DETECTORS) + sorted(REFUSAL_LISTS),
        help="mine: the refusal filter for the model's own answers: the opening-phrase detector (opening, the "
        "default) or a keyword list (qi2023, qi2024); recorded in the --save file",
    )
    p.add_argument("--top", type=int, help="mine: size of the token set (default 5; 50 with --rule pact)")
    p.add_argument("--window", type=int, default=3, help="mine: response positions counted as the opening")
    p.add_argument("--json", action="store_true", help='print {"ids": [...], "rows": [...]}')
    p.add_argument("--save", metavar="FILE", help="write the token set JSON (accepted by train's token_file)")
    p.set_defaults(func=_run_tokens)


def _run_tokens(args) -> int:
    from .models import load_tokenizer
    from .tokens import SafetyTokens

    if args.action == "mine":
        return _run_mine(args)
    tokenizer = load_tokenizer(args.model)
    tokens = SafetyTokens.from_words(tokenizer, args.words, args.strategy, allow_punctuation=args.allow_punctuation)
    if args.random is not None:
        tokens = SafetyTokens.random(tokenizer, len(tokens), seed=args.random, exclude=tokens)
    _show_tokens(tokens, args)
    return 0


def _show_tokens(tokens, args) -> None:
    if args.save:
        tokens.save(args.save)
    if args.json:
        shown = {"ids": list(tokens.ids), "tokens": list(tokens.tokens), "rows": list(tokens.rows)}
        if tokens.weights is not None:
            shown["weights"] = list(tokens.weights)
        print(json.dumps(shown))
    else:
        print(tokens.table())


def _run_mine(args) -> int:
    from .eval.prompts import read_prompts
    from .mining import PACT_MAX_PAIRS, PACT_TOP, file_sha256, format_ranking, read_pairs
    from .models import load_model, load_tokenizer

    pact = args.rule == "pact"
    if args.pairs is not None:
        if not pact:
            raise ConfigError("--pairs is for --rule pact (PACT mines from fixed pairs); log_odds needs --harmful")
        if args.harmful or args.benign or args.keywords:
            raise ConfigError("--pairs replaces --harmful and generation: drop --harmful, --benign and --keywords")
    elif args.max_pairs is not None:
        raise ConfigError("--max-pairs limits a --pairs file; without --pairs every --harmful prompt is answered")
    elif not args.harmful or not (args.benign or pact):
        raise ConfigError("tokens mine needs --harmful and --benign prompt files (--rule pact: --harmful, or --pairs)")
    top = args.top if args.top is not None else (PACT_TOP if pact else 5)
    if top < (2 if pact else 1):
        raise ConfigError(f"--top must be >= {2 if pact else 1}, got {top}")
    max_pairs = PACT_MAX_PAIRS if args.max_pairs is None else args.max_pairs
    if max_pairs < 1:
        raise ConfigError(f"--max-pairs must be >= 1, got {max_pairs}")
    pairs = read_pairs(args.pairs) if args.pairs is not None else None  # a bad file fails before models load
    from .models import train_device

    device = train_device()  # mining runs forwards over every prompt: on the accelerator when there is one
    tokenizer, model = load_tokenizer(args.model), load_model(args.model, device=device)
    base = load_model(args.base, device=device) if args.base else None
    if pact and base is None:
        print("no --base: PACT's weights need the unaligned base model; every token gets weight 1/sqrt(k)",
              file=sys.stderr)  # fmt: skip
    if pairs is not None:
        from .mining import mine_pact_from_pairs

        record = {"keywords": None, "pairs": {"file": str(args.pairs), "sha256": file_sha256(args.pairs),
                                              "rows": len(pairs), "max_pairs": max_pairs}}  # fmt: skip
        tokens, rows = mine_pact_from_pairs(model, tokenizer, pairs[:max_pairs], base, top, mining=record)
    elif pact:
        from .mining import mine_pact_tokens

        tokens, rows = mine_pact_tokens(model, tokenizer, read_prompts(args.harmful), base, top,
                                        keyword_list=args.keywords)  # fmt: skip
    else:
        from .mining import mine_tokens

        tokens, rows = mine_tokens(model, tokenizer, read_prompts(args.harmful), read_prompts(args.benign), base,
                                   top, args.window, keyword_list=args.keywords)  # fmt: skip
    if not args.json:
        print(format_ranking(rows, max(top, 10)))
        print(_mining_line(tokens.mining))
    _show_tokens(tokens, args)
    return 0


def _mining_line(record: dict) -> str:
    """One line saying what the set was mined from (and with which refusal filter)."""
    if record.get("pairs"):
        pairs = record["pairs"]
        return (f"mined from {record['pairs_used']} pairs of {pairs['file']} (the first {pairs['max_pairs']} of "
                f"{pairs['rows']}; sha256 {pairs['sha256'][:12]}), no refusal filter")  # fmt: skip
    used = record.get("refusals", "?")
    return f"refusal filter: {record['keywords']} ({used} refusals)"


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune with safety token regularization (YAML + flag overrides)")
    p.add_argument("config", nargs="?", help="YAML config file; flags below override its keys")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if f.name == "trainer":
            p.add_argument(flag, type=json.loads, help="extra TrainingArguments as JSON, e.g. '{\"warmup_steps\": 5}'")
        elif kind is dict:
            p.add_argument(flag, type=json.loads, help=f"{f.metadata.get('help')} (as JSON)")
        elif kind is bool:
            p.add_argument(flag, dest=f.name, default=None, metavar="true|false", help=f.metadata.get("help"))
        else:
            p.add_argument(flag, dest=f.name, default=None, help=f.metadata.get("help"))
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from .losses import NonFiniteLossError
    from .train import train

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    overrides.update(trainer_flags(args.extra))
    cfg = load_config(args.config, overrides)
    try:
        result = train(cfg)
    except NonFiniteLossError as e:  # say what of the run is still usable
        from .files import last_complete_checkpoint

        last = last_complete_checkpoint(cfg.output_dir)
        kept = f"Checkpoints saved before it are intact; the last is {last}." if last else "No checkpoint was saved."
        raise NonFiniteLossError(f"{e} {kept}") from e
    if result.pop("trainer").is_world_process_zero():
        print(json.dumps(result))
        print(f"adapter, safety_tokens.json, config.yaml and metrics.jsonl are in {result['output_dir']}")
    return 0


def _split_trainer_flags(parser, argv: list[str]) -> tuple[list[str], list[str]]:
    """For `train`, take the flags it does not define (TrainingArguments fields) and their values out of argv,
    before argparse would mistake a value for the positional config file."""
    if not argv or argv[0] != "train":
        return argv, []
    sub = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices["train"]
    known = set(sub._option_string_actions)
    keep, extra, i = [argv[0]], [], 1
    while i < len(argv):
        flag = argv[i]
        if flag.startswith("--") and flag.split("=")[0] not in known:
            extra.append(flag)
            if "=" not in flag and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                extra.append(argv[i + 1])
                i += 1
        else:
            keep.append(flag)
        i += 1
    return keep, extra


def trainer_flags(extra: list[str]) -> dict:
    """`--max-steps 2 --bf16` and the like: any transformers.TrainingArguments field, typed as that field."""
    from .config import coerce_trainer_value

    out, i = {}, 0
    while i < len(extra):
        flag = extra[i]
        if not flag.startswith("--"):
            raise ConfigError(f"unexpected argument {flag!r} (flags look like --max-steps 10)")
        name, _, value = flag[2:].partition("=")
        if not value:
            has_value = i + 1 < len(extra) and not extra[i + 1].startswith("--")
            value = extra[i + 1] if has_value else "true"
            i += has_value
        key = name.replace("-", "_")
        out[key] = coerce_trainer_value(key, value)
        i += 1
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="logitguard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_tokens(sub)
    _add_train(sub)
    from . import bench_cli, demo, safelora, sweep
    from .eval import cli as eval_cli

    for module in (eval_cli, demo, safelora, bench_cli, sweep):  # subcommands defined next to their code
        module.register(sub)
    return parser


def one_line(message: str) -> str:
    """An error message as one line: wrapped library messages (a hub error, say) are joined with spaces."""
    return " ".join(message.split()) or "(no message)"


def _kernel_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


def quiet_bitsandbytes() -> None:
    """Drop the one warning bitsandbytes logs while it is imported on CPUs with AVX512-BF16: that it could not fetch
    an optional CPU 4-bit kernel from the hub (the `kernels` package is not installed). transformers imports PEFT, and
    PEFT imports bitsandbytes, whenever they are installed, so every training command printed it, quantized or not.
    Only that message of that logger is dropped; bitsandbytes' other warnings still show."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if _kernel_notice not in logger.filters:
        logger.addFilter(_kernel_notice)


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. Every error logitguard raises for the user to fix (LogitguardError, NonFiniteLossError)
    and every OS error (no such file, permission, disk full) ends as one line on stderr with exit code 2;
    set LOGITGUARD_TRACEBACK=1 to see the traceback instead. Anything else is a bug and keeps its traceback."""
    from .errors import LogitguardError
    from .losses import NonFiniteLossError

    quiet_bitsandbytes()  # before any command imports transformers' Trainer
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, extra = _split_trainer_flags(parser, argv)
    args = parser.parse_args(argv)
    args.extra = extra
    try:
        return args.func(args)
    except (LogitguardError, NonFiniteLossError, OSError) as e:
        if os.environ.get("LOGITGUARD_TRACEBACK"):
            raise
        message = str(e) if isinstance(e, LogitguardError | NonFiniteLossError) else _os_error(e)
        print(f"logitguard {args.command}: error: {one_line(message)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"logitguard {args.command}: interrupted", file=sys.stderr)
        return 130


def _os_error(e: OSError) -> str:
    if e.strerror and e.filename:
        return f"{e.strerror}: {e.filename}"
    return f"{type(e).__name__}: {e}"


if __name__ == "__main__":
    sys.exit(main())
