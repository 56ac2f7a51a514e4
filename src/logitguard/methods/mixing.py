"""Safety-data mixing (Bianchi et al. 2023, "Safety-Tuned LLaMAs"; vinid/safety-tuned-llamas): harmful prompts
paired with refusals join the fine-tuning data, which then trains with plain cross-entropy (their sets: 20k Alpaca
rows plus 100 to 2,000 safety rows).

Where the safety rows come from (`safety_mix`):
- a data file in any schema `logitguard train` reads (chat JSONL, Alpaca JSON, prompt/completion), used as is;
- `self`: the aligned model's own greedy responses to the prompts in `safety_mix_prompts`, generated once and
  cached under `cache_dir/safety_mix/`, keyed by the model's weights and config, the tokenizer and its chat
  template, the prompts, the token limit and the keyword list. Only responses that the keyword classifier
  (`logitguard.eval.keyword`, list `safety_mix_keywords`) calls refusals are kept; the others are dropped and
  counted (the cache keeps their first ten words only, as `logitguard eval`'s records do).

How many (`safety_mix_count` N, or `safety_mix_fraction` f, or neither: every available row): f is the share of
the mixed training set, n = floor(f * n_data / (1 - f) + 1/2), so that n / (n_data + n) is f to within rounding.
Which rows: a sample drawn with a fixed seed (MIX_SEED, not the run's seed, so runs that differ only in seed
train on the same rows), kept in file order. Mixed rows follow the data rows and are tokenized, cached and
trained exactly like them; the report says how many were mixed and which.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
from pathlib import Path

from ..data import DataError, load_rows, to_messages
from ..files import write_json_atomic

MIX_SEED = 0
SELF = "self"
CACHE_VERSION = 1


def mix_count(n_data: int, available: int, count: int = 0, fraction: float = 0.0) -> int:
    """How many safety rows to mix: `count`, or the number that makes them a `fraction` of the mixed set, or
    (neither given) all `available`. More than `available` is an error that says how many there are."""
    if count and fraction:
        raise DataError("safety_mix_count and safety_mix_fraction are exclusive; give one")
    if count:
        n, asked = count, f"safety_mix_count {count}"
    elif fraction:
        if not 0 < fraction < 1:
            raise DataError(f"safety_mix_fraction must be in (0, 1), got {fraction}")
        n, asked = math.floor(fraction * n_data / (1 - fraction) + 0.5), f"safety_mix_fraction {fraction}"
        if n == 0:
            raise DataError(f"{asked} of {n_data} data rows rounds to 0 safety rows; raise the fraction")
    else:
        return available
    if n > available:
        raise DataError(f"{asked} asks for {n} safety rows, but only {available} are available")
    return n


def choose(available: int, n: int, seed: int = MIX_SEED) -> list[int]:
    """`n` of `available` indices drawn with `seed`, in ascending (file) order."""
    return sorted(random.Random(seed).sample(range(available), n))


def _file_rows(path: str) -> list[dict]:
    rows = load_rows(path)
    for row in rows:
        to_messages(row)  # a row without an assistant answer fails here, naming its line
    return rows


def _tokenizer_key(tokenizer) -> str:
    """The tokenizer's vocabulary, rules and special tokens, without the padding and truncation state that a
    padded batch leaves in a fast tokenizer's backend (which `cache.tokenizer_fingerprint` includes)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
    else:
        state = sorted(tokenizer.get_vocab().items())
    return json.dumps([state, tokenizer.all_special_tokens], sort_keys=True)


