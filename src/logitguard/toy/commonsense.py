"""A toy stand-in for the LLM-Adapters commonsense data: the eight task names and answer formats of Table 3,
filled with small number questions the toy model can learn on a CPU.

Same schema as commonsense_15k and the test sets ({instruction, input: "", output: "the correct answer is
X", answer: X}), so `logitguard experiment run table3_commonsense --variant toy` exercises the real loaders and
scorers. The questions are synthetic; the accuracies measure the pipeline, not commonsense.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..files import write_text_atomic


def _choice_task(rng, n_options: int, word: str, label: str) -> tuple[str, str]:
    """'Which number is the largest?' with n options named word1..wordN."""
    values = rng.sample(range(1, 60), n_options)
    lines = [f"{label}{i + 1}: {v}" for i, v in enumerate(values)]
    answer = f"{word}{values.index(max(values)) + 1}"
    formats = "/".join(f"{word}{i + 1}" for i in range(n_options))
    return "Which number is the largest?\n" + "\n".join(lines) + f"\n\nAnswer format: {formats}", answer


def _item(rng: random.Random, task: str) -> dict:
    if task == "boolq":
        a, b = rng.sample(range(1, 60), 2)
        instruction = f"Is {a} larger than {b}?\n\nAnswer format: true/false"
        answer = "true" if a > b else "false"
    elif task == "piqa":
        a = rng.randrange(1, 60)
        good, bad = f"{a + 1}", f"{a - 1}"
        first = rng.random() < 0.5
        s1, s2 = (good, bad) if first else (bad, good)
        instruction = (
            f"Goal: the number after {a}.\nSolution1: {s1}\nSolution2: {s2}\n\nAnswer format: solution1/solution2"
        )
        answer = "solution1" if first else "solution2"
    elif task == "winogrande":
        a, b = rng.sample(range(1, 60), 2)
        instruction = f"Option1: {a}\nOption2: {b}\nWhich option is smaller?\n\nAnswer format: option1/option2"
        answer = "option1" if a < b else "option2"
    elif task == "hellaswag":
        instruction, answer = _choice_task(rng, 4, "ending", "Ending")
    elif task == "social_i_qa":
        instruction, answer = _choice_task(rng, 3, "answer", "Answer")
    else:  # ARC-Easy, ARC-Challenge, openbookqa
        instruction, answer = _choice_task(rng, 4, "answer", "Answer")
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def write_toy_commonsense(folder: str | Path, seed: int = 0, n_train: int = 80, n_test: int = 40) -> Path:
    """Write `<folder>/commonsense_train.json` (all tasks, shuffled; the commonsense_15k stand-in) and
    `<folder>/<task>/{train,test}.json` (per task, for continual learning and evaluation)."""
    from ..eval.commonsense import TASKS

    folder = Path(folder)
    if (folder / "commonsense_train.json").is_file():
        return folder
    rng = random.Random(seed)
    train = []
    for task in TASKS:
        task_train = [_item(rng, task) for _ in range(n_train)]
        test = [_item(rng, task) for _ in range(n_test)]
        train += task_train
        (folder / task).mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / task / "train.json", json.dumps(task_train, indent=1))
        write_text_atomic(folder / task / "test.json", json.dumps(test, indent=1))
    rng.shuffle(train)
    write_text_atomic(folder / "commonsense_train.json", json.dumps(train, indent=1))
    return folder
