"""How many generated utility answers (HumanEval, GSM8K) the token budget cut off, and how many of those scored.

    python bench/utility_cutoff.py runs/bench/real_qwen_benign--large/{aligned-base,lora} \
        --tokenizer ~/.cache/logitguard/gguf/<the converted model folder>

Reads each folder's eval/utility_records.jsonl (written by `logitguard experiment run` and `logitguard eval`).
HumanEval answers are sorted by their first code block (`code_block`): closed; cut (opened and still open when
generation stopped, at utility_max_new_tokens: a model that ends its answer closes its block); or none. With
--tokenizer (the evaluated model's) and --budget (utility_max_new_tokens), every generated set also counts the
answers whose re-tokenized length is within 2 tokens of the budget: cut, whatever their format. Cut answers rarely
score: where many are, the score measures how many answers fit the budget as much as how many are right. Rows
evaluated after this was added carry the HumanEval counts in their summary (`cut`, `no_code_block`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from logitguard.eval.humaneval import code_block

SCORE = {"humaneval": "passed", "gsm8k": "correct"}


def code_blocks(records: list[dict]) -> dict:
    """{kind: (answers, passed)} for HumanEval records, by code_block kind."""
    out = {}
    for kind in ("closed", "cut", "none"):
        chosen = [r for r in records if code_block(r["completion"]) == kind]
        out[kind] = (len(chosen), sum(r["passed"] for r in chosen))
    return out


def at_budget(records: list[dict], name: str, tokenizer, budget: int) -> tuple[int, int, int]:
    """(answers, answers within 2 tokens of the budget, of those scored) for one generated set."""
    text = "completion" if name == "humaneval" else "response"
    cut = [r for r in records if len(tokenizer(r[text], add_special_tokens=False)["input_ids"]) >= budget - 2]
    return len(records), len(cut), sum(bool(r[SCORE[name]]) for r in cut)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (with eval/utility_records.jsonl) or the records files")
    p.add_argument("--tokenizer", help="the evaluated model's tokenizer folder: count answers at the budget")
    p.add_argument("--budget", type=int, default=192, help="utility_max_new_tokens of the evaluation")
    args = p.parse_args()
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(Path(args.tokenizer).expanduser())
    for run in args.runs:
        path = Path(run)
        path = path if path.is_file() else path / "eval" / "utility_records.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        by_set = {name: [r for r in rows if r.get("set") == name] for name in SCORE}
        if by_set["humaneval"]:
            c = code_blocks(by_set["humaneval"])
            print(f"{run}: HumanEval {len(by_set['humaneval'])}: {c['closed'][0]} closed ({c['closed'][1]} pass), "
                  f"{c['cut'][0]} cut off inside their code block ({c['cut'][1]} pass), {c['none'][0]} without one "
                  f"({c['none'][1]} pass)")  # fmt: skip
        for name, records in by_set.items():
            if tokenizer is not None and records:
                n, cut, scored = at_budget(records, name, tokenizer, args.budget)
                print(f"{run}: {name} {n}: {cut} at the {args.budget}-token budget ({scored} of them scored)")


if __name__ == "__main__":
    main()
