"""Log-likelihood scoring of many (context, continuations) groups: each token runs once where it can.

A multiple-choice item is a group: one context, several continuations. Three levels share work:
- the prefix common to every context (TruthfulQA's six-shot primer: most of each item's tokens) runs once;
- the rest of each context runs once per item, `group_batch` items in one forward (left-padded, so every
  item's context ends at the same cache position);
- each continuation runs over its own item's cache, `row_chunk` rows per forward, and only these positions go
  through the output head.
Position ids are passed explicitly, so a row's positions are those of its unpadded text, and the sums equal
scoring context + continuation whole (tests/test_multiple_choice.py checks both paths to 1e-4).
"""

from __future__ import annotations

import copy

import torch

from .finite import refuse_non_finite


def _common_prefix(contexts: list[list[int]]) -> int:
    """Length of the prefix every context shares, leaving each context's last token out of it."""
    n = min(len(c) for c in contexts) - 1
    first = contexts[0]
    for other in contexts[1:]:
        i = 0
        while i < n and other[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def _repeat(cache, times: int):
    """A copy of `cache` (batch 1) repeated `times` along its batch."""
    cache = copy.deepcopy(cache)
    cache.batch_repeat_interleave(times)
    return cache


@torch.inference_mode()
def score_groups(
    model,
    groups: list[tuple[list[int], list[list[int]]]],
    pad: int | None = None,
    group_batch: int = 8,
    row_chunk: int = 16,
    progress=None,
) -> list[list[float]]:
    """Summed log-probability of each continuation's tokens after its group's context, per group, in order.

    groups: (context ids, [continuation ids, ...]); every context and continuation non-empty.
    progress: an optional callable given the number of groups done after each batch."""
    from transformers import DynamicCache

    if any(not ctx or not conts or any(not c for c in conts) for ctx, conts in groups):
        raise ValueError("score_groups needs non-empty contexts and continuations")
    if not groups:
        return []
    device, pad = model.device, pad if pad is not None else 0
    shared = _common_prefix([ctx for ctx, _ in groups])
    prefix = None
    if shared:
        prefix = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([groups[0][0][:shared]], device=device), past_key_values=prefix,
              use_cache=True, logits_to_keep=1)  # fmt: skip
    scores: list[list[float]] = []
    for start in range(0, len(groups), group_batch):
        batch = groups[start : start + group_batch]
        tails = [ctx[shared:-1] for ctx, _ in batch]  # the context after the shared prefix, but its last token
        width = max(map(len, tails))
        tail_mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in tails], device=device)  # (G, W1)
        cache = _repeat(prefix, len(batch)) if prefix is not None else DynamicCache(config=model.config)
        if width:
            ids = torch.tensor([[pad] * (width - len(t)) + t for t in tails], device=device)  # (G, W1) left-padded
            position = (shared + tail_mask.cumsum(-1) - 1).masked_fill(tail_mask == 0, 1)
            mask = torch.cat([tail_mask.new_ones(len(batch), shared), tail_mask], dim=1)
            model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True,
                  logits_to_keep=1)  # fmt: skip
        # continuation rows: the context's last token predicts the first continuation token
        rows = [(g, [ctx[-1]] + c[:-1], c) for g, (ctx, conts) in enumerate(batch) for c in conts]
        sums: list[float] = []
        for lo in range(0, len(rows), row_chunk):
            chunk = rows[lo : lo + row_chunk]
            group = torch.tensor([g for g, _, _ in chunk], device=device)
            own = copy.deepcopy(cache)
            own.batch_select_indices(group)
            w2 = max(len(r) for _, r, _ in chunk)
            ids = torch.tensor([r + [pad] * (w2 - len(r)) for _, r, _ in chunk], device=device)  # (R, W2)
            row_mask = torch.tensor([[1] * len(r) + [0] * (w2 - len(r)) for _, r, _ in chunk], device=device)
            mask = torch.cat([row_mask.new_ones(len(chunk), shared), tail_mask[group], row_mask], dim=1)
            lengths = torch.tensor([len(tails[g]) for g, _, _ in chunk], device=device)
            position = shared + lengths[:, None] + torch.arange(w2, device=device)  # (R, W2)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=own,
                           use_cache=True).logits.float()  # (R, W2, V)  # fmt: skip
            targets = torch.tensor([c + [0] * (w2 - len(c)) for _, _, c in chunk], device=device)  # (R, W2)
            picked = logits.gather(-1, targets[..., None])[..., 0] - logits.logsumexp(-1)  # (R, W2)
            sums += picked.masked_fill(row_mask == 0, 0).sum(-1).tolist()  # padding's scores, -inf or not, are out
        refuse_non_finite(sums, "multiple-choice scoring", model)
        at = 0
        for _, conts in batch:
            scores.append(sums[at : at + len(conts)])
            at += len(conts)
        if progress is not None:
            progress(len(batch))
    return scores
