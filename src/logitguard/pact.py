"""PACT's two references of the frozen aligned model: cached once per dataset, or two forwards per step.

PACT ("Few Tokens, Big Leverage", Wang et al. 2026; its authors' code is Glresearch1/PACT) mixes two reference
distributions over the safety tokens (the loss itself is `losses.pact_per_sequence`):
  ref_full  the K safety logits of the aligned model on the whole training sequence (the ordinary reference)
  ref_post  its K logits on the response alone: the assistant header followed by the response without its last
            token, no system or user turn (the authors' "post-only" input)
Position H - 1 + j of the post-only sequence (H header tokens) predicts response token j, as position
start - 1 + j of the full sequence does (start: the first assistant token). A PACT reference returns
[ref_full | ref_post] (B, T, 2K), ref_post placed at those full-sequence positions and zero elsewhere.

The response span runs from the first to the last assistant token (labels != -100), as in the authors' code; in
a multi-turn conversation it includes the user turns in between (the loss still looks only at the positions
that predict assistant tokens).

Both references depend only on the aligned model and the data, so both are cached and PACT costs no reference
forward per step: the post-only sequences are a dataset of their own, cached by `build_reference_cache` (same
fingerprint, shards, checksums and locking) in the subfolder `pact-post` of the full cache's folder.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from .cache import CachedReference, ReadsByIndex, build_reference_cache
from .errors import ConfigError
from .reference import OnlineReference, ReferenceError, frozen_safety_logits

POST_FOLDER = "pact-post"


def assistant_header_ids(tokenizer) -> list[int]:
    """The assistant header: the text the chat template's generation prompt adds after a user turn, tokenized on
    its own (the authors' rule); "Assistant:" when the template adds nothing."""
    turn = [{"role": "user", "content": "hello"}]
    plain = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=False)
    prompted = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    header = prompted[len(plain) :] if prompted.startswith(plain) else ""
    ids = list(tokenizer.encode(header if header.strip() else "Assistant:", add_special_tokens=False))
    if not ids:
        raise ReferenceError("the assistant header tokenizes to nothing; PACT's response-only reference needs one")
    return ids


def response_span(labels) -> tuple[int, int]:
    """(start, count): the index of the first assistant token and the number of tokens up to the last one."""
    labels = torch.as_tensor(labels)
    where = (labels != -100).nonzero().flatten()
    if where.numel() == 0:
        return -1, 0
    start = int(where[0])
    return start, int(where[-1]) + 1 - start


def post_only_ids(input_ids, labels, header_ids: list[int]) -> list[int]:
    """The response-only sequence of one example: header + response[:-1]."""
    start, count = response_span(labels)
    response = [int(i) for i in input_ids[start : start + count - 1]] if count >= 2 else []
    return list(header_ids) + response


def post_only_examples(examples: list[dict], header_ids: list[int]) -> list[dict]:
    """The response-only sequences of tokenized examples, as examples the reference cache takes (same order)."""
    out = []
    for i, ex in enumerate(examples):
        ids = post_only_ids(ex["input_ids"], ex["labels"], header_ids)
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(ids), "example_idx": i})
    return out


def place_post(rows: torch.Tensor, start: int, count: int, header_len: int, out: torch.Tensor) -> None:
    """Copy the post-only logits `rows` (L_post, K) that predict response tokens 0..count-1 into `out` (T, K) at
    the full-sequence positions that predict the same tokens (start - 1 + j)."""
    if count <= 0:
        return
    skip = max(0, 1 - start)  # a response at position 0 has no position predicting its first token
    n = min(count, out.shape[0] - start + 1) - skip
    if n > 0:
        first = start - 1 + skip
        out[first : first + n] = rows[header_len - 1 + skip : header_len - 1 + skip + n].to(out.dtype)


class PactOnlineReference(OnlineReference):
    """PACT's references from two no-grad forwards of the adapter-disabled model per step, as the authors' code
    does: the whole batch, and its response-only sequences. `full_logits=True` computes full-vocabulary logits and
    gathers K columns (and the trained side's K logits from the full logits too), the authors' formulation."""

    def __init__(self, token_ids: list[int], header_ids: list[int], method: str = "lora", full_logits: bool = False):
        super().__init__(token_ids, method)
        self.header = [int(i) for i in header_ids]
        self.full_logits = full_logits
        self.policy_from_full_logits = full_logits

    def __call__(self, model: nn.Module, batch: dict) -> torch.Tensor:
        input_ids, labels = batch["input_ids"], batch["labels"]
        ids = self.ids.to(input_ids.device)
        ref_full = frozen_safety_logits(model, input_ids, batch["attention_mask"], ids, full=self.full_logits)
        rows = [post_only_ids(r, lab, self.header) for r, lab in zip(input_ids.tolist(), labels.cpu())]
        post_ids = torch.zeros((len(rows), max(map(len, rows))), dtype=input_ids.dtype)  # right-padded
        post_mask = torch.zeros_like(post_ids)
        for b, row in enumerate(rows):
            post_ids[b, : len(row)] = torch.as_tensor(row)
            post_mask[b, : len(row)] = 1
        dev = input_ids.device
        post = frozen_safety_logits(model, post_ids.to(dev), post_mask.to(dev), ids, full=self.full_logits)
        ref_post = torch.zeros_like(ref_full)  # (B, T, K)
        for b, lab in enumerate(labels.cpu()):
            place_post(post[b], *response_span(lab), len(self.header), ref_post[b])
        return torch.cat([ref_full, ref_post], dim=-1)  # (B, T, 2K)


