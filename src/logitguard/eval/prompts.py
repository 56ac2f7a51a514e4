"""Reading prompts: files (JSONL, JSON, CSV, text), the evaluation sets' short names, hub datasets, and comma lists
of them scored set by set. A library module: `logitguard eval`, the runner, training's monitor and mixing read here."""

from __future__ import annotations

import csv
from pathlib import Path

# goal: AdvBench's harmful_behaviors.csv; Behavior: HarmBench's behaviors CSV; instruction: HEx-PHI's JSONL
PROMPT_KEYS = ("prompt", "instruction", "goal", "Behavior")


def _row_prompt(row: dict, where: str) -> str:
    from ..data import DataError

    if "messages" in row:
        messages = row["messages"] if isinstance(row["messages"], list) else []
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if not users or not isinstance(users[0].get("content"), str):
            raise DataError(f"{where}: 'messages' holds no user message with string content")
        return users[0]["content"]
    for key in PROMPT_KEYS:
        if isinstance(row.get(key), str):
            # instruction + input the way training joins them (logitguard.data.to_messages)
            return row[key] + ("\n\n" + row["input"] if key == "instruction" and row.get("input") else "")
    keys = sorted(k for k in row if k != "_where")
    raise DataError(f"{where}: no prompt in a row with keys {keys}; expected 'messages', 'prompt' or 'instruction'")


def read_prompts(path: str | Path, assets: str | Path | None = None) -> list[str]:
    """Prompts from a file, an eval set's short name (`harmbench`, `donotanswer:200`; see datasets.py, read
    from `assets`) or a hub dataset name ("owner/name", its train split).

    .jsonl or .json rows ({"messages": [...]} -> first user message, {"prompt": ...} or {"instruction": ...,
    "input": ...}), .csv (a prompt / instruction / goal / Behavior column), or any other file as plain text
    with one prompt per line (blank lines skipped). Hub rows use the same keys as JSONL rows."""
    from ..data import DataError, load_rows, looks_like_path
    from .datasets import is_set_name, load_prompts

    name, path = str(path), Path(path).expanduser()
    if is_set_name(name):
        return load_prompts(name, assets)
    if not path.exists() and name.count("/") == 1 and not looks_like_path(name):
        # a hub dataset (e.g. walledai/AdvBench): its rows go through the same prompt columns
        prompts = [_row_prompt(row, row["_where"]) for row in load_rows(name)]
        if not prompts:
            raise DataError(f"{name}: no prompts found")
        return prompts
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist (or is not a file)")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):  # .json: a JSON list of rows (Alpaca style) or JSONL under that name
        prompts = [_row_prompt(row, row["_where"]) for row in load_rows(path)]
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            key = next((k for k in PROMPT_KEYS if k in (reader.fieldnames or [])), None)
            if key is None:
                raise DataError(f"{path}: CSV has columns {reader.fieldnames}; expected one of {list(PROMPT_KEYS)}")
            prompts = [row[key] for row in reader if row[key] and row[key].strip()]
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise DataError(f"{path}: no prompts found")
    return prompts


def set_label(spec: str) -> str:
    """The name a prompt set is reported under: a set's short name ("donotanswer:200" -> "donotanswer"), else
    the file's stem."""
    from .datasets import parse_spec

    parsed = parse_spec(spec) if is_set_spec(spec) else None
    return parsed[0] if parsed else Path(spec).stem


def is_set_spec(spec: str) -> bool:
    from .datasets import is_set_name

    return is_set_name(spec)


def read_prompt_sets(value: str, assets: str | Path | None = None, limit: int | None = None) -> dict[str, list[str]]:
    """{label: prompts} for a comma list of prompt files and set names ("advbench:30,harmbench:30"); each
    set is scored on its own as well as pooled. One entry for a value without a comma."""
    from ..data import DataError

    specs = [s.strip() for s in value.split(",")] if "," in value else [value]
    if not all(specs):
        raise DataError(f"an empty name in the prompt list {value!r}")
    sets = {set_label(s): read_prompts(s, assets)[:limit] for s in specs}
    if len(sets) != len(specs):
        raise DataError(f"a prompt set is named twice in {value!r}")
    return sets
