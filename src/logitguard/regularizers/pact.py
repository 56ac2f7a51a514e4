"""PACT ("Few Tokens, Big Leverage", Wang et al. 2026): tempered KL to a gated mix of two references over ~50
weighted safety tokens, at response positions. Its references: logitguard.pact."""

from ..losses import pact_per_sequence
from . import references
from .base import Regularizer, register


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
        help="PACT: tempered KL to a gated mix of two references over weighted safety tokens",
        sources=("Glresearch1/PACT",),
    )
)
