"""The README's real-model table: every measured run of the two `large` results files side by side, refusal against
the aligned model (paired 95%), the share of LoRA's held-out gain kept (benign) and each scenario's verdict, all
computed by logitguard.verdict exactly as `logitguard experiment report` computes them per file.

Usage: python experiments/real_model/frontier_table.py [--results results]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from logitguard.files import read_results
from logitguard.report import group_rows, signed
from logitguard.verdict import compare, run_target, task_share, verdicts

# (run name in the results files, the README's label), in the README's order
ROWS = [
    ("STR(I)", "STR(I) lambda 1 (the default before)"),
    ("STR(I) lambda 0.3", "STR(I) lambda 0.3 (the default now)"),
    ("STR(I) lambda 0.1", "STR(I) lambda 0.1"),
    ("STR(I) lambda 0.03", "STR(I) lambda 0.03"),
    ("STR(I) budget R0/16", "STR(I) budget R0/16 (lambda by dual ascent)"),
    ("STR(I) safety target", "STR(I) safety target (lambda steered by a probe)"),
    ("STR(I) lambda 0.2 + safety mix", "STR(I) lambda 0.2 + safety mix (two defences)"),
    ("STR(I) lambda 0.15 + safety mix", "STR(I) lambda 0.15 + safety mix"),
    ("STR(I) lambda 0.1 + safety mix", "STR(I) lambda 0.1 + safety mix"),
    ("safety mix", "safety mix (20 of the aligned model's refusals)"),
    ("anchored KL(I,cannot,Sure)", "anchored KL(I,cannot,Sure)"),
    ("PACT", "PACT"),
    ("PACT lambda 3", "PACT lambda 3"),
    ("STR(cannot)", "STR(cannot)"),
    ("KL top-32", "KL top-32 (lambda 1)"),
    ("constrained SFT", "constrained SFT (Qi et al. 2025)"),
    ("LoRA", "LoRA (no defence)"),
]
BASE = "aligned base"


def points(interval) -> str:
    return f"{signed(interval.estimate, 'pct')} [{signed(interval.lo, 'pct')}, {signed(interval.hi, 'pct')}]"


def share(interval) -> str:
    return f"{100 * interval.estimate:.0f}% [{100 * interval.lo:.0f}%, {100 * interval.hi:.0f}%]"


def scenario(path: Path) -> tuple[dict, dict, dict]:
    """(results, {run: its rows}, {run: verdict}) of one results file."""
    results = read_results(path)
    groups = group_rows(results)
    return results, {g["name"]: g["rows"] for g in groups}, verdicts(groups, results)


def table(folder: Path) -> str:
    benign, benign_rows, benign_verdict = scenario(folder / "real_qwen_benign--large.json")
    _, attack_rows, attack_verdict = scenario(folder / "real_qwen_purebad--large.json")
    header = ["run", "benign: refusal", "benign: share of LoRA's gain kept", "benign verdict", "attack: refusal",
              "attack verdict"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "| --- " * len(header) + "|"]
    for name, label in ROWS:
        if name not in benign_rows and name not in attack_rows:
            continue
        seeds = len(benign_rows.get(name, []))  # several: verdict.group_items pools them per prompt
        cells = [label + (f" (benign: {seeds} seeds, pooled)" if seeds > 1 else "")]
        if name in benign_rows:
            kept = task_share(benign_rows[name], benign_rows, run_target(benign, name))
            cells += [
                points(compare(benign_rows[name], benign_rows[BASE], "refusal_rate")),
                "100%" if name == "LoRA" else share(kept),
                benign_verdict[name],
            ]
        else:
            cells += ["not run", "–", "–"]
        if name in attack_rows:
            cells += [points(compare(attack_rows[name], attack_rows[BASE], "refusal_rate")), attack_verdict[name]]
        else:
            cells += ["not run", "–"]
        lines.append("| " + " | ".join("**meets**" if c == "meets" else c for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="results", help="the folder of the results files")
    print(table(Path(parser.parse_args().results)))


if __name__ == "__main__":
    main()
