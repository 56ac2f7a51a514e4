"""Token-wise constrained SFT (Qi et al., "Safety Alignment Should Be Made More Than Just a Few Tokens Deep",
ICLR 2025; its authors' code: Unispac/shallow-vs-deep-alignment). It replaces cross-entropy on the response tokens:
mean over the step's response tokens of -w_t log pi(y_t), w_t = max(1e-3, 2 sigmoid(-beta_t (log pi(y_t) -
log pi_ref(y_t)))) held constant (losses.constrained_sft_per_sequence). Its reference is one number per token, the
aligned model's log-prob of the label, cached in the same pass as the K logits."""

from dataclasses import dataclass, field

from ..errors import ConfigError
from ..losses import constrained_sft_per_sequence
from . import references
from .base import Regularizer, register


@dataclass
class ConstrainedSFTSettings:
    csft_beta: float = field(default=0.1, metadata={"help": "constrained_sft: beta of later response tokens"})
    csft_first_token_bias_factor: float = field(
        default=5.0, metadata={"help": "constrained_sft: beta x this on the first response token"}
    )
    csft_bias_factor: float = field(
        default=20.0, metadata={"help": "constrained_sft: beta x this on response tokens 2 .. bias_length"}
    )
    csft_bias_length: int = field(
        default=5, metadata={"help": "constrained_sft: response tokens with a raised beta (0: none)"}
    )


def _per_sequence(policy_logp, reference_logp, weights, **kwargs):
    """policy_logp (B, T) from the head's per-token NLL; weights (B, T): the response positions."""
    return constrained_sft_per_sequence(policy_logp, reference_logp, weights, **kwargs)


def _kwargs(cfg, tokens) -> dict:
    return dict(
        beta=cfg.csft_beta,
        first_token_bias_factor=cfg.csft_first_token_bias_factor,
        bias_factor=cfg.csft_bias_factor,
        bias_length=cfg.csft_bias_length,
    )


def _check_values(cfg) -> None:
    if not cfg.csft_beta > 0 or cfg.csft_bias_length < 0:
        raise ConfigError(f"csft_beta must be > 0 and csft_bias_length >= 0 (got {cfg.csft_beta}, "
                          f"{cfg.csft_bias_length})")  # fmt: skip


def _check(cfg) -> None:
    if cfg.reference == "paper":
        raise ConfigError(
            "reference: paper is STR's formulation (full logits for K columns); constrained_sft takes cache or online"
        )
    if cfg.first_response_tokens:
        raise ConfigError("first_response_tokens: constrained_sft weights its first tokens itself (csft_bias_*)")


register(
    Regularizer(
        name="constrained_sft",
        loss=constrained_sft_per_sequence,
        per_sequence=_per_sequence,
        normalization="positions",
        reference="label_logp",
        cached=references.label_logp_cached,
        online=references.label_logp_online,
        reads="label_logp",
        positions="response",
        replaces_ce=True,
        kwargs=_kwargs,
        check=_check,
        check_values=_check_values,
        settings=ConstrainedSFTSettings,
        help="token-wise constrained SFT (replaces cross-entropy)",
        sources=("Unispac/shallow-vs-deep-alignment",),
    )
)
