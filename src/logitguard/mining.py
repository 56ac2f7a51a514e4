"""Mining safety tokens from an aligned model's own refusals (`logitguard tokens mine`).

The aligned model answers harmful and benign prompts greedily; responses are split into refusals and
normal answers by a refusal filter (REFUSAL_FILTER, the `opening` detector, by default; any name of
logitguard.eval.keyword's lists or detectors). Each token seen in the first `window` positions of a response
is scored by
  log_odds   log-odds of appearing in the opening of refusals vs. of normal answers (add-0.5 smoothing)
  first_prob the aligned model's mean probability of the token at the first response position of the
             harmful prompts
  prob_gain  (with an unaligned base model) first_prob(aligned) - first_prob(base), PACT's criterion
and ranked by log-odds, then first_prob. The top tokens form a SafetyTokens set (source "mined").

`mine_pact_tokens` is PACT's rule (its authors' compute_safety_tokens_pact.py): the aligned model and its unaligned
base are teacher-forced on the aligned model's own refusals to the harmful prompts (at most 64 response tokens;
the aligned model's chat template, the base a plain "User: ...\n\nAssistant: " prompt, one tokenizer). Per
response position over the whole vocabulary p_ref = softmax(l_aligned) and diff = p_ref - softmax(l_base), each
averaged over positions, then over prompts. The set: the top-k tokens by mean p_ref; their weights v: diff on
those tokens, z-scored, then L2-normalised (about half are negative: no target mass in the loss).
The authors mine from a fixed file of (prompt, refusal) pairs (safe_direction.json, its first 512: `--K 512`), with
no generation and no refusal filter: `read_pairs` + `mine_pact_from_pairs` (`tokens mine --rule pact --pairs`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import torch

from .reference import eval_mode
from .tokens import SafetyTokens, TokenError


@torch.no_grad()
def first_position_probs(model, tokenizer, prompts: list[str], batch_size: int = 16) -> torch.Tensor:
    """Mean next-token distribution (V,) at the first response position over `prompts`."""
    from .data import ensure_chat_template

    ensure_chat_template(tokenizer)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # the last position is the first response one
    try:
        with eval_mode(model):
            total = None
            for start in range(0, len(prompts), batch_size):
                texts = [
                    tokenizer.apply_chat_template(
                        [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                    )
                    for p in prompts[start : start + batch_size]
                ]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
                logits = model(**enc).logits[:, -1].float()  # (b, V)
                probs = torch.softmax(logits, dim=-1).sum(dim=0).cpu()
                total = probs if total is None else total + probs
            return total / len(prompts)
    finally:
        tokenizer.padding_side = side


def opening_counts(tokenizer, responses: list[str], window: int) -> Counter:
    """In how many responses each token id appears among the first `window` tokens."""
    counts: Counter = Counter()
    for text in responses:
        counts.update(set(tokenizer.encode(text, add_special_tokens=False)[:window]))
    return counts


def mine_tokens(
    model,
    tokenizer,
    harmful: list[str],
    benign: list[str],
    base_model=None,
    top: int = 5,
    window: int = 3,
    keyword_list: str | None = None,
    max_new_tokens: int = 24,
    progress: bool = True,
) -> tuple[SafetyTokens, list[dict]]:
    """Rank tokens by how specific they are to the model's refusals; return the top set and the ranked rows.
    `keyword_list`: the refusal filter's name (None: REFUSAL_FILTER)."""
    from .eval import generate_responses, is_refusal
    from .eval.keyword import refusal_keywords

    keyword_list = keyword_list or REFUSAL_FILTER
    refusal_keywords(keyword_list)  # an unknown name fails before any generation
    responses = generate_responses(
        model, tokenizer, harmful + benign, max_new_tokens=max_new_tokens, progress=progress
    )
    refusals = [r for r in responses if is_refusal(r, keyword_list)]
    answers = [r for r in responses[len(harmful) :] if not is_refusal(r, keyword_list)]
    if not refusals:
        raise TokenError("the model refused none of the prompts, so there are no refusals to mine tokens from")
    if not answers:
        raise TokenError("the model refused every benign prompt, so refusals cannot be contrasted with answers")
    in_refusals, in_answers = opening_counts(tokenizer, refusals, window), opening_counts(tokenizer, answers, window)
    first = first_position_probs(model, tokenizer, harmful)
    gain = first - first_position_probs(base_model, tokenizer, harmful) if base_model is not None else None
    special = set(tokenizer.all_special_ids)
    rows = []
    for tid in set(in_refusals) - special:
        r, a = in_refusals[tid], in_answers.get(tid, 0)
        log_odds = math.log((r + 0.5) / (len(refusals) - r + 0.5)) - math.log((a + 0.5) / (len(answers) - a + 0.5))
        row = {
            "id": tid,
            "token": tokenizer.convert_ids_to_tokens(tid),
            "log_odds": round(log_odds, 4),
            "refusal_share": round(r / len(refusals), 4),
            "answer_share": round(a / len(answers), 4),
            "first_prob": round(float(first[tid]), 6),
        }
        if gain is not None:
            row["prob_gain"] = round(float(gain[tid]), 6)
        rows.append(row)
    rows.sort(key=lambda x: (-x["log_odds"], -x["first_prob"]))
    chosen = rows[:top]
    tokens = SafetyTokens(
        ids=tuple(r["id"] for r in chosen),
        tokens=tuple(r["token"] for r in chosen),
        source="mined",
        rows=tuple(chosen),
        mining={"rule": "log_odds", "keywords": keyword_list, "refusals": len(refusals), "answers": len(answers)},
    )
    return tokens, rows


