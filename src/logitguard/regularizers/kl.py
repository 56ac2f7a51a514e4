"""KL(aligned model || trained model) at response positions over the aligned model's cached top-k tokens plus one
tail bucket (losses.topk_kl_per_sequence): the "SFT + KL to the reference" users ask trainers for, without a
B x T x V reference. The trained side is computed inside the output head's forward (head_terms.py)."""

from dataclasses import dataclass, field

from ..errors import ConfigError
from ..losses import topk_kl_per_sequence
from . import references
from .base import Regularizer, register


@dataclass
class TopKKLSettings:
    kl_topk: int = field(default=32, metadata={"help": "kl: the aligned model's top-k tokens cached per position"})


def _per_sequence(policy_kl, reference, weights):
    """policy_kl (B, T): the per-position top-k KL the head computed; its weighted sum per sequence."""
    w = weights.to(policy_kl.dtype)
    return (policy_kl * w).sum(dim=1)


def _check_values(cfg) -> None:
    if cfg.kl_topk < 1:
        raise ConfigError(f"kl_topk: must be >= 1, got {cfg.kl_topk}")


def _check(cfg) -> None:
    if cfg.reference == "paper":
        raise ConfigError(
            "reference: paper is STR's formulation (full logits for K columns); kl takes cache or online"
        )


register(
    Regularizer(
        name="kl",
        loss=topk_kl_per_sequence,
        per_sequence=_per_sequence,
        normalization="positions",
        reference="topk",
        cached=references.topk_cached,
        online=references.topk_online,
        reads="topk_kl",
        positions="response",
        check=_check,
        check_values=_check_values,
        settings=TopKKLSettings,
        help="KL(aligned || trained) over the aligned model's cached top-k plus a tail bucket",
    )
)
