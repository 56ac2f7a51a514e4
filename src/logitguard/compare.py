"""`logitguard experiment compare`: one run against another of the same results file, paired item by item.

`experiment report` compares every run with its reference (the aligned base, or the target's utility run). Users
and the README also ask "how much more refusal does the stack keep than STR alone?": that is two runs of one file,
evaluated on the same items in the same order, so the same paired statistics apply (McNemar's exact test and
Tango's interval for rates, the paired bootstrap for scores and held-out loss; stats.py). This module prints them
for every measure both runs recorded per item, so each between-run number in the docs has a command beside it.
"""

from __future__ import annotations

from pathlib import Path

from . import stats
from .errors import ConfigError, suggest
from .report import cell, columns, group_rows, mixed_dtypes, signed
from .verdict import RATES, compare, group_items


def results_file(experiment: str, variant: str | None, results_dir: str | Path) -> Path:
    """results/<experiment>[--<variant>].json, or `experiment` itself when it is a JSON path."""
    path = Path(experiment)
    if path.suffix != ".json":
        path = Path(results_dir) / (path.stem + (f"--{variant}" if variant else "") + ".json")
    if not path.is_file():
        found = sorted(p.stem for p in Path(results_dir).glob("*.json"))
        raise ConfigError(
            f"no results file {path}{suggest(path.stem, found)}: run `logitguard experiment run "
            f"{experiment}{f' --variant {variant}' if variant else ''}` first, or pass a results JSON"
        )
    return path


def compare_runs(results: dict, a: str, b: str) -> list[dict]:
    """One entry per measure both runs hold per-item data for: the two values, a - b with its 95% interval and
    (paired rates) McNemar's p and the discordant counts (items where only a is 1, only b is 1)."""
    groups = {g["name"]: g["rows"] for g in group_rows(results)}
    for name in (a, b):
        if name not in groups:
            raise ConfigError(
                f"no run {name!r} in this results file{suggest(name, groups)}; it holds: "
                + ", ".join(repr(n) for n in groups)
            )
    out = []
    for key, title, kind in columns([{"rows": groups[a]}, {"rows": groups[b]}]):
        interval = compare(groups[a], groups[b], key)
        if interval is None:
            continue
        entry = {"metric": key, "title": title, "kind": kind, "a": cell(groups[a], key, kind),
                 "b": cell(groups[b], key, kind), "difference": interval, "discordant": None}  # fmt: skip
        if key.startswith(RATES) and len(groups[a]) == len(groups[b]) == 1:
            entry["discordant"] = stats.discordant(group_items(groups[a], key), group_items(groups[b], key))
        out.append(entry)
    if not out:
        raise ConfigError(
            f"{a!r} and {b!r} share no per-item data (rows written before items were recorded, or "
            "evaluated on different sets): nothing to pair"
        )
    return out


def compare_table(results: dict, a: str, b: str) -> str:
    """A markdown table of compare_runs, differences in points for rates."""
    lines = [f"a = {a!r}, b = {b!r}: a minus b, paired on the same items (95% intervals; rates in points)", "",
             "| measure | a | b | a - b [95%] | McNemar p | only a / only b |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for e in compare_runs(results, a, b):
        d, kind = e["difference"], e["kind"]
        diff = f"{signed(d.estimate, kind)} [{signed(d.lo, kind)}, {signed(d.hi, kind)}]"
        p = "–" if d.p is None else f"{d.p:.2g}"
        counts = "–" if e["discordant"] is None else "{} / {}".format(*e["discordant"])
        lines.append(f"| {e['title']} | {e['a']} | {e['b']} | {diff} | {p} | {counts} |")
    groups = {g["name"]: g["rows"] for g in group_rows(results)}
    note = mixed_dtypes(groups[a] + groups[b])
    return "\n".join(lines + (["", note] if note else []))
