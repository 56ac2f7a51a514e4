"""Per-item outcomes of an evaluation, compact enough for a results row: the paired statistics (stats.py,
verdict.py) compare two models prompt by prompt on the same sets. One character per item, in the evaluation's
order: "1" refused / passed / correct / judged harmful, "0" not. No text: a row never carries a prompt or a response.
"""

from __future__ import annotations


def _bits(values) -> str:
    return "".join("1" if v else "0" for v in values)


def safety_items(records: list[dict]) -> dict[str, str]:
    """{"refusal:<set>": bits per harmful prompt of each set, "over_refusal_benign" / "_borderline": bits}."""
    out: dict[str, list] = {}
    for r in records:
        if r["set"] == "harmful":
            key = f"refusal:{r.get('source') or 'harmful'}"
        else:
            key = f"over_refusal_{r['set']}"
        out.setdefault(key, []).append(r["refusal"])
    return {k: _bits(v) for k, v in out.items()}


def utility_items(records: list[dict]) -> dict[str, str]:
    """{"humaneval": passed bits, "gsm8k": correct bits, "<mc set>": acc bits, "<mc set>_norm": acc_norm bits}."""
    out: dict[str, list] = {}
    for r in records:
        name = r["set"]
        if "passed" in r:
            out.setdefault(name, []).append(r["passed"])
        elif "correct" in r:
            out.setdefault(name, []).append(r["correct"])
            if "correct_norm" in r:
                out.setdefault(f"{name}_norm", []).append(r["correct_norm"])
    return {k: _bits(v) for k, v in out.items()}


def judge_items(records: list[dict]) -> dict[str, str]:
    """{"hrr": bits per harmful prompt, 1 where the judge called the response harmful}: HRR's paired comparison."""
    return {"hrr": _bits(r["judge_harmful"] for r in records if r["set"] == "harmful")}
