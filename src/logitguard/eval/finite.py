"""A forward that overflows (float16 on a model trained in bfloat16, typically) or weights that hold NaN (a diverged
run's adapter) give NaN or inf logits, and argmax, sums and means then give numbers without a word of warning: a
refusal rate of 0, a loss of nan. Each evaluation stage checks what it brings to the host anyway (generation: one
check per prefill, or per first step through `generate`) and stops with the cause and the fix. -inf is not a fault:
a model may mask tokens with it, and a continuation it cannot produce has log-probability -inf."""

from __future__ import annotations

import math

import torch

from ..errors import LogitguardError


class NonFiniteScoreError(LogitguardError, FloatingPointError):
    """The model's logits were NaN or +inf during an evaluation."""


def _faulty(values) -> bool:
    """Whether scores (a list of floats, or a tensor of logits whose rows are checked at their maximum) hold NaN or
    +inf, or a row of logits is all -inf."""
    if isinstance(values, torch.Tensor):
        return not bool(torch.isfinite(values.amax(-1)).all())  # amax passes NaN on; one sync
    return any(math.isnan(v) or v == math.inf for v in values)


def refuse_non_finite(values, where: str, model) -> None:
    if not _faulty(values):
        return
    name = str(getattr(model, "dtype", "its dtype")).removeprefix("torch.")  # a wrapper may have none
    causes = "the weights (or an adapter from a run whose loss diverged) hold inf or NaN"
    if name == "float16":
        overflow = "float16 overflows on models trained in bfloat16 (use bfloat16 or float32: --dtype, eval.dtype)"
        causes = f"{overflow}, or {causes}"
    raise NonFiniteScoreError(f"{where}: the model's logits are not finite in {name}; {causes}")


class FirstStepCheck:
    """A `generate` logits processor that checks the first step's scores, as `refuse_non_finite` checks a prefill."""

    def __init__(self, model, where: str = "generation"):
        self.model, self.where, self.done = model, where, False

    def __call__(self, input_ids, scores):
        if not self.done:
            self.done = True
            refuse_non_finite(scores, self.where, self.model)
        return scores
