"""`logitguard tokens`: which ids safety words resolve to, and `tokens mine` (from refusals, or PACT's rule)."""

from __future__ import annotations

import json
import sys

from ..errors import ConfigError
from .eval import add_trust_remote_code


def register(sub) -> None:
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
    from ..eval.keyword import DETECTORS, REFUSAL_LISTS

    p.add_argument(
        "--keywords",
        choices=sorted(DETECTORS) + sorted(REFUSAL_LISTS),
        help="mine: the refusal filter for the model's own answers: the opening-phrase detector (opening, the "
        "default) or a keyword list (qi2023, qi2024); recorded in the --save file",
    )
    p.add_argument("--top", type=int, help="mine: size of the token set (default 5; 50 with --rule pact)")
    p.add_argument("--window", type=int, default=3, help="mine: response positions counted as the opening")
    p.add_argument("--json", action="store_true", help='print {"ids": [...], "rows": [...]}')
    add_trust_remote_code(p)
    p.add_argument("--save", metavar="FILE", help="write the token set JSON (accepted by train's token_file)")
    p.set_defaults(func=_run_tokens)


def _run_tokens(args) -> int:
    from ..models import load_tokenizer
    from ..tokens import SafetyTokens

    if args.action == "mine":
        return _run_mine(args)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
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
    from ..eval.prompts import read_prompts
    from ..mining import PACT_MAX_PAIRS, PACT_TOP, file_sha256, format_ranking, read_pairs
    from ..models import load_model, load_tokenizer

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
    from ..models import train_device

    device = train_device()  # mining runs forwards over every prompt: on the accelerator when there is one
    trust = args.trust_remote_code
    tokenizer = load_tokenizer(args.model, trust)
    model = load_model(args.model, trust_remote_code=trust, device=device)
    base = load_model(args.base, trust_remote_code=trust, device=device) if args.base else None
    if pact and base is None:
        print("no --base: PACT's weights need the unaligned base model; every token gets weight 1/sqrt(k)",
              file=sys.stderr)  # fmt: skip
    if pairs is not None:
        from ..mining import mine_pact_from_pairs

        record = {"keywords": None, "pairs": {"file": str(args.pairs), "sha256": file_sha256(args.pairs),
                                              "rows": len(pairs), "max_pairs": max_pairs}}  # fmt: skip
        tokens, rows = mine_pact_from_pairs(model, tokenizer, pairs[:max_pairs], base, top, mining=record)
    elif pact:
        from ..mining import mine_pact_tokens

        tokens, rows = mine_pact_tokens(model, tokenizer, read_prompts(args.harmful), base, top,
                                        keyword_list=args.keywords)  # fmt: skip
    else:
        from ..mining import mine_tokens

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
