"""Commonsense accuracy on the eight LLM-Adapters test sets (Table 3 of the STR paper, DoRA's protocol).

Each item is {instruction, input, output, answer}; the instruction ends with its answer format
("Answer format: true/false"). Two scores:
- `generate`: DoRA's protocol: greedy response, the first match of the task's answer regex in it, exact
  match with `answer`. (DoRA decodes with 4 beams and the Alpaca template; logitguard uses the model's
  chat template, as training does, and greedy decoding.)
- `loglik`: multiple choice by log-likelihood of each option after "the correct answer is", as in
  lm-evaluation-harness: acc (sum of log-probs) and acc_norm (divided by the option's length in bytes).
  Cheaper and more robust than parsing generated text.
Test files: <dir>/<task>/test.json (the LLM-Adapters layout) or <dir>/<task>.json.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..data import DataError
from .finite import refuse_non_finite

# task -> the answer regex of DoRA's commonsense_evaluate.py, in Table 3's column order
TASKS = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
    "ARC-Easy": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Challenge": r"answer1|answer2|answer3|answer4|answer5",
    "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
}
ANSWER_PREFIX = "the correct answer is"  # the LLM-Adapters training target: "the correct answer is X"
_FORMAT = re.compile(r"Answer format:\s*([^\n]+?)\s*$", re.IGNORECASE)


def task_file(folder: str | Path, task: str) -> Path:
    folder = Path(folder)
    for path in (folder / task / "test.json", folder / f"{task}.json"):
        if path.is_file():
            return path
    raise DataError(f"commonsense task {task}: neither {folder / task / 'test.json'} nor {folder / task}.json")


def load_task(folder: str | Path, task: str, limit: int | None = None) -> list[dict]:
    path = task_file(folder, task)
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of {{instruction, input, output, answer}} items")
    for i, item in enumerate(items):
        for key in ("instruction", "answer"):
            if not isinstance(item, dict) or not isinstance(item.get(key), str):
                raise DataError(f"{path}: item {i} has no string field {key!r}")
    return items[:limit] if limit is not None else items


def available_tasks(folder: str | Path) -> list[str]:
    found = []
    for task in TASKS:
        try:
            task_file(folder, task)
            found.append(task)
        except DataError:
            pass
    if not found:
        raise DataError(f"{folder}: holds none of the commonsense test sets {list(TASKS)}")
    return found


def extract_answer(task: str, text: str) -> str | None:
    """DoRA's extraction: the first match of the task's answer regex in the response, or None."""
    match = re.search(TASKS[task], text)
    return match.group(0) if match else None


def options(task: str, item: dict) -> list[str]:
    """The answer options: from the instruction's "Answer format: a/b/c" when present, else the task regex's."""
    match = _FORMAT.search(item["instruction"].strip())
    if match:
        found = [o.strip() for o in re.split(r"[/|]", match.group(1)) if o.strip()]
        if len(found) >= 2:
            return found
    return TASKS[task].split("|")


def _prompt(item: dict) -> str:
    return item["instruction"] + ("\n\n" + item["input"] if item.get("input") else "")


def _context(tokenizer, item: dict) -> str:
    from .generate import _as_messages

    text = tokenizer.apply_chat_template(_as_messages(_prompt(item)), tokenize=False, add_generation_prompt=True)
    return text + ANSWER_PREFIX


def option_logprobs(model, tokenizer, item: dict, choices: list[str]) -> list[float]:
    """Sum of log-probabilities of each " option" token sequence after the prompt and ANSWER_PREFIX."""
    context = tokenizer(_context(tokenizer, item), add_special_tokens=False)["input_ids"]
    conts = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in choices]
    return continuation_logprobs(model, context, conts, tokenizer.pad_token_id)


@torch.inference_mode()
def continuation_logprobs(model, context: list[int], conts: list[list[int]], pad: int | None = None) -> list[float]:
    """Sum of log-probabilities of each continuation's tokens after the context tokens.

    The context runs once and its key/value cache is shared by every continuation (one batched forward of
    the continuations alone): a TruthfulQA item's six-shot primer is not run again for each of its choices.
    Equal to scoring context + continuation whole (tests/test_multiple_choice.py checks it to 1e-4).
    """
    if not conts or any(not c for c in conts):
        raise ValueError("continuation_logprobs needs non-empty continuations")
    device = model.device
    prefix, last = context[:-1], context[-1:]  # the last context token predicts each continuation's first
    cache = None
    if prefix:
        cache = model(input_ids=torch.tensor([prefix], device=device), use_cache=True).past_key_values
        cache.batch_repeat_interleave(len(conts))
    rows = [last + c[:-1] for c in conts]  # position j predicts c[j]
    width = max(map(len, rows))
    pad = pad if pad is not None else 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * (len(prefix) + len(r)) + [0] * (width - len(r)) for r in rows], device=device)
    logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=cache is not None).logits
    logprobs = logits.float().log_softmax(-1)
    scores = []
    for row, cont in enumerate(conts):
        targets = torch.tensor(cont, device=device)
        scores.append(float(logprobs[row, torch.arange(len(cont), device=device), targets].sum()))
    refuse_non_finite(scores, "multiple-choice scoring", model)
    return scores


def score_loglik(model, tokenizer, task: str, items: list[dict], progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    hits = hits_norm = 0
    for item in tqdm(items, desc=f"{task} (loglik)", disable=not progress):
        choices = options(task, item)
        if item["answer"] not in choices:
            raise DataError(f"{task}: answer {item['answer']!r} is not among the options {choices}")
        lp = option_logprobs(model, tokenizer, item, choices)
        norm = [s / len((" " + c).encode()) for s, c in zip(lp, choices)]
        hits += choices[max(range(len(lp)), key=lp.__getitem__)] == item["answer"]
        hits_norm += choices[max(range(len(norm)), key=norm.__getitem__)] == item["answer"]
    return {"acc": hits / len(items), "acc_norm": hits_norm / len(items), "n": len(items)}


def score_generate(model, tokenizer, task, items, max_new_tokens=32, batch_size=16, progress=True) -> dict:
    from .generate import generate_responses

    responses = generate_responses(
        model, tokenizer, [_prompt(i) for i in items], max_new_tokens, batch_size, progress=progress
    )
    hits = sum(extract_answer(task, r) == i["answer"] for r, i in zip(responses, items))
    return {"acc": hits / len(items), "n": len(items)}


def evaluate_commonsense(
    model, tokenizer, folder, mode: str = "loglik", tasks=None, limit=None, batch_size=16, progress=True
) -> dict:
    """Per-task scores and their unweighted average (the mean of task accuracies, as Table 3 reports)."""
    if mode not in ("loglik", "generate"):
        raise ValueError(f"commonsense mode must be loglik or generate, got {mode!r}")
    from ..data import ensure_chat_template

    ensure_chat_template(tokenizer)
    tasks = tasks or available_tasks(folder)
    per_task = {}
    for task in tasks:
        items = load_task(folder, task, limit)
        if mode == "loglik":
            per_task[task] = score_loglik(model, tokenizer, task, items, progress)
        else:
            per_task[task] = score_generate(model, tokenizer, task, items, batch_size=batch_size, progress=progress)
    average = sum(s["acc"] for s in per_task.values()) / len(per_task)
    return {"mode": mode, "tasks": per_task, "average": average}
