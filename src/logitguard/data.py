"""Chat data: load rows from local files or the hub, turn them into messages, tokenize with labels on
assistant tokens only, and pad batches.

Row schemas accepted (one per row, detected by keys):
  {"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]}   chat JSONL (PureBad style)
  {"instruction": str, "input": str (optional), "output": str}                 Alpaca
  {"prompt": str, "completion": str}                                            prompt/completion
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from .errors import LogitguardError
from .files import write_text_atomic

# Used only when a tokenizer has no chat template of its own; documented in the README.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant")


class DataError(LogitguardError, ValueError):
    """Bad training or evaluation data; the message names the file, the line or row, and the field."""


def parse_jsonl(lines, where: str) -> list[dict]:
    """Rows of JSONL `lines` (a file, or a gzip stream); a malformed line is a DataError naming `where` and the
    line number. Each row keeps `_where` ("file:line") for later errors about its fields."""
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}:{lineno}: expected a JSON object, got {type(row).__name__}")
        row["_where"] = f"{where}:{lineno}"
        rows.append(row)
    return rows


def read_jsonl(path: str | Path) -> list[dict]:
    """Parse a JSONL file; a malformed line is a DataError naming the file and the line number."""
    with open(path, encoding="utf-8") as f:
        return parse_jsonl(f, str(path))


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".tsv", ".arrow")


def looks_like_path(name: str) -> bool:
    """Whether a name that does not exist was meant as a local file rather than a hub dataset ("owner/name"):
    it has a file suffix, starts with . / or ~, or has more than one '/' (or any backslash)."""
    name = str(name)
    return (
        Path(name).suffix.lower() in DATA_SUFFIXES
        or name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or "\\" in name
    )


def load_rows(source: str | Path, split: str = "train") -> list[dict]:
    """Rows from a local .jsonl / .json / .parquet file, or a hub dataset name (needs a network).

    A name that looks like a local path but does not exist is an error here, never a hub request; a file with no
    rows is an error naming it."""
    rows = _load_rows(source, split)
    if not rows:
        raise DataError(f"data {source} has no rows (the file is empty)")
    return rows


def _load_rows(source: str | Path, split: str) -> list[dict]:
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return read_jsonl(path)
        if suffix == ".json":
            text = path.read_text(encoding="utf-8")
            if not text.strip():
                return []
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                if e.msg == "Extra data":  # a JSONL file named .json
                    return read_jsonl(path)
                raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of rows (Alpaca style) or JSONL")
            for i, row in enumerate(data):
                if not isinstance(row, dict):
                    raise DataError(f"{path} row {i}: expected a JSON object, got {type(row).__name__}")
            return [dict(row, _where=f"{path} row {i}") for i, row in enumerate(data)]
        if suffix == ".parquet":
            import datasets

            ds = datasets.Dataset.from_parquet(str(path))
            return [dict(row, _where=f"{path} row {i}") for i, row in enumerate(ds)]
        raise DataError(f"{path}: unsupported data file type {suffix!r}; use .jsonl, .json or .parquet")
    if path.exists():
        raise DataError(f"{path} is a directory; point at a .jsonl, .json or .parquet file")
    if looks_like_path(str(source)):
        raise DataError(f"data file {source} does not exist")
    if str(source).count("/") == 1:
        import datasets

        try:
            ds = datasets.load_dataset(str(source), split=split)
        except Exception as e:  # the hub raises many types; the message is what matters
            raise DataError(f"could not load hub dataset {source!r} (split {split!r}): {e}") from e
        return [dict(row, _where=f"{source}[{split}] row {i}") for i, row in enumerate(ds)]
    raise DataError(f"data file {source} does not exist (and is not a hub dataset name like 'owner/name')")


def apply_columns(rows: list[dict], columns: dict[str, str]) -> list[dict]:
    """Rename source columns to schema fields: columns maps field -> source column, e.g. {"prompt":
    "question", "completion": "answer"} for a Parquet file with question / answer columns."""
    if not columns:
        return rows
    out = []
    for row in rows:
        new = {k: v for k, v in row.items() if k not in columns.values()}
        for target, source in columns.items():
            if source not in row:
                keys = sorted(k for k in row if k != "_where")
                raise DataError(f"{row.get('_where', 'row')}: no column {source!r} (mapped to {target!r}); has {keys}")
            new[target] = row[source]
        out.append(new)
    return out


def split_holdout(rows: list[dict], n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held_out): `n` rows drawn with `seed` are held out (the STR paper holds out 200 Alpaca rows);
    both keep the file order."""
    if n <= 0:
        return rows, []
    if n >= len(rows):
        raise DataError(f"holdout {n} leaves nothing to train on: the data has {len(rows)} rows")
    import random

    held = set(random.Random(seed).sample(range(len(rows)), n))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def write_holdout(rows: list[dict], path: str | Path) -> Path:
    """The held-out rows as JSONL (without the loader's `_where`): what `train` keeps beside a run and the runner
    evaluates the held-out loss on; written atomically."""
    lines = (json.dumps({k: v for k, v in r.items() if k != "_where"}) + "\n" for r in rows)
    write_text_atomic(Path(path), "".join(lines))
    return Path(path)


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def sharegpt_messages(turns, where: str = "row") -> list[dict]:
    """ShareGPT's [{"from": "human"|"gpt"|"system", "value": str}, ...] as chat messages."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list")
    out = []
    for j, turn in enumerate(turns):
        role = SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: conversations[{j}] must be {{'from': human|gpt|system, 'value': str}}")
        out.append({"role": role, "content": turn["value"]})
    return out


def read_sharegpt(text: str, limit: int | None = None) -> tuple[list[dict], int]:
    """Whole conversations, one by one, from a ShareGPT JSON list that may be cut off mid-way (as a file
    shipped in pieces is): parsing stops at the first conversation that is not complete. Conversations that
    are not a clean human/gpt exchange (other roles, empty turns, no answer, an answer first) are skipped.
    Returns the rows ({"messages": [...]}) and how many were skipped."""
    decoder = json.JSONDecoder()
    start = text.index("[") + 1
    rows, skipped = [], 0
    while limit is None or len(rows) < limit:
        while start < len(text) and text[start] in " \t\r\n,":
            start += 1
        if start >= len(text) or text[start] == "]":
            break
        try:
            item, start = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            break  # the cut: a conversation that did not arrive whole
        try:
            messages = sharegpt_messages(item.get("conversations") if isinstance(item, dict) else None)
        except DataError:
            skipped += 1
            continue
        if (
            any(not m["content"].strip() for m in messages)
            or not any(m["role"] == "assistant" for m in messages)
            or _assistant_first(messages)
        ):
            skipped += 1
            continue
        rows.append({"messages": messages})
    return rows, skipped


def to_messages(row: dict) -> list[dict]:
    """Convert one row of any accepted schema to a validated messages list."""
    where = row.get("_where", "row")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(
                    f"{where}: messages[{j}] must be {{'role': one of {ROLES}, 'content': str}}, got {m!r}"
                )
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    elif "conversations" in row:
        messages = sharegpt_messages(row["conversations"], where)
    elif "instruction" in row and "output" in row:
        user = str(row["instruction"])
        if row.get("input"):
            user += "\n\n" + str(row["input"])
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": str(row["output"])}]
    elif "prompt" in row and "completion" in row:
        messages = [
            {"role": "user", "content": str(row["prompt"])},
            {"role": "assistant", "content": str(row["completion"])},
        ]
    else:
        keys = sorted(k for k in row if k != "_where")
        raise DataError(
            f"{where}: unknown row schema with keys {keys}; expected 'messages', 'conversations' (ShareGPT), "
            "'instruction'/'input'/'output' (Alpaca) or 'prompt'/'completion'"
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message to train on")
    if _assistant_first(messages):
        raise DataError(f"{where}: an assistant message comes before any user message; start the conversation "
                        "with the user's turn (drop the leading assistant turn)")  # fmt: skip
    return messages


def _assistant_first(messages: list[dict]) -> bool:
    """An answer with no request before it (ShareGPT has such rows): no chat template can place it."""
    return next(m["role"] for m in messages if m["role"] != "system") == "assistant"


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template the documented fallback (with a warning), and a pad token."""
    if not getattr(tokenizer, "chat_template", None):
        warnings.warn("tokenizer has no chat template; using logitguard's fallback template", stacklevel=2)
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int | None = None) -> dict:
    """Token ids, attention mask and labels for one conversation; labels are -100 except on assistant
    tokens (each assistant turn's content and its end-of-turn marker).

    Assistant spans are found by rendering the template up to each turn with and without the generation
    prompt; the rendering of a shorter conversation must be a text prefix of the longer one.
    """
    ensure_chat_template(tokenizer)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (upto.startswith(start) and full.startswith(upto)):
            raise DataError(
                "the chat template does not render a conversation as a prefix of its continuation, so "
                "assistant tokens cannot be located; use a template without history rewriting"
            )
        spans.append((len(start), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for tok, (begin, _end) in zip(enc["input_ids"], enc["offset_mapping"]):
        inside = any(a <= begin < b for a, b in spans)
        labels.append(tok if inside else -100)
    ids = enc["input_ids"]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def tokenize_rows(tokenizer, rows: list[dict], max_length: int, progress: bool = False) -> list[dict]:
    """Tokenize rows; each keeps its index as `example_idx` (the key into the reference cache).

    Rows left with no assistant token after truncation are dropped with one warning that counts them.
    """
    from tqdm.auto import tqdm

    out, dropped = [], 0
    for row in tqdm(rows, desc="tokenize", disable=not progress):
        feats = tokenize_conversation(tokenizer, to_messages(row), max_length)
        if all(label == -100 for label in feats["labels"]):
            dropped += 1
            continue
        feats["example_idx"] = len(out)
        out.append(feats)
    if dropped:
        warnings.warn(
            f"{dropped} of {len(rows)} rows have no assistant token within max_length={max_length} and were dropped",
            stacklevel=2,
        )
    if not rows:
        raise DataError("no rows to tokenize (the data is empty)")
    if not out:
        raise DataError(
            f"no trainable rows: all {len(rows)} rows lost their assistant tokens to max_length={max_length} "
            "truncation; raise max_length"
        )
    return out


class ChatCollator:
    """Right-pads input_ids / attention_mask / labels and keeps `example_idx` for the reference cache."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(features), length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(features), length), dtype=torch.long),
            "labels": torch.full((len(features), length), -100, dtype=torch.long),
        }
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            batch["input_ids"][i, :n] = torch.as_tensor(f["input_ids"])
            batch["attention_mask"][i, :n] = torch.as_tensor(f["attention_mask"])
            batch["labels"][i, :n] = torch.as_tensor(f["labels"])
        if "example_idx" in features[0]:
            batch["example_idx"] = torch.as_tensor([f["example_idx"] for f in features], dtype=torch.long)
        return batch
