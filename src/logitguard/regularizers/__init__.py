"""Loss terms on the training data, each one module registered by name (see base.py for the interface).

Adding a term: a module here that calls `register(Regularizer(...))` (with its settings dataclass, if it has any),
its import below (and its settings class in `RegularizerSettings`), and its test.
"""

from dataclasses import dataclass

from . import constrained_sft, kl, pact, restricted_kl, str_term  # noqa: F401  (each registers itself)
from .base import REGISTRY, Regularizer, get, register
from .constrained_sft import ConstrainedSFTSettings
from .kl import TopKKLSettings
from .pact import PactSettings


@dataclass
class RegularizerSettings(PactSettings, ConstrainedSFTSettings, TopKKLSettings):
    """Every registered term's own settings, composed once into TrainConfig and the TRL config."""


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


__all__ = ["REGISTRY", "Regularizer", "RegularizerSettings", "get", "names", "register"]
