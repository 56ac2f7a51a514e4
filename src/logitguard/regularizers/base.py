"""The regularizer interface and its registry: what the trainer, the TRL integration, `train` and config validation
look up instead of branching on a regularizer's name.

An entry says (torchtune's loss protocols: capability fields, not names):
  loss           the pure tensor function (losses.py) users call directly; `losses.REGULARIZERS` lists these
  per_sequence   what the trainer calls: (policy, reference, weights, **kwargs) -> (B,) per-sequence values
  normalization  "sequences": their sum / the step's sequences with a weighted position (STR's Eq. 3);
                 "positions": their sum / the step's total position weight (a mean over positions)
  reads          the policy side the output head's forward must yield: "safety" (B, T, K) logits of the safety
                 ids; "label_logp" (B, T) log-prob of each position's label; "topk_kl" (B, T) the per-position
                 top-k KL to the reference, computed inside the head (the reference is read before the forward)
  reference      what the reference holds: "logits" (B, T, K), "pact" (B, T, 2K), "label_logp" (B, T),
                 "topk" (ids, logp (B, T, k), tail (B, T)); built and cached by `cached` / `online`
  positions      positions the term always reads ("response"), or None: the user's `positions`
  replaces_ce    the term is the objective itself (it replaces cross-entropy; lambda only switches it on)
  default_weight lambda when the user gives no reg_weight: the term's own, from the measurements that chose it
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import registered

NORMALIZATIONS = ("sequences", "positions")
READS = ("safety", "label_logp", "topk_kl")


def _no_kwargs(cfg, tokens) -> dict:
    return {}


def _no_check(cfg) -> None:
    return None


@dataclass(frozen=True)
class Regularizer:
    name: str
    loss: Callable
    per_sequence: Callable
    normalization: str
    reference: str
    cached: Callable  # (model, tokenizer, examples, ids, cfg, **build) -> a reference read by example_idx
    online: Callable  # (ids, tokenizer, method, cfg, paper: bool) -> a reference computed each step
    reads: str = "safety"
    positions: str | None = None
    min_tokens: int = 1  # safety tokens the term needs
    replaces_ce: bool = False
    default_weight: float = 1.0
    temperature: bool = False  # takes the shared `temperature` setting
    kwargs: Callable = _no_kwargs  # (cfg, tokens) -> the term's keyword arguments from a config
    check: Callable = _no_check  # (cfg) -> None or a ConfigError, when chosen: its settings against the rest
    check_values: Callable = _no_check  # (cfg) -> None or a ConfigError, always: its own keys' values
    settings: type | None = None  # its own settings dataclass (YAML keys / flags), composed into the configs
    help: str = ""
    sources: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.normalization not in NORMALIZATIONS or self.reads not in READS:
            raise ValueError(f"regularizer {self.name}: bad normalization or reads")


REGISTRY: dict[str, Regularizer] = {}


def register(entry: Regularizer) -> Regularizer:
    if entry.name in REGISTRY:
        raise ValueError(f"regularizer {entry.name!r} is registered twice")
    REGISTRY[entry.name] = entry
    return entry


def get(name: str) -> Regularizer:
    """The registered regularizer `name`, or a ConfigError naming the choices."""
    return registered(REGISTRY, name, "regularizer")
