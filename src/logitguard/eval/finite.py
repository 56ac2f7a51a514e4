"""A forward that overflows (float16 on a model trained in bfloat16, typically) or weights that hold NaN (a diverged
run's adapter) give inf or NaN logits, and argmax, sums and means then give numbers without a word of warning: a
refusal rate of 0, a loss of nan. Each evaluation stage checks what it brings to the host anyway (generation: one
check per prefill) and stops with the cause and the fix."""

from __future__ import annotations

from ..errors import LogitguardError


class NonFiniteScoreError(LogitguardError, FloatingPointError):
    """The model's logits were inf or NaN during an evaluation."""


def refuse_non_finite(finite: bool, where: str, dtype) -> None:
    if finite:
        return
    name = str(dtype).removeprefix("torch.")
    fix = (
        "float16 overflows on models trained in bfloat16: evaluate in bfloat16 or float32 (--dtype, eval.dtype)"
        if name == "float16"
        else "the weights (or an adapter from a run whose loss diverged) hold inf or NaN"
    )
    raise NonFiniteScoreError(f"{where}: the model's logits are not finite in {name}; {fix}")
