"""One evaluation, written once: an EvalSpec's inputs read (before any model is loaded, so a typo fails in a
second), then the measures it asks for computed on one model, stage by stage (a killed run resumes at its first
unfinished stage: stages.py), and the judge's verdicts added once that model is released. `logitguard eval` and the
runner (every experiment file) call read_inputs, measure and judge_measured; they differ only in where the model
comes from and what they write.
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
    resumed: list[str] = field(default_factory=list)  # stages read back from an earlier, killed run (StageStore)
    # the dtype the model computed in (an unset eval dtype resolves per machine); None when a server generated
    dtype: str | None = None


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
    model,
    tokenizer,
    spec,
    inputs: Inputs,
    folder: str | Path | None = None,
    judge=None,
    progress: bool = True,
    resume: str | None = None,
) -> Measured:
    """The measures the spec asks for (its settings: keywords, lengths, batch size) on the inputs, on `model`;
    the safety summary and records (redacted) and the utility benchmarks' per-item records are written to `folder`
    (needed with utility benchmarks). `judge`: a judge object, else one made from spec.judge, run after every
    other measure (a caller that owns the model passes neither and calls judge_measured once it has released the
    model, as `logitguard eval` and the runner do). Generation joins waiting prompts to the rows in flight as
    spec.continuous_batching says. `resume`: a key (stages.evaluation_key) under which each finished stage is kept
    in `folder`/stages until the last one is done, and read back instead of measured again when a run killed mid-way
    is started again."""
    from .decode import joining
    from .endpoint import engine_for
    from .generate import loaded_dtype
    from .stages import StageStore

    if inputs.utility and folder is None:
        raise ValueError("measure: utility benchmarks write their records to a folder; give one")
    store = StageStore(folder, resume) if resume and folder is not None else None
    measured, utility_records = Measured({}, [], {}, {}), []
    measured.dtype = loaded_dtype(model) if model is not None and engine_for(None) is None else None
    with joining(spec.continuous_batching):
        for stage, compute in _stages(model, tokenizer, spec, inputs, progress):
            part = store.load(stage) if store else None
            if part is not None:
                measured.resumed.append(stage)
                print(f"evaluation: {stage} was measured before the restart; read from {store.dir}", flush=True)
            else:
                start = time.perf_counter()
                part = compute()
                part["seconds"] = round(time.perf_counter() - start, 2)
                if store:
                    store.save(stage, part)
            utility_records += _merge(measured, stage, part)
            if stage == "safety" and folder is not None:  # kept now: a later failure does not lose them
                from .safety import write_eval

                write_eval(folder, measured.summary, measured.records)
    if inputs.utility:
        from .items import utility_items
        from .utility_suite import headline_metrics, write_utility_records

        write_utility_records(folder, utility_records)
        measured.metrics["utility"] = measured.summary["utility"]
        measured.metrics.update(headline_metrics(measured.summary["utility"]))
        measured.items.update(utility_items(utility_records))
    if store:  # every stage measured: a later run of the same evaluation measures afresh
        store.clear()
    if judge is not None or spec.judge:
        judge_measured(measured, judge if judge is not None else spec.judge, folder, progress)
    return measured


def _merge(measured: Measured, stage: str, part: dict) -> list[dict]:
    """One stage's part added to the evaluation; its utility records (written once every set is scored)."""
    measured.summary.update(part.get("summary", {}))
    if "utility" in part:
        measured.summary.setdefault("utility", {}).update(part["utility"])
    measured.records += part.get("records", [])
    measured.metrics.update(part.get("metrics", {}))
    measured.items.update(part.get("items", {}))
    measured.seconds[stage] = part["seconds"]
    return part.get("utility_records", [])


def _stages(model, tokenizer, spec, inputs: Inputs, progress: bool):
    """(stage name, the function that measures it) for every stage the inputs ask for, in order. Each function
    returns its part: "summary", "records", "metrics", "items", or a utility set's "utility" and
    "utility_records"; plain JSON, so a part read back from disk is the part measured."""

    def safety() -> dict:
        from .items import safety_items
        from .safety import evaluate_safety

        summary, records = evaluate_safety(
            model, tokenizer, inputs.harmful, inputs.benign, inputs.borderline, keyword_list=spec.keywords,
            max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size, progress=progress,
        )  # fmt: skip
        keys = ("refusal_rate", "asr", "over_refusal_benign", "over_refusal_borderline")
        metrics = {k: summary[k] for k in keys if k in summary}
        if len(inputs.harmful) > 1:
            metrics.update({f"refusal_{name}": rate for name, rate in summary["refusal_by_set"].items()})
        return {"summary": summary, "records": records, "metrics": metrics, "items": safety_items(records)}

    def loss(name: str, chats: list) -> dict:
        from .utility import conversation_losses

        pairs = conversation_losses(model, tokenizer, chats, spec.max_length, spec.batch_size)
        key = "eval_loss" if len(inputs.losses) == 1 else f"eval_loss_{name}"
        return {"metrics": {key: sum(x for x, _ in pairs) / sum(n for _, n in pairs)},
                "items": {f"loss:{name}": [[round(x, 6), n] for x, n in pairs if n]}}  # fmt: skip

    def exact(name: str, chats: list) -> dict:
        from .utility import exact_match

        key = "exact_match" if len(inputs.exact_match) == 1 else f"exact_match_{name}"
        rate, matched = exact_match(model, tokenizer, chats, spec.max_new_tokens, spec.batch_size)
        return {"metrics": {key: rate},
                "items": {f"exact_match:{name}": "".join("1" if r["match"] else "0" for r in matched)}}  # fmt: skip

    def commonsense() -> dict:
        from .commonsense import evaluate_commonsense

        scores = evaluate_commonsense(
            model, tokenizer, spec.commonsense, mode=spec.commonsense_mode, limit=spec.limit,
            batch_size=spec.batch_size, progress=progress,
        )  # fmt: skip
        return {"summary": {"commonsense": scores}, "metrics": {"commonsense": scores,
                "commonsense_avg": scores["average"]}}  # fmt: skip

    def utility(name: str, rows: list) -> dict:
        from .utility_suite import evaluate_utility

        result, records = evaluate_utility(
            model, tokenizer, {name: rows}, spec.utility_max_new_tokens, spec.batch_size, progress=progress
        )
        return {"utility": result, "utility_records": records}

    if inputs.harmful:
        yield "safety", safety
    for name, chats in inputs.losses.items():
        yield f"loss:{name}", lambda name=name, chats=chats: loss(name, chats)
    for name, chats in inputs.exact_match.items():
        yield f"exact_match:{name}", lambda name=name, chats=chats: exact(name, chats)
    if spec.commonsense:
        yield "commonsense", commonsense
    for name, rows in (inputs.utility or {}).items():  # one set at a time, to time each
        yield f"utility:{name}", lambda name=name, rows=rows: utility(name, rows)


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
