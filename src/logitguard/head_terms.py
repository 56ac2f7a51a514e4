"""Per-token terms computed inside the output head's forward, in chunks of positions: no (B, T, V) logits.

Two sides, both from the final hidden state and the head's weight while the head's forward runs (FSDP and ZeRO-3
hold the full weight only then, see reference.head_tap):

  policy (`chunked_row_terms`, differentiable): per labelled position its NLL, and optionally its top-k KL to a
      cached reference (losses.topk_kl_per_sequence, one position at a time). Each value depends only on its own
      row of the hidden state, so the gradient of each row is computed in the forward, chunk by chunk, and scaled
      in backward by the upstream gradient of that row's value: any per-token weighting applied afterwards
      (token-wise constrained SFT's w_t, position weights) gets the exact gradient without the weight in backward.
      The head's own weight gets no gradient here (callers fall back to full logits when it is trained).
  reference (`chunked_stats`, no grad): per position the log-prob of the next token, and the top-k log-probs
      with the tail mass (losses.reference_topk), for the reference cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .head_math import CHUNK_LOGITS, autocast_off, compute_dtype, grad_hidden
from .logit_transform import IDENTITY, LogitTransform
from .losses import reference_topk, topk_kl_per_sequence


def _chunk(weight: torch.Tensor, chunk: int | None) -> int:
    return chunk or max(1, CHUNK_LOGITS // weight.shape[0])


def chunked_row_terms(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    kl_reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    chunk: int | None = None,
    transform: LogitTransform = IDENTITY,
    nll_grad: bool = True,
    kl_ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(nll (N,), kl (N,) or None), fp32, differentiable with respect to `hidden` (N, H).

    targets (N,); kl_reference = (ids (N, k) int64, logp (N, k), tail_logmass (N,)): the reference's top-k at the
    same positions. kl[n] = KL(reference || policy) over the k ids plus one tail bucket (losses.topk_kl_per_sequence).
    nll_grad False: the NLL is a value only (a host that computes its own cross-entropy), saving its gradient pass.
    kl_ratio (N,): the caller's loss gives kl[n] r[n] times the upstream gradient of nll[n] (the trainer's CE +
    lambda * KL, normalised over the step). The two gradients are then summed per row before the one (n, V) x (V, H)
    product that projects them onto the hidden state, instead of one product each; backward checks the ratio and
    raises if the loss did not follow it.
    """
    need = torch.is_grad_enabled() and hidden.requires_grad
    ref = kl_reference if kl_reference is not None else (None, None, None)
    fused = kl_ratio if kl_reference is not None and nll_grad else None
    nll, kl = _ChunkedRowTerms.apply(
        hidden, weight, bias, targets, *ref, _chunk(weight, chunk), need, transform, nll_grad, fused
    )
    return nll, (kl if kl_reference is not None else None)


def _kl_rows(logits: torch.Tensor, lse: torch.Tensor, ids, ref_logp, ref_tail, grads: bool):
    """Per-row top-k KL (n,) and, with `grads`, d KL_n / d logits_n (n, V), through the pure loss function."""
    with torch.enable_grad():
        top = logits.gather(1, ids).detach().requires_grad_(grads)  # (n, k)
        part = lse.detach().requires_grad_(grads)  # (n,)
        ones = torch.ones_like(part)[:, None]
        kl = topk_kl_per_sequence(top[:, None], part[:, None], ref_logp[:, None], ref_tail[:, None], ones)  # (n,)
        if not grads:
            return kl.detach(), None
        d_top, d_part = torch.autograd.grad(kl.sum(), (top, part))
    g = torch.softmax(logits, dim=-1).mul_(d_part[:, None])  # d lse / d logits = softmax
    return kl.detach(), g.scatter_add_(1, ids, d_top)