class PactCachedReference(ReadsByIndex):
    """PACT's references read from two caches by `example_idx`: `full` over the examples, `post` over their
    response-only sequences (`post_only_examples`, same order). Zero reference forwards per step, and one
    transfer of the step's indices to the host (`prepare`), as for the plain cache."""

    policy_from_full_logits = False

    def __init__(self, full: CachedReference, post: CachedReference, examples: list[dict], header_ids: list[int]):
        if full.token_ids != post.token_ids:
            raise ReferenceError(f"PACT's caches serve different token ids ({full.token_ids} vs {post.token_ids})")
        self.full, self.post = full, post
        self.header_len = len(header_ids)
        self.spans = [response_span(ex["labels"]) for ex in examples]

    def read(self, idx: list[int], lengths: list[int], width: int, device: torch.device) -> torch.Tensor:
        """(B, width, 2K): the full sequences' reference beside the response-only one, placed at the response."""
        ref_full = self.full.read(idx, lengths, width, device)  # checks the lengths
        ref_post = torch.zeros(ref_full.shape, dtype=torch.float32, pin_memory=device.type == "cuda")
        for b, i in enumerate(idx):
            place_post(self.post.rows(i), *self.spans[i], self.header_len, ref_post[b])
        return torch.cat([ref_full, ref_post.to(device, non_blocking=True)], dim=-1)


def build_pact_cache(
    model: nn.Module,
    tokenizer,
    examples: list[dict],
    token_ids: list[int],
    header_ids: list[int],
    cache_root: str | Path | None,
    max_length: int,
    dtype: str = "float32",
    batch_size: int = 8,
    folder: str | Path | None = None,
    progress: bool = True,
    aligned_adapter_disabled: bool = False,
) -> PactCachedReference:
    """Build (or reuse) both of PACT's caches and return the reference that reads them. The full cache is the
    ordinary one (shared with STR runs on the same data); the post-only cache lives in its `pact-post` subfolder,
    keyed by its own fingerprint (the post-only token ids derive from the data and the chat template)."""
    full = build_reference_cache(
        model, tokenizer, examples, token_ids, cache_root, max_length, dtype, batch_size, folder=folder,
        progress=progress, aligned_adapter_disabled=aligned_adapter_disabled,
    )  # fmt: skip
    posts = post_only_examples(examples, header_ids)
    post = build_reference_cache(
        model, tokenizer, posts, token_ids, None, max_length, dtype, batch_size, folder=Path(full) / POST_FOLDER,
        progress=progress, aligned_adapter_disabled=aligned_adapter_disabled,
    )  # fmt: skip
    return PactCachedReference(
        CachedReference(full, token_ids), CachedReference(post, token_ids, examples=posts), examples, header_ids
    )


def make_pact_reference(cfg, model, tokenizer, examples, tokens, progress: bool = True):
    """The PACT reference of a `logitguard train` run: cached (default), two forwards per step (online), or two
    full-vocabulary forwards per step (paper: the authors' formulation)."""
    import time

    if len(tokens) < 2:  # refused before any cache is built (the trainer would refuse it after)
        raise ConfigError("the pact regularizer compares distributions over the safety tokens: it needs >= 2")
    header = assistant_header_ids(tokenizer)
    if cfg.reference in ("online", "paper"):
        return PactOnlineReference(tokens.ids, header, cfg.method, full_logits=cfg.reference == "paper")
    if cfg.reference_model:  # continual learning: both references from the original aligned model
        from .models import load_model, run_dtype

        dtype = run_dtype(cfg)
        device = next(model.parameters()).device
        model = load_model(cfg.reference_model, dtype, cfg.trust_remote_code, cfg.quantize, device)
    start = time.perf_counter()
    reference = build_pact_cache(
        model, tokenizer, examples, list(tokens.ids), header, Path(cfg.cache_dir) / "reference", cfg.max_length,
        cfg.reference_dtype, cfg.batch_size, folder=cfg.reference_cache, progress=progress,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if progress and seconds > 1.0:
        print(f"PACT reference caches (full context and response only): {seconds:.1f} s")
    return reference


def pact_settings(cfg, tokens) -> dict:
    """The pact regularizer's keyword arguments from a config and a token set (its weights v)."""
    if tokens.weights is None:
        warnings.warn(
            "regularizer pact: the token set has no weights (`logitguard tokens mine --rule pact` writes them); "
            "every safety token gets weight 1",
            stacklevel=2,
        )
    return dict(
        token_weights=None if tokens.weights is None else list(tokens.weights),
        temperature=cfg.temperature,
        top_p=cfg.pact_top_p,
        alpha=cfg.pact_alpha,
        bias=cfg.pact_bias,
        prefix=cfg.pact_prefix,
        tau=cfg.pact_tau,
    )
