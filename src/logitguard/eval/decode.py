"""Greedy decoding that stops paying for a sequence once it has ended.

`model.generate` keeps every row of a batch in every forward until the last one ends: a batch whose answers
end after 20, 40 and 192 tokens costs three rows for 192 steps. Here a row leaves the batch (its key/value cache
rows are dropped) at its end of sequence, or when a caller's stop rule says its text is complete (a HumanEval
answer whose code block has closed: the scored program is the same, the explanation after it is not generated).
On a CPU a decode step costs about its rows' FLOPs, so the saving is the share of rows already ended.

The prefix every prompt shares (the chat template's system turn) runs once, its cache copied into each batch.
Otherwise the arithmetic is generate's greedy search: left-padded prompts, position ids from the attention
mask, the logits of the last position only, argmax (ties to the lowest id, as torch.argmax). Rows of one
forward can differ from generate's in the last bits where the batch's shape changes a matmul's blocking, so a
near-tie can resolve the other way; bench/eval_speed.py counts such differences.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# generation-config settings that change greedy search's choice; a model that sets one goes through generate
_PROCESSORS = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_repetition_penalty": 1.0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "min_length": 0,
    "min_new_tokens": None,
    "sequence_bias": None,
    "renormalize_logits": False,
}


def plain_greedy(generation_config) -> bool:
    """Whether greedy search under this generation config is argmax of the raw logits (no processor applies)."""
    for name, neutral in _PROCESSORS.items():
        value = getattr(generation_config, name, neutral)
        if value not in (neutral, None) and not (name == "min_length" and value == 0):
            return False
    return True


def eos_ids(model, tokenizer) -> set[int]:
    """Every id that ends a sequence: the generation config's (an int or a list), else the tokenizer's."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}


def marker_ids(tokenizer, marker: str) -> set[int]:
    """Ids of the tokens whose text contains `marker`: a stop rule needs checking only after one of them."""
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return {i for i, tok in enumerate(vocab) if tok is not None and marker in tok}


def shared_prefix(prompts: list[list[int]]) -> int:
    """Length of the prefix every prompt shares (the chat template's system turn, a common instruction), each
    prompt's last token left out of it so every prompt has one to prefill."""
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for other in prompts[1:]:
        i = 0
        while i < n and other[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


@torch.no_grad()
def prefix_cache(model, ids: list[int]):
    """The key/value cache of `ids` (batch 1), or None for no ids."""
    from transformers import DynamicCache

    if not ids:
        return None
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([ids], device=model.device), past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache


@torch.no_grad()
def greedy_decode(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos: set[int],
    pad: int,
    stop: Callable[[list[int]], bool] | None = None,
    check_after: set[int] | None = None,
    prefix=None,
    shared: int = 0,
) -> list[list[int]]:
    """New token ids per prompt (token ids), without the end-of-sequence token.

    prefix, shared: the cache of the first `shared` tokens that every prompt starts with (prefix_cache), which
    then run once for all batches. `stop(ids)` is asked after a row's token in `check_after` (every token when
    None); True ends the row there, the token kept."""
    import copy

    from transformers import DynamicCache

    batch = len(prompts)
    out: list[list[int]] = [[] for _ in range(batch)]
    if max_new_tokens <= 0 or batch == 0:
        return out
    device = model.device
    tails = [p[shared:] for p in prompts]
    width = max(map(len, tails))
    ids = torch.tensor([[pad] * (width - len(t)) + t for t in tails], device=device)  # (B, W) left-padded
    mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in tails], device=device)  # (B, W)
    position = (shared + mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # (B, W): as generate counts them
    if prefix is not None:
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(batch)
        mask = torch.cat([mask.new_ones(batch, shared), mask], dim=1)  # (B, shared + W)
    else:
        cache = DynamicCache(config=model.config)
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]  # (B, V)  # fmt: skip
    rows = list(range(batch))  # the original row of each live batch row
    position = position[:, -1:]  # (B, 1)
    for step in range(max_new_tokens):
        token = logits.argmax(-1)  # (b,)
        keep = []
        for j, (row, t) in enumerate(zip(rows, token.tolist())):
            if t in eos:
                continue
            out[row].append(t)
            if stop is not None and (check_after is None or t in check_after) and stop(out[row]):
                continue
            keep.append(j)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(rows):  # drop ended rows from the cache and the batch
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, token, position = mask[index], token[index], position[index]
            rows = [rows[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)  # (b, past + 1)
        position = position + 1
        logits = model(
            input_ids=token[:, None], attention_mask=mask, position_ids=position, past_key_values=cache,
            use_cache=True,
        ).logits[:, -1]  # (b, V)  # fmt: skip
    return out
