"""The arithmetic the output-head code shares (reference.py's chunked cross-entropy, head_terms.py's per-position
terms): the chunk size, where autocast is off, the dtype a matmul runs in, and the fp32 gradient product. It
imports nothing of logitguard, so both import it and neither imports the other in a function."""

from __future__ import annotations

import contextlib

import torch

# Positions per chunk of the chunked cross-entropy: about 2^25 logits (128 MiB in fp32) at a time.
CHUNK_LOGITS = 2**25


def autocast_off(device: torch.device):
    """A region where autocast does not re-cast operands (a no-op on a device without autocast, e.g. meta)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `t` runs in: autocast's where it is on for t's device, else t's own."""
    kind = t.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return t.dtype


def grad_hidden(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(n, V) fp32 @ (V, H) in w's dtype -> (n, H) fp32.

    fp16: each row is first scaled by a power of two to its largest entry (exact, undone after), so the small
    probabilities of a confident model neither underflow nor turn subnormal (the loss scale reaches them only in
    backward, after this).
    """
    if w.dtype == torch.float32:
        return g @ w
    if w.dtype != torch.float16:
        return (g.to(w.dtype) @ w).float()
    exponent = torch.frexp(g.abs().amax(dim=1, keepdim=True)).exponent  # (n, 1): max |g_row| < 2^exponent
    return torch.ldexp((torch.ldexp(g, -exponent).to(w.dtype) @ w).float(), exponent)
