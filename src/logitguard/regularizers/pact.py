"""PACT ("Few Tokens, Big Leverage", Wang et al. 2026): tempered KL to a gated mix of two references over ~50
weighted safety tokens, at response positions. Its references: logitguard.pact."""

from dataclasses import dataclass, field

from ..errors import ConfigError
from ..losses import pact_per_sequence
from . import references
from .base import Regularizer, register


@dataclass
class PactSettings:
    pact_top_p: float = field(default=0.9, metadata={"help": "pact gate: the top-p mass that measures spread"})
    pact_alpha: float = field(default=2.0, metadata={"help": "pact gate: slope of its sigmoid"})
    pact_bias: float = field(default=0.0, metadata={"help": "pact gate: offset of its sigmoid"})
    pact_prefix: int = field(default=8, metadata={"help": "pact gate: response positions before it decays"})
    pact_tau: float = field(default=8.0, metadata={"help": "pact gate: decay length after the prefix (0: cut off)"})


def _check_values(cfg) -> None:
    if not 0 < cfg.pact_top_p <= 1:
        raise ConfigError(f"pact_top_p: must be in (0, 1], got {cfg.pact_top_p}")
    if cfg.pact_prefix < 0 or cfg.pact_tau < 0:
        raise ConfigError("pact_prefix and pact_tau must be >= 0")


def _kwargs(cfg, tokens) -> dict:
    from ..pact import pact_settings

    return pact_settings(cfg, tokens)


register(
    Regularizer(
        name="pact",
        loss=pact_per_sequence,
        per_sequence=pact_per_sequence,
        normalization="positions",
        reference="pact",
        cached=references.pact_cached,
        online=references.pact_online,
        positions="response",  # its gate counts from the first answer position
        min_tokens=2,
        temperature=True,
        kwargs=_kwargs,
        check_values=_check_values,
        settings=PactSettings,
        help="PACT: tempered KL to a gated mix of two references over weighted safety tokens",
        sources=("Glresearch1/PACT",),
    )
)
