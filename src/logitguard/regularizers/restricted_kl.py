"""Confidence matching over the K safety tokens: T^2 KL of the restricted softmaxes (one reference, no gate)."""

from ..losses import restricted_kl
from . import references
from .base import Regularizer, register

register(
    Regularizer(
        name="restricted_kl",
        loss=restricted_kl,
        per_sequence=restricted_kl,
        normalization="sequences",
        reference="logits",
        cached=references.logits_cached,
        online=references.logits_online,
        min_tokens=2,
        temperature=True,
        help="T^2 KL between the restricted softmaxes over the K safety tokens",
    )
)