def format_ranking(rows: list[dict], top: int) -> str:
    names = ("id", "token", "log_odds", "refusal_share", "answer_share", "first_prob", "prob_gain", "p_ref", "diff",
             "weight")  # fmt: skip
    keys = [k for k in names if k in rows[0]]
    lines = ["  ".join(f"{k:>13}" for k in keys)]
    for r in rows[:top]:
        lines.append("  ".join(f"{r[k]!s:>13}" if k != "token" else f"{r[k]!r:>13}" for k in keys))
    return "\n".join(lines)


RULES = ("log_odds", "pact")
PACT_TOP = 50  # PACT's published setting (--topk 50)
PACT_RESPONSE_TOKENS = 64  # PACT's max_resp_len
PACT_MAX_PAIRS = 512  # PACT's README: --K 512, the first 512 pairs of safe_direction.json (1,035 rows)
# The refusal filter for self-generated answers. `opening` and not the papers' qi2023 list: that list has no bare
# "I can't", the opening of most refusals of current models (239 of the first 512 of PACT's own pairs).
REFUSAL_FILTER = "opening"

# PACT's InstructionDataset reads a row without "messages" from the first of these keys that holds text
PAIR_PROMPT_KEYS = ("input", "instruction", "prompt", "user_prompt")
PAIR_RESPONSE_KEYS = ("output", "response", "assistant")


