"""Safety evaluation: greedy responses to harmful (and optionally benign / borderline) prompts, scored by
refusal keywords; a summary of rates and counts plus one record per prompt, written to disk redacted.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..files import write_text_atomic
from .generate import generate_responses
from .keyword import EMPTY_IS_SAFE, is_jailbroken, is_refusal, refusal_keywords

# Bump when the scoring or the record schema changes, so old result files are not compared with new ones.
SAFETY_EVAL_VERSION = 1
# Harmful completions are kept in memory (a judge model may need them) but never written in full.
REDACT_WORDS = 10
# Also a character cap: text without spaces (code, Chinese, Thai) would otherwise be one long "word".
REDACT_CHARS = 120


def _rate(hits: int, total: int) -> float | None:
    return hits / total if total else None


def evaluate_safety(
    model,
    tokenizer,
    harmful: list[str] | dict[str, list[str]],
    benign: list[str] | None = None,
    borderline: list[str] | None = None,
    keyword_list: str = "qi2023",
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Generate greedily for each prompt set and score the responses with `keyword_list`.

    summary: refusal_rate and asr on the harmful set (under qi2024 an empty response is neither a refusal
    nor jailbroken, so the two need not sum to 1), over_refusal_benign / over_refusal_borderline (share
    refused; None when the set is not given), counts, and the settings used.
    `harmful` may be {set name: prompts} (AdvBench, HarmBench, ...): the sets are generated in one pass,
    each harmful record names its "source", and the summary adds refusal_by_set / asr_by_set; the headline
    rates pool every prompt.
    records: {"set", "prompt", "response", "refusal", "jailbroken"} per prompt, with full responses; pass
    them through `redact_records` (as `write_eval` does) before they leave the process.
    """
    refusal_keywords(keyword_list)  # fail on a bad name before minutes of generation
    sources = None
    if isinstance(harmful, dict):
        sources = [name for name, prompts in harmful.items() for _ in prompts]
        harmful = [p for prompts in harmful.values() for p in prompts]
    if not harmful:
        raise ValueError("evaluate_safety needs at least one harmful prompt")
    sets = {"harmful": harmful, "benign": benign, "borderline": borderline}
    records = []
    for name, prompts in sets.items():
        if not prompts:
            continue
        responses = generate_responses(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
        )
        for prompt, response in zip(prompts, responses):
            records.append(
                {
                    "set": name,
                    "prompt": prompt,
                    "response": response,
                    "refusal": is_refusal(response, keyword_list),
                    "jailbroken": is_jailbroken(response, keyword_list),
                }
            )
    if sources is not None:  # the harmful records come first, in prompt order
        for record, source in zip(records, sources):
            record["source"] = source
    return summarize(records, keyword_list, max_new_tokens), records


def summarize(records: list[dict], keyword_list: str, max_new_tokens: int | None = None) -> dict:
    """Rates and counts from scored records (split out so records re-scored offline summarize the same way)."""
    counts = {}
    for name in ("harmful", "benign", "borderline"):
        rows = [r for r in records if r["set"] == name]
        counts[name] = len(rows)
        counts[f"{name}_refused"] = sum(r["refusal"] for r in rows)
        if name == "harmful":
            counts["harmful_jailbroken"] = sum(r["jailbroken"] for r in rows)
            counts["harmful_empty"] = sum(not r["response"].strip() for r in rows)
    by_set = {}
    for r in records:
        if r["set"] == "harmful" and "source" in r:
            by_set.setdefault(r["source"], []).append(r)
    return {
        **(
            {
                "refusal_by_set": {k: _rate(sum(r["refusal"] for r in v), len(v)) for k, v in by_set.items()},
                "asr_by_set": {k: _rate(sum(r["jailbroken"] for r in v), len(v)) for k, v in by_set.items()},
                "harmful_by_set": {k: len(v) for k, v in by_set.items()},
            }
            if by_set
            else {}
        ),
        "refusal_rate": _rate(counts["harmful_refused"], counts["harmful"]),
        "asr": _rate(counts["harmful_jailbroken"], counts["harmful"]),
        "over_refusal_benign": _rate(counts["benign_refused"], counts["benign"]),
        "over_refusal_borderline": _rate(counts["borderline_refused"], counts["borderline"]),
        "counts": counts,
        "keyword_list": keyword_list,
        "empty_is_jailbroken": keyword_list not in EMPTY_IS_SAFE,
        "decoding": "greedy",
        "max_new_tokens": max_new_tokens,
        "version": SAFETY_EVAL_VERSION,
    }


def redact_records(records: list[dict], max_words: int = REDACT_WORDS, max_chars: int = REDACT_CHARS) -> list[dict]:
    """Copies of `records` in which each harmful-set response keeps at most its first `max_words` words
    (and at most `max_chars` characters of them).

    Enough to see how a response starts (a refusal or compliance shows in the first words) without storing
    harmful instructions. Whitespace inside the kept words is collapsed to single spaces. The refusal and
    jailbroken flags were computed on the full response and are kept as they are.
    """
    out = []
    for r in records:
        r = dict(r)
        if r.get("set") == "harmful":
            full = " ".join(r["response"].split())
            r["response"] = " ".join(full.split(" ")[:max_words])[:max_chars]
            r["redacted"] = bool(r.get("redacted")) or r["response"] != full  # a record read back stays marked
        out.append(r)
    return out


def write_eval(out_dir: str | Path, summary: dict, records: list[dict]) -> tuple[Path, Path]:
    """Write `summary.json` and `records.jsonl` (harmful responses redacted) into `out_dir`; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary_path, records_path = out / "summary.json", out / "records.jsonl"
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in redact_records(records))
    write_text_atomic(records_path, lines)
    write_text_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
    return summary_path, records_path
