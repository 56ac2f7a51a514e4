"""Trainer callbacks that keep a diverging run from damaging what it already saved.

Checks cost the host no wait on the device inside an optimizer step: each loss term of a micro-batch only ORs a
flag kept on the device (`NonFiniteWatch.note`), and the step reads every flag and the gradients' state at once,
in one transfer, just before the optimizer step (`FiniteGradients`). A `bool(tensor)` per micro-batch and per
parameter would make the host wait for the device each time, and the GPU idle while the host queues more work.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from .losses import NonFiniteLossError
from .models import world_size

FIX = "Lower the learning rate or the regularizer weight, or train in fp32/bf16 instead of fp16."


class NonFiniteWatch:
    """Which loss terms held NaN or inf in the current optimizer step, as flags on the device."""

    def __init__(self):
        self.flags: dict[str, torch.Tensor] = {}  # term -> 0-dim bool: non-finite in some micro-batch of the step
        self.values: dict[str, torch.Tensor] = {}  # term -> its first non-finite value (else its last value)

    def note(self, value: torch.Tensor, name: str) -> None:
        value = value.detach().float().sum()  # 0-dim; NaN or inf anywhere stays non-finite
        bad = ~torch.isfinite(value)  # 0-dim, on value's device: no host wait
        if name in self.flags:
            keep = self.flags[name]
            value = torch.where(keep, self.values[name], value)  # the first bad value is the one to report
            bad = keep | bad
        self.flags[name], self.values[name] = bad, value

    def clear(self) -> None:
        self.flags.clear()
        self.values.clear()


def _local(grad: torch.Tensor) -> torch.Tensor:
    return grad.to_local() if hasattr(grad, "to_local") else grad  # FSDP2: this rank's shard of the gradient


def nonfinite_gradients(grads: list[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """0-dim bool, True when some gradient holds NaN or inf: one fused reduction per device and dtype (the max-abs
    norm of each tensor, which propagates NaN and cannot overflow), not a kernel and a wait per parameter. On
    `device` (default: the gradients')."""
    by_device: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        g = _local(g)
        if g.numel():
            by_device.setdefault((g.device, g.dtype), []).append(g)
    flags = [~torch.stack(torch._foreach_norm(group, float("inf"))).isfinite().all() for group in by_device.values()]
    if not flags:
        return torch.zeros((), dtype=torch.bool, device=device)
    device = device or flags[0].device
    return torch.stack([f.to(device, non_blocking=True) for f in flags]).any()


class FiniteGradients(TrainerCallback):
    """Stop before an optimizer step whose loss terms or gradients hold NaN or inf.

    A finite loss can still have an overflowing backward; one such step turns the weights into NaN, and the next
    checkpoint would save them. Stopping here keeps the weights, and so every checkpoint, finite: the run ends
    with NonFiniteLossError and its earlier checkpoints stay usable. The loss terms noted in `watch` during the
    step are checked here too, in the same transfer (the error names the non-finite term and its value). Under
    fp16 with a gradient scaler, inf gradients are expected and the scaler skips those steps itself, so the
    gradients are not checked there. Across processes the flags are combined: every rank stops with one message.
    """

    def __init__(self, watch: NonFiniteWatch | None = None):
        self.watch = watch

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        names = sorted(self.watch.flags) if self.watch is not None else []
        scaled = getattr(optimizer, "scaler", None) is not None
        grads = [] if model is None or scaled else [p.grad for p in model.parameters() if p.grad is not None]
        if not names and not grads:
            return
        device = self.watch.flags[names[0]].device if names else grads[0].device
        grad_flag = nonfinite_gradients(grads, device)
        flags = torch.stack([self.watch.flags[n] for n in names] + [grad_flag]).float()  # (n + 1,)
        values = torch.stack([self.watch.values[n] for n in names]) if names else flags[:0]  # (n,)
        if world_size() > 1:
            # the same decision on every rank: under FSDP each holds a shard of the gradients, and a NaN in one
            # shard must stop them all, not leave the others waiting in the next collective
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        host = torch.cat([flags, values]).tolist()  # the step's one wait for the device
        if names:
            self.watch.clear()
        bad, value = host[: len(names) + 1], host[len(names) + 1 :]
        for i, name in enumerate(names):
            if bad[i]:
                raise NonFiniteLossError(f"{name} is not finite at step {state.global_step} (value {value[i]}). {FIX}")
        if bad[-1]:
            raise NonFiniteLossError(
                f"the gradients are not finite at step {state.global_step} (the loss was finite, its backward "
                "overflowed). Lower the learning rate or the regularizer weight, or train in fp32/bf16, not fp16."
            )