def base_prompt(messages: list[dict] | str) -> str:
    """The plain prompt PACT gives the unaligned base model: each user message as "User: ...\n\n" (system
    messages dropped), then "Assistant: "."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    users = "".join(f"User: {m.get('content', '')}\n\n" for m in messages if m.get("role") == "user")
    return users + "Assistant: "


def _pair(row, where: str) -> tuple[list[dict], str] | None:
    """One row as PACT's InstructionDataset normalises it: (prompt messages, response), or None for a row without
    a user message (the authors skip those). With "messages": the system messages, the first user message, the
    first assistant message after it. Otherwise the first text of PAIR_PROMPT_KEYS (stripped) and of
    PAIR_RESPONSE_KEYS. A missing or blank response gives "" (skipped when mining, as the authors do)."""
    from .data import DataError

    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    if isinstance(row.get("messages"), list) and row["messages"]:
        system, user, assistant = [], None, None
        for m in row["messages"]:
            if not isinstance(m, dict):
                continue
            role, content = m.get("role"), m.get("content", "")
            if role == "system":
                system.append({"role": "system", "content": content})
            elif role == "user" and user is None:
                user = {"role": "user", "content": content}
            elif role == "assistant" and user is not None and assistant is None:
                assistant = str(content or "")
        if user is None or not str(user["content"]).strip():
            return None
        return system + [user], assistant if assistant and assistant.strip() else ""
    prompt = str(next((row[k] for k in PAIR_PROMPT_KEYS if row.get(k)), "")).strip()
    if not prompt:
        return None
    return [{"role": "user", "content": prompt}], str(next((row[k] for k in PAIR_RESPONSE_KEYS if row.get(k)), ""))


def read_pairs(path: str | Path) -> list[tuple[list[dict], str]]:
    """(prompt messages, response) pairs from a file, in file order: PACT's layout (a JSON list of {"input",
    "output", ...}, as safe_direction.json; or {"data": [...]}) or ours (JSONL of {"messages": [user, assistant]}
    or {"prompt", "response"}); a file that is not one JSON value is read as JSONL. Rows without a user message
    are left out, as the authors' loader does."""
    from .data import DataError

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"pairs file {path} does not exist (or is not a file)")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        rows = data.get("data", [data]) if isinstance(data, dict) else data
        wheres = [f"{path} row {i + 1}" for i in range(len(rows))] if isinstance(rows, list) else []
    except json.JSONDecodeError:
        rows, wheres = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {n}: not JSON ({e.msg})") from None
                wheres.append(f"{path} line {n}")
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of pairs, or JSONL")
    pairs = [p for p in (_pair(row, where) for row, where in zip(rows, wheres)) if p is not None]
    if not pairs:
        raise DataError(f"{path}: no (prompt, response) pairs found")
    return pairs


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@torch.no_grad()
def teacher_forced_probs(model, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> torch.Tensor:
    """(V,) the mean over examples of the mean over response positions of softmax(logits), fp32, one example at a
    time (no padding): position P - 1 + j of prompt + response predicts response token j."""
    with eval_mode(model):
        total = None
        for prompt, response in zip(prompt_ids, response_ids):
            ids = torch.as_tensor([prompt + response], device=model.device)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()  # (P + R, V)
            probs = torch.softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(response)], dim=-1)  # (R, V)
            mean = probs.mean(dim=0).cpu()
            total = mean if total is None else total + mean
        return total / len(prompt_ids)


def pact_token_weights(p_ref: torch.Tensor, diff: torch.Tensor | None, top: int, eps: float = 1e-6):
    """PACT's selection: (ids, v) for the `top` tokens by mean aligned probability `p_ref` (V,), in that order,
    with v = diff on them, z-scored (over the nonzero entries, unbiased std), then L2-normalised; tokens whose v
    is exactly 0 are dropped, as the authors' loss keeps only nonzero entries. Without `diff` (no base model) every
    token gets the same positive weight 1 / sqrt(top)."""
    order = torch.topk(p_ref, k=top).indices
    if diff is None:
        return order.tolist(), [1.0 / math.sqrt(top)] * top
    v = torch.zeros_like(diff, dtype=torch.float32)
    v[order] = diff[order].float()
    nonzero = v.abs() > 1e-9
    if nonzero.sum() < 2:
        raise TokenError("aligned and base model agree on the candidate tokens: no PACT weights to compute")
    centered = v[nonzero] - v[nonzero].mean()
    v[nonzero] = centered / (centered.std() + eps)
    v = v / (v.norm() + eps)
    ids = [int(i) for i in order if v[i] != 0]
    return ids, [float(v[i]) for i in ids]


