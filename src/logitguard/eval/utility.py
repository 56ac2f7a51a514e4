"""Utility measures: assistant-token cross-entropy (the paper's "eval loss", Table 5) and exact match of
greedy answers against reference answers.
"""

from __future__ import annotations

import torch

from ..data import DataError
from .finite import refuse_non_finite
from .generate import generate_responses


@torch.inference_mode()
def eval_loss(
    model, tokenizer, conversations: list[list[dict]], max_length: int = 256, batch_size: int = 8, fast: bool = True
) -> float:
    """Mean cross-entropy per assistant token over all `conversations` (a token mean, not a mean of batch
    means, so the result does not depend on batch_size or on padding).

    Tokenization and labels come from `logitguard.data.tokenize_conversation`, the same as training.
    Conversations left with no assistant token after truncation to `max_length` are skipped.
    fast=False: the reference path (batches in the given order, the head over every position).
    """
    if not fast:
        return _eval_loss_reference(model, tokenizer, conversations, max_length, batch_size)
    pairs = conversation_losses(model, tokenizer, conversations, max_length, batch_size)
    return sum(nll for nll, _ in pairs) / sum(n for _, n in pairs)


def _features(tokenizer, conversations: list[list[dict]], max_length: int) -> list[dict]:
    from ..data import ensure_chat_template, tokenize_conversation

    ensure_chat_template(tokenizer)
    feats = [tokenize_conversation(tokenizer, m, max_length) for m in conversations]
    if not any(any(label != -100 for label in f["labels"][1:]) for f in feats):  # label 0 has no prediction
        raise DataError("eval_loss: no conversation has an assistant token within max_length")
    return feats


@torch.inference_mode()
def conversation_losses(
    model, tokenizer, conversations: list[list[dict]], max_length: int = 256, batch_size: int = 8
) -> list[tuple[float, int]]:
    """(summed cross-entropy, assistant tokens) per conversation, in order ((0.0, 0) where none is left after
    truncation): the per-item data of the held-out loss, for paired comparisons between models.

    Batches hold similar lengths (longest first: little padding), and the output head runs only at the
    positions that predict an assistant token: a pre-hook hands it those hidden states alone, so the model's
    own transform of its logits (soft-cap, scale) still applies."""
    from ..data import ChatCollator
    from ..reference import eval_mode

    feats = _features(tokenizer, conversations, max_length)
    order = sorted(range(len(feats)), key=lambda i: -len(feats[i]["input_ids"]))
    collate = ChatCollator(tokenizer.pad_token_id)
    head = model.get_output_embeddings()
    out: list[tuple[float, int]] = [(0.0, 0)] * len(feats)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = {k: v.to(model.device) for k, v in collate([feats[i] for i in idx]).items()}
            labels = batch["labels"][:, 1:]  # (B, T-1): token t is predicted at position t-1
            scored = labels != -100  # (B, T-1)
            at = torch.nn.functional.pad(scored, (0, 1))  # (B, T): the positions whose output is scored
            hook = head.register_forward_pre_hook(lambda _, args, at=at: (args[0][at][None],))  # (1, N, H)
            try:
                # no KV cache: it would be built for every batch and dropped (gigabytes at 8B and long sequences)
                ids, mask = batch["input_ids"], batch["attention_mask"]
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[0]
            finally:
                hook.remove()
            nll = torch.nn.functional.cross_entropy(logits.float(), labels[scored], reduction="none")  # (N,)
            rows = scored.nonzero()[:, 0]  # (N,): the batch row of each scored position
            sums = torch.zeros(len(idx), device=nll.device, dtype=nll.dtype).index_add_(0, rows, nll)
            totals = sums.tolist()
            refuse_non_finite(totals, "held-out loss", model)
            for i, total, n in zip(idx, totals, scored.sum(-1).tolist()):
                out[i] = (total, n)
    return out


def _eval_loss_reference(model, tokenizer, conversations, max_length, batch_size) -> float:
    from ..data import ChatCollator

    feats = [f for f in _features(tokenizer, conversations, max_length) if any(x != -100 for x in f["labels"][1:])]
    collate = ChatCollator(tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(feats), batch_size):
            batch = {k: v.to(model.device) for k, v in collate(feats[start : start + batch_size]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
            labels = batch["labels"][:, 1:]  # (B, T-1): token t is predicted at position t-1
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
            )
            total += loss.item()
            count += int((labels != -100).sum())
    finally:
        model.train(was_training)
    return total / count


def _split(messages: list[dict]) -> tuple[list[dict], str]:
    """The conversation before its last assistant turn, and that turn's text (the reference answer)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or last == 0:
        raise DataError(f"exact_match needs a conversation ending in an assistant answer, got {messages!r}")
    return messages[:last], messages[last]["content"]


def _normalize(text: str) -> str:
    return " ".join(text.split())


def exact_match(
    model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64, batch_size: int = 16
) -> tuple[float, list[dict]]:
    """Share of conversations whose greedy answer equals the reference assistant answer after whitespace
    normalisation, and one record {"prompt", "reference", "response", "match"} per conversation."""
    if not conversations:
        raise DataError("exact_match needs at least one conversation")
    split = [_split(m) for m in conversations]
    responses = generate_responses(
        model, tokenizer, [p for p, _ in split], max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    records = [
        {
            "prompt": prompt[-1]["content"],
            "reference": reference,
            "response": response,
            "match": _normalize(response) == _normalize(reference),
        }
        for (prompt, reference), response in zip(split, responses)
    ]
    return sum(r["match"] for r in records) / len(records), records
