"""How many HumanEval answers were cut off by the token budget, and how many of those passed.

    python bench/humaneval_cutoff.py runs/bench/real_qwen_benign--large/{aligned-base,lora}

Reads each folder's eval/utility_records.jsonl (written by `logitguard experiment run` and `logitguard eval`) and
counts the answers whose first code block had not closed when generation stopped (`code_closed`): those were cut by
utility_max_new_tokens, and rarely pass. Where many are cut, pass@1 measures how many answers fit the budget as much
as how many are right. Rows evaluated after this was added carry the same counts in their summary (`unclosed`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from logitguard.eval.humaneval import code_closed


def counts(records: list[dict]) -> dict:
    closed = [r for r in records if code_closed(r["completion"])]
    cut = [r for r in records if not code_closed(r["completion"])]
    return {"n": len(records), "closed": len(closed), "closed_passed": sum(r["passed"] for r in closed),
            "cut": len(cut), "cut_passed": sum(r["passed"] for r in cut)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (with eval/utility_records.jsonl) or the records files")
    args = p.parse_args()
    for run in args.runs:
        path = Path(run)
        path = path if path.is_file() else path / "eval" / "utility_records.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        c = counts([r for r in rows if r.get("set") == "humaneval"])
        print(f"{run}: {c['n']} problems; {c['closed']} closed, {c['closed_passed']} of them pass; {c['cut']} cut "
              f"off by the budget, {c['cut_passed']} of them pass")  # fmt: skip


if __name__ == "__main__":
    main()
