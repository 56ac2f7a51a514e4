"""What a model's forward does to its output head's logits before the loss, read from its config.

Some causal LMs do not feed `lm_head(hidden)` to the softmax: Gemma-2 soft-caps it (cap * tanh(z / cap)), Cohere
multiplies it by `logit_scale`, Granite divides it by `logits_scaling`. Every loss path that starts from the head
(the chunked cross-entropy, the K safety logits from K head rows, the full-logits fallback) applies the same map, so
the logged CE is the model's own `outputs.loss` and the safety logits are the model's own logits.

All known transforms have one form: scales, then an optional soft-cap (Muse Spark: cap * tanh(z * mult / cap)).
A new family is one entry in LOGIT_TRANSFORMS, or in FAMILY_EXCEPTIONS where it reads a known attribute otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import LogitguardError

# Config attribute -> what transformers' causal LMs do with it to the head's output:
#   multiply / divide  logits * value / logits / value
#   softcap            value * tanh(logits / value), after every scale
#   divide_input       hidden / value before the head: the head's own input already carries it (head_tap reads
#                      that input), a tap on the backbone's output does not
# Read from the model's config, then from its text config (multimodal models keep them under text_config).
LOGIT_TRANSFORMS = {
    "logit_scale": "multiply",  # Cohere, Cohere2, Cohere2-MoE
    "logits_scaling": "divide",  # Granite, GraniteMoE (shared, hybrid), Granite-Docling, Granite-4 Vision
    "lm_head_multiplier": "multiply",  # Falcon-H1
    "output_multiplier": "multiply",  # Muse Spark, Muse Glimmer (before their soft-cap)
    "final_logit_softcapping": "softcap",  # Gemma-2/3/3n/4, PaliGemma, VaultGemma, Mistral-Large-4, nanochat
    "logits_soft_cap": "softcap",  # RecurrentGemma
    "output_logit_soft_cap": "softcap",  # xLSTM
}

# (model_type, attribute) -> what that family does instead (None: the value is in the config but never applied).
# Matched on the top-level config's model_type first, then on its text config's.
FAMILY_EXCEPTIONS = {
    ("hyperclovax", "logits_scaling"): "multiply",  # HyperCLOVA X multiplies where Granite divides
    ("minicpm3", "logits_scaling"): "divide_input",  # MiniCPM3 divides the hidden state before the head
    ("mpt", "logit_scale"): None,  # MPT's config has one; transformers' MPT never applies it
    ("gemma3", "final_logit_softcapping"): None,  # Gemma-3's multimodal model does not soft-cap (its text model does)
}


@dataclass(frozen=True)
class LogitTransform:
    """y = softcap * tanh(scale * z / softcap) when `softcap` is set, else y = scale * z (z: the head's output)."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """The transformed logits, a new tensor (differentiable)."""
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def apply_(self, z: torch.Tensor, slope: bool = False) -> tuple[torch.Tensor, torch.Tensor | float | None]:
        """(y, dy/dz) for a chunk's logits z, y computed in place in the model's order of operations (no autograd).

        dy/dz only with `slope`: (n, V) with a soft-cap, taken from tanh before its rescaling as autograd's tanh
        backward takes it (from y / softcap it would lose digits where tanh saturates); else the scale.
        """
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap is None:
            return z, self.scale if slope else None
        t = z.div_(self.softcap).tanh_()  # (n, V)
        d = (1.0 - t.square()).mul_(self.scale) if slope else None  # (n, V)
        return t.mul_(self.softcap), d


IDENTITY = LogitTransform()


class LogitTransformError(LogitguardError, ValueError):
    """The model's config asks for a logit transform that cannot be applied (a zero scale or soft-cap)."""


def _configs(model: nn.Module) -> list:
    """The model's config, then its text config where that is another object (multimodal models)."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return [config] if text is config else [config, text]


def logit_transform(model: nn.Module, from_backbone: bool = False) -> LogitTransform:
    """The transform `model` (the causal LM, unwrapped) applies to its head's output, for a tap on the head's
    input (default) or on the backbone's output (`from_backbone`, where a division of the head's input is not
    applied yet)."""
    configs = _configs(model)
    types = [getattr(c, "model_type", None) for c in configs]
    scale, softcap = 1.0, None
    for attribute, default in LOGIT_TRANSFORMS.items():
        value = next((v for c in configs if (v := getattr(c, attribute, None)) is not None), None)
        if value is None:
            continue
        kind = next((FAMILY_EXCEPTIONS[(t, attribute)] for t in types if (t, attribute) in FAMILY_EXCEPTIONS), default)
        if kind == "multiply":
            scale *= float(value)
        elif kind == "divide" or (kind == "divide_input" and from_backbone):
            scale /= float(value)
        elif kind == "softcap":
            softcap = float(value)
    if not math.isfinite(scale) or scale == 0 or (softcap is not None and not softcap > 0):
        raise LogitTransformError(
            f"the model's config transforms its logits by scale {scale} and soft-cap {softcap}, which leaves no "
            f"usable logits; check {' / '.join(LOGIT_TRANSFORMS)} in its config.json"
        )
    return LogitTransform(scale, softcap)