def _cache_key(model, tokenizer, prompts: list[str], max_new_tokens: int, keywords: str) -> str:
    from ..cache import config_fingerprint, model_fingerprint

    parts = {
        "model": model_fingerprint(model),
        "model_config": config_fingerprint(model),
        "tokenizer": _tokenizer_key(tokenizer),
        "chat_template": str(getattr(tokenizer, "chat_template", "") or ""),
        "prompts": prompts,
        "max_new_tokens": max_new_tokens,
        "keywords": keywords,
        "version": CACHE_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def self_refusals(
    model,
    tokenizer,
    prompts_file: str,
    cache_dir: str | Path,
    max_new_tokens: int = 128,
    keywords: str = "qi2023",
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """(rows, info): the model's greedy refusals to the prompts in `prompts_file`, as chat rows, and what was
    generated, kept and dropped. Generated once per model and prompts; later calls read the cache."""
    from ..eval.keyword import refusal_keywords
    from ..eval.prompts import read_prompts
    from ..models import process_state

    refusal_keywords(keywords)  # an unknown list name fails before any generation
    prompts = read_prompts(prompts_file)
    path = Path(cache_dir) / "safety_mix" / f"{_cache_key(model, tokenizer, prompts, max_new_tokens, keywords)}.json"
    # Under `accelerate launch` the main process generates and the others read its file: every process then mixes
    # the same rows (greedy decoding can differ between devices in a near-tie, and unequal datasets hang DDP).
    with process_state().main_process_first():
        cached = _read_or_generate(path, model, tokenizer, prompts, prompts_file, max_new_tokens, keywords, progress)
    rows = [
        {
            "messages": [{"role": "user", "content": k["prompt"]}, {"role": "assistant", "content": k["response"]}],
            "_where": f"{prompts_file} prompt {k['index'] + 1} (the model's own refusal)",
        }
        for k in cached["kept"]
    ]
    info = {"generated": cached["generated"], "dropped_not_refusal": len(cached["dropped"]), "cache": str(path)}
    return rows, info


def _read_or_generate(path, model, tokenizer, prompts, prompts_file, max_new_tokens, keywords, progress) -> dict:
    """The cached generation at `path`, or a new one written there."""
    from ..eval.generate import generate_responses
    from ..eval.keyword import is_refusal

    if path.is_file():
        return json.loads(path.read_text())
    if progress:
        print(f"safety mix: generating the model's own responses to {len(prompts)} prompts (once)", flush=True)
    # a copy: padding a batch changes a fast tokenizer's state, and so the reference cache key of this run
    responses = generate_responses(
        model, copy.deepcopy(tokenizer), prompts, max_new_tokens=max_new_tokens, progress=progress
    )
    kept = [{"index": i, "prompt": p, "response": r} for i, (p, r) in enumerate(zip(prompts, responses))
            if is_refusal(r, keywords)]  # fmt: skip
    dropped = [{"index": i, "prompt": p, "response_start": " ".join(r.split()[:10])}
               for i, (p, r) in enumerate(zip(prompts, responses)) if not is_refusal(r, keywords)]  # fmt: skip
    cached = {"prompts_file": str(prompts_file), "keywords": keywords, "max_new_tokens": max_new_tokens,
              "generated": len(prompts), "kept": kept, "dropped": dropped}  # fmt: skip
    write_json_atomic(path, cached)
    return cached


def self_refusal_rows(
    model,
    tokenizer,
    prompts_file: str,
    count: int = 0,
    max_new_tokens: int = 128,
    keywords: str = "qi2023",
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> list[dict]:
    """`count` of the model's own refusals to the prompts in `prompts_file` (all of them when 0), as chat rows
    {"messages": [user, assistant]}: the rows `safety_mix: self` mixes in, chosen the same way, for a script that
    builds its own dataset (TRL's SFTTrainer: `concatenate_datasets([train, Dataset.from_list(rows)])`). Call it
    with the aligned model, before the adapter is trained; generated once and cached like `safety_mix: self`."""
    from ..config import default_cache_dir

    pool, info = self_refusals(model, tokenizer, prompts_file, cache_dir or default_cache_dir(), max_new_tokens,
                               keywords, progress)  # fmt: skip
    chosen = _chosen(len(pool), 0, count, 0.0, f"self refusals from {prompts_file}", info["dropped_not_refusal"])
    return [{"messages": pool[i]["messages"]} for i in chosen]


def _chosen(available: int, n_data: int, count: int, fraction: float, source: str, dropped: int | None) -> list[int]:
    """Which of the `available` safety rows to mix (mix_count, then choose); a shortfall is an error that names
    `source` and how many generated responses were dropped as not refusals. No rows at all is an error even when
    no count was asked for: a run configured to mix must not train unmixed without a word."""
    why = f" ({dropped} generated responses were not refusals and were dropped)" if dropped else ""
    if not available:
        fix = "use prompts the model refuses or a file of refusals" if dropped is not None else "add rows to it"
        raise DataError(f"{source}: there are no safety rows to mix{why}; {fix}")
    try:
        n = mix_count(n_data, available, count, fraction)
    except DataError as e:
        raise DataError(f"{source}: {e}{why}") from None
    return choose(available, n)


def apply(cfg, model, tokenizer, rows: list[dict], progress: bool = True) -> tuple[list[dict], dict | None]:
    """(data rows followed by the chosen safety rows, report); (rows, None) when `cfg.safety_mix` is unset."""
    if not cfg.safety_mix:
        return rows, None
    report: dict = {"source": cfg.safety_mix, "data_rows": len(rows)}
    if cfg.safety_mix == SELF:
        pool, info = self_refusals(
            model, tokenizer, cfg.safety_mix_prompts, cfg.cache_dir, cfg.safety_mix_max_new_tokens,
            cfg.safety_mix_keywords, progress,
        )  # fmt: skip
        report.update(prompts=cfg.safety_mix_prompts, keywords=cfg.safety_mix_keywords, **info)
        if progress and info["dropped_not_refusal"]:
            print(f"safety mix: dropped {info['dropped_not_refusal']} of {info['generated']} generated responses "
                  f"that the {cfg.safety_mix_keywords} keywords do not call refusals", flush=True)  # fmt: skip
    else:
        pool = _file_rows(cfg.safety_mix)
    chosen = _chosen(len(pool), len(rows), cfg.safety_mix_count, cfg.safety_mix_fraction,
                     f"safety_mix {cfg.safety_mix}", report.get("dropped_not_refusal"))  # fmt: skip
    n = len(chosen)
    report.update(available=len(pool), mixed=n, indices=chosen, seed=MIX_SEED)
    report["share"] = n / (len(rows) + n) if rows or n else 0.0
    if progress:
        print(f"safety mix: {n} safety rows mixed into {len(rows)} data rows ({report['share']:.1%} of training)",
              flush=True)  # fmt: skip
    return rows + [pool[i] for i in chosen], report
