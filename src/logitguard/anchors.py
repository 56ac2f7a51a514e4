"""Anchored regularization: constrain the safety logits where safety is decided, not on the task data.

STR and PACT hold the safety logits still on the fine-tuning data's own positions: exactly where a benign new task
must change the model. Here the regularizer applies instead to a small set of harmful "anchor" prompts followed by
the aligned model's own refusal, generated once (greedy, kept only where the keyword classifier sees a refusal)
and cached with their reference logits. Each micro-batch adds `per_step` anchor sequences; the term applies to
their response positions, averaged over the anchors of the optimizer step, times `weight`. The task data gets
cross-entropy only (or CE plus a lighter on-data term through reg_weight).

Terms (`regularizer`):
  str            sum_k (l_ref - l)^2 over the K safety tokens (the STR term, on anchors)
  restricted_kl  T^2 KL over the K safety tokens' restricted softmax (confidence matching)
  kl             KL(p_ref || p) over the full vocabulary at the first `kl_tokens` response positions: the
                 distribution that decides whether the model starts a refusal
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import ChatCollator, tokenize_conversation
from .files import write_text_atomic
from .losses import position_weights, restricted_kl, str_per_sequence
from .reference import adapter_disabled, eval_mode, frozen_safety_logits, head_tap

# the terms on the K safety logits (policy, reference, weights, temperature) -> (B,); "kl" reads the full vocabulary
SAFETY_TERMS = {
    "str": lambda policy, reference, weights, temperature: str_per_sequence(policy, reference, weights),
    "restricted_kl": restricted_kl,
}
ANCHOR_TERMS = (*SAFETY_TERMS, "kl")


def anchor_conversations(
    model, tokenizer, prompts: list[str], cache_dir: str | Path, max_new_tokens: int = 32, keywords: str = "qi2023"
) -> list[list[dict]]:
    """[user prompt, aligned model's greedy refusal] pairs, generated once per (model, prompts, settings) and kept
    in `cache_dir/anchors/` (responses to harmful prompts: refusals only, and they never leave the cache)."""
    from .cache import model_fingerprint
    from .models import process_state

    key = hashlib.sha256(
        json.dumps([model_fingerprint(model), prompts, max_new_tokens, keywords]).encode()
    ).hexdigest()[:20]
    path = Path(cache_dir) / "anchors" / f"{key}.jsonl"
    # under `accelerate launch` the main process generates and the others read its file (the same anchors on all)
    with process_state().main_process_first():
        if path.is_file():
            return [json.loads(line)["messages"] for line in path.read_text().splitlines()]
        return _generate_anchors(path, model, tokenizer, prompts, max_new_tokens, keywords)


def _generate_anchors(path, model, tokenizer, prompts, max_new_tokens, keywords) -> list[list[dict]]:
    from .eval.generate import generate_responses
    from .eval.keyword import is_refusal

    responses = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens, progress=False)
    kept = [
        [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
        for p, r in zip(prompts, responses)
        if r.strip() and is_refusal(r, keywords)
    ]
    if not kept:
        raise ValueError(
            f"the aligned model refused none of the {len(prompts)} anchor prompts ({keywords} keywords); "
            "anchored regularization needs prompts it refuses"
        )
    write_text_atomic(path, "".join(json.dumps({"messages": m}) + "\n" for m in kept))
    print(f"anchors: the aligned model refused {len(kept)} of {len(prompts)} anchor prompts; kept those", flush=True)
    return kept


def tokenize_anchors(tokenizer, conversations: list[list[dict]], max_length: int = 128) -> list[dict]:
    return [tokenize_conversation(tokenizer, m, max_length) for m in conversations]


class Anchors:
    """Anchor sequences with their frozen reference, and the anchored term for a training micro-batch."""

    def __init__(
        self,
        model,
        examples: list[dict],
        pad_token_id: int,
        safety_ids: list[int],
        regularizer: str = "str",
        per_step: int = 2,
        weight: float = 1.0,
        kl_tokens: int = 4,
        temperature: float = 2.0,
        seed: int = 0,
    ):
        """`model`: the aligned model, before any adapter is attached (its outputs are the reference);
        `examples`: tokenized anchor conversations (input_ids, attention_mask, labels on the refusal)."""
        if regularizer not in ANCHOR_TERMS:
            raise ValueError(f"anchor regularizer must be one of {ANCHOR_TERMS}, got {regularizer!r}")
        self.examples = list(examples)
        self.collate = ChatCollator(pad_token_id)
        self.ids = torch.as_tensor(list(safety_ids), dtype=torch.long)
        self.regularizer, self.per_step, self.weight = regularizer, min(per_step, len(self.examples)), weight
        self.full_vocab = regularizer not in SAFETY_TERMS  # kl: the reference is the full next-token distribution
        self.kl_tokens, self.seed = kl_tokens, seed
        self.temperature = temperature
        self.reference = [self._reference(model, ex) for ex in self.examples]  # per example, on the CPU

    @torch.no_grad()
    def _reference(self, model, example: dict) -> torch.Tensor:
        batch = {k: v.to(next(model.parameters()).device) for k, v in self.collate([example]).items()}
        if not self.full_vocab:
            return frozen_safety_logits(model, batch["input_ids"], batch["attention_mask"], self.ids)[0].cpu()
        with eval_mode(model), adapter_disabled(model):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0]
        return F.log_softmax(logits.float(), dim=-1)[self._first_response(batch)[0]].cpu()  # (n, V)

    def _first_response(self, batch: dict) -> torch.Tensor:
        """(B, T) mask of the first `kl_tokens` positions that predict a response token."""
        response = position_weights(batch["attention_mask"], batch["labels"], "response").bool()
        rank = torch.cumsum(response.long(), dim=1) * response
        return (rank >= 1) & (rank <= self.kl_tokens)

    def sample(self, step: int, micro: int, rank: int) -> list[int]:
        """Which anchors a micro-batch uses: deterministic in (seed, step, micro-batch, process)."""
        rng = random.Random(f"{self.seed}/{step}/{micro}/{rank}")
        return rng.sample(range(len(self.examples)), self.per_step)

    def term(self, model, chosen: list[int], device) -> torch.Tensor:
        """Mean over the chosen anchors of the per-sequence term (scalar, differentiable)."""
        batch = {k: v.to(device) for k, v in self.collate([self.examples[i] for i in chosen]).items()}
        if self.full_vocab:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            first = self._first_response(batch)  # (B, T)
            logp = F.log_softmax(logits.float()[first], dim=-1)  # (positions, V)
            ref = torch.cat([self.reference[i] for i in chosen]).to(device)  # the same positions, in order
            return F.kl_div(logp, ref, log_target=True, reduction="sum") / len(chosen)
        ids = self.ids.to(device)
        with head_tap(model, ids) as tap:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        reference = torch.zeros_like(tap["safety"], dtype=torch.float32)
        for b, i in enumerate(chosen):
            reference[b, : len(self.reference[i])] = self.reference[i].to(device)
        weights = position_weights(batch["attention_mask"], batch["labels"], "response")
        return SAFETY_TERMS[self.regularizer](tap["safety"], reference, weights, self.temperature).mean()