class _ChunkedRowTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, kl_ids, kl_logp, kl_tail, chunk, need_grad, transform, nll_grad,
                ratio):  # fmt: skip
        device = hidden.device
        dtype = compute_dtype(hidden)
        f32 = dict(dtype=torch.float32, device=device)
        n_rows = hidden.shape[0]
        with_kl = kl_ids is not None
        fused = need_grad and ratio is not None
        nll = torch.zeros(n_rows, **f32)
        kl = torch.zeros(n_rows, **f32)
        grad_nll = torch.empty(hidden.shape, **f32) if need_grad and nll_grad else None  # (N, H): d nll_n / d h_n
        grad_kl = torch.empty(hidden.shape, **f32) if need_grad and with_kl and not fused else None
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        with autocast_off(device):
            for start in range(0, n_rows, chunk):
                rows = slice(start, start + chunk)
                h = hidden[rows].to(dtype)  # (n, H)
                t = targets[rows]  # (n,)
                logits, slope = transform.apply_(F.linear(h, w, b).float(), slope=need_grad)  # (n, V)
                lse = torch.logsumexp(logits, dim=-1)  # (n,)
                nll[rows] = lse - logits.gather(1, t[:, None]).squeeze(1)
                g_kl = None
                if with_kl:
                    kl[rows], g_kl = _kl_rows(logits, lse, kl_ids[rows], kl_logp[rows].float(), kl_tail[rows].float(),
                                              need_grad)  # fmt: skip
                    if grad_kl is not None:
                        g_kl = g_kl.mul_(slope) if not transform.identity else g_kl
                        grad_kl[rows] = grad_hidden(g_kl, w)
                if grad_nll is None:
                    continue
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place: (n, V)
                g[torch.arange(len(t), device=g.device), t] -= 1.0  # d nll / d logits
                if fused:  # d (nll_n + r_n kl_n) / d logits: one projection for both terms
                    g = g.add_(g_kl.mul_(ratio[rows].float()[:, None]))
                g = g.mul_(slope) if not transform.identity else g
                grad_nll[rows] = grad_hidden(g, w)
        ctx.save_for_backward(grad_nll, grad_kl, ratio if fused else None)
        ctx.h_dtype = hidden.dtype
        return nll, kl

    @staticmethod
    def backward(ctx, d_nll, d_kl):
        grad_nll, grad_kl, ratio = ctx.saved_tensors
        none = (None,) * 11
        if ratio is not None:  # fused: grad_nll holds d (nll_n + r_n kl_n) / d h_n
            d_nll = torch.zeros(grad_nll.shape[0], device=grad_nll.device) if d_nll is None else d_nll.float()
            d_kl = torch.zeros_like(d_nll) if d_kl is None else d_kl.float()
            expected = ratio.float() * d_nll  # (N,)
            scale = expected.abs().amax() if expected.numel() else 0.0  # a micro-batch with no labelled token: N = 0
            off = (d_kl - expected).abs() > 1e-3 * scale + 1e-30
            torch._assert_async(~off.any(), "kl_ratio does not match how the loss combines the NLL and the KL")
            return (grad_nll * d_nll[:, None]).to(ctx.h_dtype), *none
        grad = None  # fp32 first: the upstream gradients carry fp16's loss scale
        if grad_nll is not None and d_nll is not None:
            grad = grad_nll * d_nll.float()[:, None]
        if grad_kl is not None and d_kl is not None:
            grad = grad_kl * d_kl.float()[:, None] if grad is None else grad + grad_kl * d_kl.float()[:, None]
        return (None if grad is None else grad.to(ctx.h_dtype)), *none


@torch.no_grad()
def chunked_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    next_ids: torch.Tensor | None,
    topk: int = 0,
    chunk: int | None = None,
    transform: LogitTransform = IDENTITY,
) -> dict[str, torch.Tensor]:
    """The reference side, for N positions of hidden (N, H): `label_logp` (N,) log-prob of next_ids (N,) when
    given; `topk_ids` (N, k), `topk_logp` (N, k), `tail_logmass` (N,) when topk > 0. fp32, on hidden's device."""
    device = hidden.device
    dtype = compute_dtype(hidden)
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    out: dict[str, list[torch.Tensor]] = {}
    with autocast_off(device):
        for start in range(0, hidden.shape[0], _chunk(weight, chunk)):
            rows = slice(start, start + _chunk(weight, chunk))
            logits = transform(F.linear(hidden[rows].to(dtype), w, b).float())  # (n, V)
            for key, value in _stats(logits, None if next_ids is None else next_ids[rows], topk).items():
                out.setdefault(key, []).append(value)
    return {k: torch.cat(v) for k, v in out.items()}


def _stats(logits: torch.Tensor, next_ids: torch.Tensor | None, topk: int) -> dict[str, torch.Tensor]:
    """label_logp / top-k of fp32 logits (..., V)."""
    out = {}
    if next_ids is not None:
        lse = torch.logsumexp(logits, dim=-1)
        out["label_logp"] = logits.gather(-1, next_ids[..., None].to(logits.device)).squeeze(-1) - lse
    if topk:
        out["topk_ids"], out["topk_logp"], out["tail_logmass"] = reference_topk(logits, topk)
    return out


def full_logit_stats(logits: torch.Tensor, next_ids: torch.Tensor | None, topk: int) -> dict[str, torch.Tensor]:
    """`chunked_stats` from full logits (B, T, V) already computed (a head that carries an adapter)."""
    with torch.no_grad():
        return _stats(logits.float(), next_ids, topk)
