"""Greedy decoding that stops paying for a sequence once it has ended.

`model.generate` keeps every row of a batch in every forward until the last one ends: a batch whose answers
end after 20, 40 and 192 tokens costs three rows for 192 steps. Here a row leaves the batch (its key/value cache
rows are dropped) at its end of sequence, or when a caller's stop rule says its text is complete (a HumanEval
answer whose code block has closed: the scored program is the same, the explanation after it is not generated).
Waiting prompts join the rows in flight as rows leave (continuous batching): a CPU decode step costs a fixed
read of every weight plus a little per row, so a batch that runs on for its last few rows pays the fixed part
for almost nothing, and a full batch shares it.

The prefix every prompt shares (the chat template's system turn) runs once, its cache copied into each prefill.
Otherwise the arithmetic is generate's greedy search: left-padded prompts, position ids from the attention
mask, the logits of the last position only, argmax (ties to the lowest id, as torch.argmax). Rows of one
forward can differ from generate's in the last bits where the batch's shape changes a matmul's blocking, so a
near-tie can resolve the other way; bench/eval_speed.py counts such differences.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable

import torch

from .finite import refuse_non_finite

# Whether waiting prompts may join the rows in flight (continuous batching). Off unless asked for (eval.continuous_
# batching, `logitguard eval`): off, prompts decode batch by batch as before it existed, so the committed rows keep
# their keys and generation that feeds training (safety mixing's own refusals, the safety monitor, token mining)
# gives the same text it always did.
_JOINING = contextvars.ContextVar("logitguard_joining", default=False)


@contextlib.contextmanager
def joining(allowed: bool):
    """Inside, greedy_decode lets waiting prompts join the rows in flight only if `allowed`."""
    token = _JOINING.set(allowed)
    try:
        yield
    finally:
        _JOINING.reset(token)


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


class _Live:
    """The rows in flight: their cache, attention mask (b, L), last position (b, 1), original rows, and the logits
    (b, V) each row's next token is chosen from."""

    def __init__(self, cache, mask, position, rows, logits):
        self.cache, self.mask, self.position, self.rows, self.logits = cache, mask, position, rows, logits

    def select(self, keep: list[int], trim: bool) -> None:
        """Keep these batch rows; with `trim`, drop the leading columns no kept row attends to (rows that left held
        them), so the cache is only as long as the longest live row."""
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.position = self.mask[index], self.position[index]
        self.rows = [self.rows[j] for j in keep]
        if not trim or not joinable(self.cache):  # (a sliding-window layer's keys are not aligned with the mask)
            return
        first = int(self.mask.any(0).int().argmax())  # the first column some row attends to
        if first:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
            self.mask = self.mask[:, first:]

    def join(self, other: _Live) -> None:
        """Add `other`'s rows: the shorter side is padded on the left (masked columns), so attention is unchanged;
        the keys hold their rotary positions already, and a row's position ids are its own."""
        width = max(self.mask.shape[1], other.mask.shape[1])

        def left(x, dim):  # pad dimension `dim` (from the end) on the left to `width`
            pad = [0, 0] * (dim - 1) + [width - x.shape[-dim], 0]
            return torch.nn.functional.pad(x, pad)

        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([left(mine.keys, 2), left(theirs.keys, 2)])
            mine.values = torch.cat([left(mine.values, 2), left(theirs.values, 2)])
        self.mask = torch.cat([left(self.mask, 1), left(other.mask, 1)])
        self.position = torch.cat([self.position, other.position])
        self.rows += other.rows
        self.logits = torch.cat([self.logits, other.logits])


def joinable(cache) -> bool:
    """Whether rows can join this cache mid-decode: every layer a plain growing key/value layer (a sliding-window,
    recurrent or shared layer keeps state that left-padding would break; those caches decode batch by batch)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers)


@torch.no_grad()
def _prefill(model, tails: list[list[int]], rows: list[int], pad: int, prefix, shared: int) -> _Live:
    """The prompts' tails (after the shared prefix) run in one forward: left-padded, positions counted from the
    attention mask as generate counts them, the logits of the last position only."""
    import copy

    from transformers import DynamicCache

    device, batch = model.device, len(tails)
    width = max(map(len, tails))
    ids = torch.tensor([[pad] * (width - len(t)) + t for t in tails], device=device)  # (B, W) left-padded
    mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in tails], device=device)  # (B, W)
    position = (shared + mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # (B, W)
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
    refuse_non_finite(logits, "generation", model)  # else argmax picks garbage
    return _Live(cache, mask, position[:, -1:], list(rows), logits)


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
    batch_size: int | None = None,
    on_end: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """New token ids per prompt (token ids), without the end-of-sequence token.

    At most `batch_size` rows (default: all) run at once, admitted in the order given. A row leaves at its end;
    with joining on, when a quarter of the batch has left, waiting prompts are prefilled and join the rows in
    flight (continuous batching), so the batch stays near full and no step runs for a batch's last few rows alone.
    (A decode step on a CPU costs a fixed weight read plus a little per row: the fixed part is most of it below ~40
    rows.)
    Joining happens inside `joining(True)` only; otherwise, and for a cache that rows cannot join (joinable), the next
    prompts start once every row has ended (batch by batch: a row's batch-mates, hence its last bits, as before).
    prefix, shared: the cache of the first `shared` tokens that every prompt starts with (prefix_cache), which
    then run once for all rows. `stop(ids)` is asked after a row's token in `check_after` (every token when
    None); True ends the row there, the token kept. on_end(i): called as prompt i's row ends."""
    out: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens <= 0 or not prompts:
        return out
    batch_size = batch_size or len(prompts)
    refill = max(1, batch_size // 4)  # free slots that call in waiting prompts: each call is one more forward
    allowed = _JOINING.get()
    waiting, live = 0, None
    while True:
        free = batch_size - (len(live.rows) if live else 0)
        if waiting < len(prompts) and (live is None or (allowed and free >= refill and joinable(live.cache))):
            rows = list(range(waiting, min(len(prompts), waiting + free)))
            waiting = rows[-1] + 1
            new = _prefill(model, [prompts[i][shared:] for i in rows], rows, pad, prefix, shared)
            if live is None:
                live = new
            else:
                live.join(new)
        if live is None:
            return out
        token = live.logits.argmax(-1)  # (b,)
        keep = []
        for j, (row, t) in enumerate(zip(live.rows, token.tolist())):
            if t not in eos:
                out[row].append(t)
                ended = len(out[row]) >= max_new_tokens or (
                    stop is not None and (check_after is None or t in check_after) and stop(out[row])
                )
                if not ended:
                    keep.append(j)
                    continue
            if on_end is not None:
                on_end(row)
        if not keep:
            live = None
            continue
        if len(keep) < len(live.rows):
            live.select(keep, trim=allowed)  # batch by batch: the cache as it always was
            token = token[keep]
        live.mask = torch.cat([live.mask, live.mask.new_ones(len(live.rows), 1)], dim=1)  # (b, past + 1)
        live.position = live.position + 1
        live.logits = model(
            input_ids=token[:, None], attention_mask=live.mask, position_ids=live.position,
            past_key_values=live.cache, use_cache=True,
        ).logits[:, -1]  # (b, V)  # fmt: skip