def mine_pact_from_pairs(
    model,
    tokenizer,
    pairs: list[tuple[list[dict] | str, str]],
    base_model=None,
    top: int = PACT_TOP,
    response_tokens: int = PACT_RESPONSE_TOKENS,
    mining: dict | None = None,
) -> tuple[SafetyTokens, list[dict]]:
    """PACT's token set and weights from fixed (prompt, response) pairs, every one used (no refusal filter), as the
    authors' _build_logit_direction_T1_D1: pairs whose stripped response is empty, or encodes to no token, are
    skipped; a prompt is a string or a message list (system messages reach the aligned model's chat template, not
    the base model's plain prompt). `mining` is recorded in the token set, with the number of pairs used."""
    from .data import ensure_chat_template

    ensure_chat_template(tokenizer)
    if top > len(tokenizer):
        raise TokenError(f"--top {top} is larger than the vocabulary ({len(tokenizer)})")
    prompts, answers = [], []
    for prompt, response in pairs:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        answer = tokenizer.encode(str(response).strip(), add_special_tokens=False)[:response_tokens]
        if answer:
            prompts.append(messages)
            answers.append(answer)
    if not answers:
        raise TokenError("no pair has a non-empty response: no refusals to mine tokens from")
    aligned_prompts = [
        tokenizer.encode(
            tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True), add_special_tokens=False
        )
        for m in prompts
    ]
    p_ref = teacher_forced_probs(model, aligned_prompts, answers)
    diff = None
    if base_model is not None:
        base_prompts = [tokenizer.encode(base_prompt(m), add_special_tokens=False) for m in prompts]
        diff = p_ref - teacher_forced_probs(base_model, base_prompts, answers)
    ids, weights = pact_token_weights(p_ref, diff, top)
    rows = []
    for tid, w in zip(ids, weights):
        row = {"id": tid, "token": tokenizer.convert_ids_to_tokens(tid), "p_ref": round(float(p_ref[tid]), 6)}
        if diff is not None:
            row["diff"] = round(float(diff[tid]), 6)
        row["weight"] = round(w, 6)
        rows.append(row)
    record = {"rule": "pact", **(mining or {}), "pairs_used": len(answers), "response_tokens": response_tokens,
              "base": base_model is not None}  # fmt: skip
    tokens = SafetyTokens(
        ids=tuple(ids),
        tokens=tuple(tokenizer.convert_ids_to_tokens(ids)),
        source="mined",
        rows=tuple(rows),
        weights=tuple(weights),
        mining=record,
    )
    return tokens, rows


def mine_pact_tokens(
    model,
    tokenizer,
    harmful: list[str],
    base_model=None,
    top: int = PACT_TOP,
    response_tokens: int = PACT_RESPONSE_TOKENS,
    keyword_list: str | None = None,
    progress: bool = True,
) -> tuple[SafetyTokens, list[dict]]:
    """PACT's token set and weights from the aligned model's own refusals (see the module doc): greedy answers to
    `harmful`, kept where the refusal filter `keyword_list` (None: REFUSAL_FILTER) says they refuse."""
    from .data import ensure_chat_template
    from .eval import generate_responses, is_refusal
    from .eval.keyword import refusal_keywords

    keyword_list = keyword_list or REFUSAL_FILTER
    refusal_keywords(keyword_list)  # an unknown name fails before any generation
    ensure_chat_template(tokenizer)
    if top > len(tokenizer):
        raise TokenError(f"--top {top} is larger than the vocabulary ({len(tokenizer)})")
    responses = generate_responses(model, tokenizer, harmful, max_new_tokens=response_tokens, progress=progress)
    pairs = [(p, r.strip()) for p, r in zip(harmful, responses) if r.strip() and is_refusal(r, keyword_list)]
    if not pairs:
        raise TokenError(
            f"the refusal filter {keyword_list!r} found no refusal among the model's answers to the "
            f"{len(harmful)} prompts, so there are no refusals to mine tokens from"
        )
    mining = {"keywords": keyword_list, "prompts": len(harmful), "refusals": len(pairs)}
    return mine_pact_from_pairs(model, tokenizer, pairs, base_model, top, response_tokens, mining)
