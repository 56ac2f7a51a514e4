"""One evaluation, written once: an EvalSpec's inputs read (before any model is loaded, so a typo fails in a
second), then the measures it asks for computed on one model. `logitguard eval` and the runner (every experiment
file) call these two functions; they differ only in where the model comes from and what they write.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Inputs:
    """What an evaluation reads: prompts by set, held-out conversations by file stem, utility items."""

    harmful: dict[str, list[str]] | None = None  # {set label: prompts}; one entry for a single file
    benign: list[str] | None = None
    borderline: list[str] | None = None
    losses: dict[str, list[list[dict]]] = field(default_factory=dict)  # {file stem: conversations}
    exact_match: dict[str, list[list[dict]]] = field(default_factory=dict)  # {name: conversations}
    utility: dict | None = None  # eval/utility_suite.load_utility_sets


@dataclass
class Measured:
    summary: dict  # `logitguard eval`'s summary.json: the safety summary, judge, commonsense and utility summaries
    records: list[dict]  # per-prompt safety records (the writers cut harmful responses to ten words)
    metrics: dict  # the flat numbers a results row keeps (refusal_rate, eval_loss_<stem>, humaneval_pass@1, ...)
    items: dict  # per-item outcomes, in the evaluation's order: the paired statistics' input (stats.py)
    seconds: dict = field(default_factory=dict)  # wall seconds per stage: safety, loss:<stem>, utility:<set>, ...


def _limited(items: list, limit: int | None) -> list:
    return items if limit is None else items[:limit]


def conversations(path: str, limit: int | None = None) -> list[list[dict]]:
    """A chat data file's conversations (any format logitguard trains on), the first `limit`."""
    from ..data import load_rows, to_messages

    return _limited([to_messages(r) for r in load_rows(path)], limit)


def read_inputs(spec, assets: str | Path | None = None) -> Inputs:
    """Every file and set the spec names, read and checked; set names from `assets` (default $LOGITGUARD_ASSETS,
    else experiments/assets)."""
    from .prompts import read_prompt_sets, read_prompts

    inputs = Inputs()
    if spec.harmful:  # a comma list of harmful sets is generated in one pass and scored per set too
        inputs.harmful = read_prompt_sets(spec.harmful, assets, spec.limit)
    inputs.benign = _limited(read_prompts(spec.benign, assets), spec.limit) if spec.benign else None
    inputs.borderline = _limited(read_prompts(spec.borderline, assets), spec.limit) if spec.borderline else None
    if spec.loss_data:  # a comma list: one eval loss per file, "eval_loss_<stem>"
        paths = [p.strip() for p in spec.loss_data.split(",")]
        inputs.losses = {Path(p).stem: conversations(p, spec.limit) for p in paths}
    if spec.exact_match:  # a comma list: one exact match per file, "exact_match_<stem>"
        paths = [p.strip() for p in spec.exact_match.split(",")]
        inputs.exact_match = {Path(p).stem: conversations(p, spec.limit) for p in paths}
    if spec.utility:
        from .utility_suite import load_utility_sets, parse_utility

        inputs.utility = load_utility_sets(parse_utility(spec.utility), assets, spec.limit)
        if "humaneval" in inputs.utility:  # a machine that cannot sandbox its programs says so before any generation
            from .sandbox import resolve_isolation

            resolve_isolation()
    if spec.commonsense:
        from .commonsense import available_tasks

        available_tasks(spec.commonsense)
    return inputs


def measure(
    model, tokenizer, spec, inputs: Inputs, folder: str | Path | None = None, judge=None, progress: bool = True
) -> Measured:
    """The measures the spec asks for (its settings: keywords, lengths, batch size) on the inputs, on `model`;
    the safety summary and records (redacted) and the utility benchmarks' per-item records are written to `folder`
    (needed with utility benchmarks). `judge`: a judge object, else one made from spec.judge, run after every
    other measure (a caller that owns the model passes neither and calls judge_measured once it has released the
    model, as `logitguard eval` and the runner do). Generation joins waiting prompts to the rows in flight as
    spec.continuous_batching says."""
    from .decode import joining

    with joining(spec.continuous_batching):
        return _measure(model, tokenizer, spec, inputs, folder, judge, progress)


