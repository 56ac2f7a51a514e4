"""HumanEval pass@1 for chat models: a greedy completion per problem, executed against the problem's tests in
the sandbox (logitguard.eval.sandbox: a subprocess per problem with time, memory and file limits, no network, and
a filesystem of its own that holds none of the user's files).

The model is asked, through its chat template, to complete the function and answer with one Python code
block. The program run is the problem's prompt (imports, helpers, the signature and docstring), then the
extracted code, then the problem's `check` function called on the entry point:
- code that defines `def <entry_point>(` replaces the prompt's stub (a def whose body is only a docstring is
  valid Python), so a full-function answer and the prompt's helpers both work;
- code that does not is taken as the body continuing the prompt (the original Codex protocol).
With one greedy sample per problem, pass@1 is the share of problems whose program exits with status 0.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

from .sandbox import DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT, resolve_isolation, run_python

HUMANEVAL_VERSION = 1
INSTRUCTION = (
    "Complete the following Python function. Answer with the complete function in a single ```python code "
    "block, without tests or example usage.\n\n```python\n{prompt}```"
)
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def humaneval_prompt(problem: dict) -> str:
    """The user message for one problem."""
    return INSTRUCTION.format(prompt=problem["prompt"])


def extract_code(response: str) -> str:
    """The first fenced code block of `response` (an unclosed fence runs to the end), else the whole text."""
    match = _FENCE.search(response)
    return match.group(1) if match else response


def code_closed(response: str) -> bool:
    """Whether the first fenced code block of `response` has closed: nothing after it changes `extract_code`."""
    match = _FENCE.search(response)
    return match is not None and match.group(0).endswith("```")


def code_block(response: str) -> str:
    """ "closed", "cut" (a code block opened and never closed: generation stopped inside it, at the token budget,
    since a model that ends its answer closes its block) or "none" (an answer without a code block)."""
    if code_closed(response):
        return "closed"
    return "cut" if _FENCE.search(response) else "none"


def build_program(problem: dict, completion: str) -> str:
    """The program that passes (exit status 0) exactly when `completion` solves `problem`."""
    code = extract_code(completion)
    entry = problem["entry_point"]
    if re.search(rf"^\s*(async\s+)?def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
        body = problem["prompt"] + "\n" + code  # a full definition: it replaces the prompt's stub
    else:
        body = problem["prompt"] + code  # the function body, continuing the prompt
    return f"{body}\n\n{problem['test']}\n\ncheck({entry})\n"


def execute(
    problems: list[dict],
    completions: list[str],
    timeout: float = DEFAULT_TIMEOUT,
    memory_mb: int = DEFAULT_MEMORY_MB,
    workers: int = 2,
    isolation: str = "auto",
) -> list[dict]:
    """One record per problem: {"task_id", "passed", "status", "detail", "completion"}, in order."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")

    def run(pair):
        problem, completion = pair
        result = run_python(build_program(problem, completion), timeout, memory_mb, isolation)
        return {
            "task_id": problem["task_id"],
            "passed": result.passed,
            "status": result.status,
            "detail": result.detail,
            "isolation": result.isolation,
            "completion": completion,
        }

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(run, zip(problems, completions)))


def evaluate_humaneval(
    model,
    tokenizer,
    problems: list[dict],
    max_new_tokens: int = 512,
    batch_size: int = 16,
    timeout: float = DEFAULT_TIMEOUT,
    workers: int = 2,
    progress: bool = True,
    isolation: str = "auto",
) -> tuple[dict, list[dict]]:
    """(summary, records): greedy completions through the chat template, executed in the sandbox.

    summary: {"pass@1", "passed", "n", "timeouts", "cut", "cut_passed", "no_code_block", "isolation",
    "max_new_tokens", "version"}. `cut`: answers whose code block was still open when generation stopped (at
    max_new_tokens); they rarely pass, so where many are, pass@1 measures how many answers fit the budget as much as
    how many are right. `no_code_block`: answers without one (their whole text is run)."""
    from .generate import StopRule, generate_responses

    if not problems:
        raise ValueError("evaluate_humaneval needs at least one problem")
    isolation = resolve_isolation(isolation)  # before the generation: a machine that cannot run them says so first
    prompts = [humaneval_prompt(p) for p in problems]
    # generation ends where the answer's code block closes: the program run is the same, the prose after it is
    # never generated
    completions = generate_responses(
        model, tokenizer, prompts, max_new_tokens, batch_size, progress=progress, stop=StopRule(code_closed, "`")
    )
    records = execute(problems, completions, timeout=timeout, workers=workers, isolation=isolation)
    for record, completion in zip(records, completions):
        record["code_block"] = code_block(completion)
    passed = sum(r["passed"] for r in records)
    summary = {
        "pass@1": passed / len(records),
        "passed": passed,
        "n": len(records),
        "timeouts": sum(r["status"] == "timeout" for r in records),
        "cut": sum(r["code_block"] == "cut" for r in records),
        "cut_passed": sum(r["passed"] and r["code_block"] == "cut" for r in records),
        "no_code_block": sum(r["code_block"] == "none" for r in records),
        "isolation": sorted({r["isolation"] for r in records}),
        "max_new_tokens": max_new_tokens,
        "version": HUMANEVAL_VERSION,
    }
    return summary, records
