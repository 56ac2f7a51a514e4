"""How many HumanEval answers were cut off by the token budget, and how many of those passed.

    python bench/humaneval_cutoff.py runs/bench/real_qwen_benign--large/{aligned-base,lora}

Reads each folder's eval/utility_records.jsonl (written by `logitguard experiment run` and `logitguard eval`) and
sorts the answers by their first code block (`code_block`): closed; cut (opened and still open when generation
stopped, at utility_max_new_tokens: a model that ends its answer closes its block); or none. Cut answers rarely
pass: where many are, pass@1 measures how many answers fit the budget as much as how many are right. Rows
evaluated after this was added carry the same counts in their HumanEval summary (`cut`, `no_code_block`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from logitguard.eval.humaneval import code_block


def counts(records: list[dict]) -> dict:
    out = {"n": len(records)}
    for kind in ("closed", "cut", "none"):
        chosen = [r for r in records if code_block(r["completion"]) == kind]
        out[kind], out[f"{kind}_passed"] = len(chosen), sum(r["passed"] for r in chosen)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (with eval/utility_records.jsonl) or the records files")
    args = p.parse_args()
    for run in args.runs:
        path = Path(run)
        path = path if path.is_file() else path / "eval" / "utility_records.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        c = counts([r for r in rows if r.get("set") == "humaneval"])
        print(
            f"{run}: {c['n']} problems; {c['closed']} closed ({c['closed_passed']} pass), {c['cut']} cut off "
            f"inside their code block ({c['cut_passed']} pass), {c['none']} without one ({c['none_passed']} pass)"
        )
        # fmt: skip


if __name__ == "__main__":
    main()