def _measure(model, tokenizer, spec, inputs: Inputs, folder, judge, progress: bool) -> Measured:
    if inputs.utility and folder is None:
        raise ValueError("measure: utility benchmarks write their records to a folder; give one")
    from .items import safety_items, utility_items

    summary, records, metrics, items, seconds = {}, [], {}, {}, {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:  # where an evaluation's time goes: what a faster one must cut
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = round(now - clock, 2)
        clock = now

    if inputs.harmful:
        from .safety import evaluate_safety

        summary, records = evaluate_safety(
            model, tokenizer, inputs.harmful, inputs.benign, inputs.borderline, keyword_list=spec.keywords,
            max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size, progress=progress,
        )  # fmt: skip
        keys = ("refusal_rate", "asr", "over_refusal_benign", "over_refusal_borderline")
        metrics.update({k: summary[k] for k in keys if k in summary})
        if len(inputs.harmful) > 1:
            metrics.update({f"refusal_{name}": rate for name, rate in summary["refusal_by_set"].items()})
        items.update(safety_items(records))
        if folder is not None:  # kept now, before the slower measures: a later failure does not lose them
            from .safety import write_eval

            write_eval(folder, summary, records)
        lap("safety")
    for name, chats in inputs.losses.items():
        from .utility import conversation_losses

        pairs = conversation_losses(model, tokenizer, chats, spec.max_length, spec.batch_size)
        key = "eval_loss" if len(inputs.losses) == 1 else f"eval_loss_{name}"
        metrics[key] = sum(x for x, _ in pairs) / sum(n for _, n in pairs)
        items[f"loss:{name}"] = [[round(x, 6), n] for x, n in pairs if n]
        lap(f"loss:{name}")
    for name, chats in inputs.exact_match.items():
        from .utility import exact_match

        key = "exact_match" if len(inputs.exact_match) == 1 else f"exact_match_{name}"
        metrics[key], matched = exact_match(model, tokenizer, chats, spec.max_new_tokens, spec.batch_size)
        items[f"exact_match:{name}"] = "".join("1" if r["match"] else "0" for r in matched)
        lap(f"exact_match:{name}")
    if spec.commonsense:
        from .commonsense import evaluate_commonsense

        scores = evaluate_commonsense(
            model, tokenizer, spec.commonsense, mode=spec.commonsense_mode, limit=spec.limit,
            batch_size=spec.batch_size, progress=progress,
        )  # fmt: skip
        summary["commonsense"] = metrics["commonsense"] = scores
        metrics["commonsense_avg"] = scores["average"]
        lap("commonsense")
    if inputs.utility:
        from .utility_suite import evaluate_utility, headline_metrics, write_utility_records

        summary["utility"], utility_records = {}, []
        for name, rows in inputs.utility.items():  # one set at a time, to time each
            result, recs = evaluate_utility(
                model, tokenizer, {name: rows}, spec.utility_max_new_tokens, spec.batch_size, progress=progress
            )
            summary["utility"].update(result)
            utility_records += recs
            lap(f"utility:{name}")
        write_utility_records(folder, utility_records)
        metrics["utility"] = summary["utility"]
        metrics.update(headline_metrics(summary["utility"]))
        items.update(utility_items(utility_records))
    measured = Measured(summary, records, metrics, items, seconds)
    if judge is not None or spec.judge:
        judge_measured(measured, judge if judge is not None else spec.judge, folder, progress)
    return measured


def judge_measured(measured: Measured, judge, folder: str | Path | None = None, progress: bool = True) -> None:
    """The judge's HRR added to a measured evaluation: its harmful records labelled in place, hrr in the summary
    and metrics, the records rewritten to `folder`. `judge`: a judge object or a spec (llama-guard:PATH,
    endpoint:URL). `logitguard eval` and the runner call it after releasing the model under test (measure with no
    judge, then this), so a Llama Guard judge loads into the memory that model held."""
    from .items import judge_items
    from .judge import judge_records, make_judge

    if not measured.records:
        return
    start = time.perf_counter()
    judge = make_judge(judge) if isinstance(judge, str) else judge
    measured.summary.update(judge_records(judge, measured.records, progress=progress))
    measured.metrics["hrr"] = measured.summary["hrr"]
    measured.items.update(judge_items(measured.records))
    if folder is not None:
        from .safety import write_eval

        write_eval(folder, measured.summary, measured.records)
    measured.seconds["judge"] = round(time.perf_counter() - start, 2)
