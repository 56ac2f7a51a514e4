"""How each kind of reference is built: cached once per dataset (the default), or computed online each step.

Every `cached` builder takes the aligned model as it is before training and returns a reference read by
`example_idx` (wrap it in keyed.KeyedReference for batches without one); every `online` builder returns one that
runs a no-grad forward of the adapter-disabled model per step.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError


def _paper_only_for_logits(name: str) -> None:
    raise ConfigError(f"reference 'paper' is STR's formulation (full logits for K columns); {name} takes cache or "
                      "online")  # fmt: skip


def logits_cached(model, tokenizer, examples, ids, cfg, builder=None, **build):
    """K safety logits per token (STR, restricted_kl). `builder`: build_reference_cache or a stand-in (tests)."""
    from ..cache import CachedReference, build_reference_cache

    folder = (builder or build_reference_cache)(model, tokenizer, examples, list(ids), **build)
    return CachedReference(folder, list(ids))


def logits_online(ids, tokenizer, method, cfg, paper: bool = False):
    from ..reference import OnlineReference, PaperReference

    return (PaperReference if paper else OnlineReference)(list(ids), method)


def pact_cached(model, tokenizer, examples, ids, cfg, builder=None, **build):
    """PACT's two caches (full context and response only)."""
    from ..pact import assistant_header_ids, build_pact_cache

    root = build.pop("cache_root")
    return build_pact_cache(model, tokenizer, examples, list(ids), assistant_header_ids(tokenizer), root, **build)


def pact_online(ids, tokenizer, method, cfg, paper: bool = False):
    from ..pact import PactOnlineReference, assistant_header_ids

    return PactOnlineReference(list(ids), assistant_header_ids(tokenizer), method, full_logits=paper)


def label_logp_cached(model, tokenizer, examples, ids, cfg, builder=None, **build):
    """The aligned model's log-prob of each position's next token, from the same pass as the K logits."""
    from ..cache import CachedReference, build_reference_cache

    folder = (builder or build_reference_cache)(model, tokenizer, examples, list(ids), label_logp=True, **build)
    return CachedReference(folder, list(ids), kind="label_logp")


def label_logp_online(ids, tokenizer, method, cfg, paper: bool = False):
    from ..reference import OnlineStatsReference

    if paper:
        _paper_only_for_logits("constrained_sft")
    return OnlineStatsReference(list(ids), method, kind="label_logp")


def topk_cached(model, tokenizer, examples, ids, cfg, builder=None, **build):
    """The aligned model's top-k log-probs and tail mass per position, from the same pass as the K logits."""
    from ..cache import CachedReference, build_reference_cache

    folder = (builder or build_reference_cache)(model, tokenizer, examples, list(ids), topk=cfg.kl_topk, **build)
    return CachedReference(folder, list(ids), kind="topk", topk=cfg.kl_topk)


def topk_online(ids, tokenizer, method, cfg, paper: bool = False):
    from ..reference import OnlineStatsReference

    if paper:
        _paper_only_for_logits("kl")
    return OnlineStatsReference(list(ids), method, kind="topk", topk=cfg.kl_topk)


def build_kwargs(cfg, progress: bool = True) -> dict:
    """build_reference_cache's settings from a TrainConfig."""
    return dict(
        cache_root=Path(cfg.cache_dir) / "reference",
        max_length=cfg.max_length,
        dtype=cfg.reference_dtype,
        batch_size=cfg.batch_size,
        folder=cfg.reference_cache,
        progress=progress,
    )
