"""Safety-token logits of the trained model and of the frozen aligned reference.

The trained side takes its K logits as hidden_state @ head_rows.T inside the output head's own forward
(`head_tap`), where FSDP and ZeRO-3 hold the head's full weight: indexing the full (B, T, V) logits instead
makes backward build a full B x T x V gradient tensor.

Reference modes, one interface `reference(model, batch) -> (B, T, K)`:
  cache   (default) K logits per token computed once per dataset before training, stored as safetensors
          shards keyed by a fingerprint, memory-mapped when read. Built before any adapter is attached, so
          it is the aligned model for every method (PiSSA and full fine-tuning included).
  online  one no-grad forward per step of the decoder with the adapter disabled, then the K head rows only.
          Refused for PiSSA and full fine-tuning, where "adapter disabled" is not the aligned model.
  paper   the paper's formulation, for comparison: a full forward of the adapter-disabled model with
          full-vocabulary logits, and the trained side's K logits gathered from the full logits.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from . import adapters
from .errors import LogitguardError
from .head_math import CHUNK_LOGITS, autocast_off, compute_dtype, grad_hidden
from .head_terms import chunked_row_terms, chunked_stats, full_logit_stats
from .logit_transform import IDENTITY, LogitTransform, logit_transform
from .losses import topk_kl_per_sequence

MODES = ("cache", "online", "paper")


class ReferenceError(LogitguardError, RuntimeError):
    """The reference logits cannot be obtained correctly (wrong mode for the method, stale cache, ...)."""


def _strip_parallel(model: nn.Module) -> nn.Module:
    """The model under DDP / accelerate wrappers (a PEFT wrapper stays)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The causal LM under DDP/accelerate wrappers and a PEFT wrapper."""
    model = _strip_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def adapter_disabled(model: nn.Module):
    """Context in which a PEFT model runs as its base model (a no-op for a plain model)."""
    model = _strip_parallel(model)
    if hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return contextlib.nullcontext()


def head_supports_rows(model: nn.Module) -> bool:
    """Whether logits = transform(head(hidden)) with a plain linear head, so K logits can come from K head rows and
    the cross-entropy from chunks of positions (the model's elementwise logit transform is applied in both).

    Not so when the head itself carries an adapter.
    """
    head = unwrap(model).get_output_embeddings()
    return isinstance(head, nn.Linear) and not hasattr(head, "base_layer")


def logits_from_hidden(
    hidden: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor | None, transform: LogitTransform = IDENTITY
) -> torch.Tensor:
    """transform((B, T, H) @ (K, H).T + bias) -> (B, T, K) in fp32 on the hidden state's device.

    fp32 whatever the autocast: bf16 logits between 16 and 32 are 0.125 apart, coarser than the regularizer's
    signal, and with K columns the fp32 matmul costs little. `rows` may sit on another device (the head's).
    """
    with autocast_off(hidden.device):
        out = hidden.float() @ rows.to(hidden.device, torch.float32).T  # (B, T, K)
        if bias is not None:
            out = out + bias.to(hidden.device, torch.float32)
        return transform(out)


class HeadTap(dict):
    """What one forward of the model yields for the loss, computed inside the output head's own forward.

    Keys after the forward: `safety` (B, T, K) fp32 logits of the safety ids (differentiable), and when labels were
    given `ce_sum` (fp32 sum of next-token NLL over labels != -100) and `ce_tokens` (their count). All of them on
    the device of the ids / labels given, wherever the head sits; the logits are the model's own (after its
    soft-cap or scale, see logit_transform.py), so ce_sum / ce_tokens is the model's `outputs.loss`.
    """


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; no call at all where it is there already (the trainer keeps its ids on the device)."""
    return t if t.device == device else t.to(device)


@contextlib.contextmanager
def head_tap(
    model: nn.Module,
    ids: torch.Tensor | None,
    labels: torch.Tensor | None = None,
    full_logits: bool = False,
    chunk_tokens: int | None = None,
    per_token: bool = False,
    kl_reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    stats: dict | None = None,
    kl_ratio: torch.Tensor | None = None,
):
    """Within the context, a forward of `model` fills a `HeadTap` from the output head's input and weight.

    When the head is a plain linear map (and `full_logits` is False), the head's pre-hook keeps the final hidden
    state and lets the head itself run on zero positions, so the B x T x V logits never exist; the forward hook
    then computes the K safety logits from K head rows and the cross-entropy in chunks of positions
    (`chunked_nll`). Both run while the head's forward is in progress, which is when FSDP and DeepSpeed ZeRO-3
    hold its full weight (outside it the weight is a shard), and the forward hook is prepended so it runs before
    ZeRO-3's hook releases the weight. Otherwise (an adapter on the head, the paper's formulation) the head runs as
    usual and both values come from its (B, T, V) output. Either way the model's own logit transform (Gemma-2's
    soft-cap, Cohere's and Granite's scales) is applied as its forward applies it after the head.

    `labels` (B, T) are the unshifted labels: logits at position t predict labels[t + 1].
    Per-token terms (head_terms.py), for the regularizers that need more than K logits:
      per_token     also `nll` (B, T): each position's differentiable NLL of labels[t + 1] (0 where none)
      kl_reference  (ids (B, T, k), logp (B, T, k), tail_logmass (B, T)) of the reference: also `kl` (B, T), each
                    labelled position's differentiable top-k KL(reference || model) (0 elsewhere)
      kl_ratio      (B, T): how many times the NLL's gradient the loss gives each position's KL, so that both
                    are projected onto the hidden state in one product (head_terms.chunked_row_terms)
      stats         {"next_ids": (B, T) or None, "topk": k}: no-grad reference statistics at every position,
                    `label_logp` (B, T) and `topk_ids`, `topk_logp` (B, T, k), `tail_logmass` (B, T)
    Per-token terms give the head's own weight no gradient: a trained head takes the full-logits path.
    """
    tap = HeadTap()
    lm = unwrap(model)
    head = lm.get_output_embeddings()
    transform = logit_transform(lm)
    rowwise = per_token or kl_reference is not None
    from_rows = not full_logits and head_supports_rows(model)
    from_rows = from_rows and not (rowwise and (head.weight.requires_grad or getattr(head.bias, "requires_grad", 0)))
    box: dict[str, torch.Tensor] = {}

    def pre_hook(_module, args):
        box["hidden"] = args[0]
        return (args[0][..., :0, :],) + tuple(args[1:])  # the head's own output: (B, 0, V)

    def forward_hook(module, _args, output):
        if from_rows:
            # The hidden state is on the last layer's device; with device_map="auto" the head may be on another
            # GPU (its own hook moves its input there only inside its forward). Indexing and the chunked CE run
            # on the weight's device, the K logits on the hidden's (K rows are cheap to move, the head is not).
            hidden, weight, bias = box.pop("hidden"), module.weight, module.bias  # hidden (B, T, H)
            if ids is not None:
                at = _on(ids, weight.device)
                rows, row_bias = weight[at], bias[at] if bias is not None else None  # (K, H), (K,)
                tap["safety"] = logits_from_hidden(hidden, rows, row_bias, transform).to(ids.device)  # (B, T, K)
            if labels is not None and rowwise:
                _row_terms(tap, hidden, weight, bias, labels, kl_reference, chunk_tokens, transform, kl_ratio)
            elif labels is not None:
                targets = labels[:, 1:].to(hidden.device)
                mask = targets != -100
                picked = hidden[:, :-1][mask].to(weight.device)  # (N, H): only positions that predict a label
                nll = chunked_nll(picked, weight, bias, targets[mask].to(weight.device), chunk_tokens, transform)
                tap["ce_sum"] = nll.to(labels.device)
                tap["ce_tokens"] = mask.sum().to(labels.device)
            if stats:
                nxt = stats.get("next_ids")
                flat = chunked_stats(hidden.flatten(0, 1).to(weight.device), weight, bias,
                                     None if nxt is None else nxt.flatten().to(weight.device), stats.get("topk", 0),
                                     chunk_tokens, transform)  # fmt: skip
                tap.update({k: v.unflatten(0, hidden.shape[:2]) for k, v in flat.items()})
            return output
        if ids is not None:  # backward materialises a (B, T, V) gradient
            tap["safety"] = transform(output[..., _on(ids, output.device)].float()).to(ids.device)
        if stats:
            tap.update(full_logit_stats(transform(output.float()), stats.get("next_ids"), stats.get("topk", 0)))
        if labels is not None and rowwise:
            _row_terms_full(tap, transform(output.float()), labels, kl_reference)
        elif labels is not None:
            targets = labels[:, 1:].to(output.device)
            logits = transform(output[:, :-1].flatten(0, 1).float())  # (B * (T - 1), V)
            ce = F.cross_entropy(logits, targets.flatten(), ignore_index=-100, reduction="sum")
            tap["ce_sum"] = ce.to(labels.device)
            tap["ce_tokens"] = (targets != -100).sum().to(labels.device)
        return output

    handles = [head.register_forward_hook(forward_hook, prepend=True)]
    if from_rows:
        handles.append(head.register_forward_pre_hook(pre_hook))
    try:
        yield tap
    finally:
        for handle in handles:
            handle.remove()


def _to_grid(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(N,) values at the True places of mask (B, T - 1) -> (B, T), zero elsewhere and in the last column."""
    grid = values.new_zeros(mask.shape).masked_scatter(mask.to(values.device), values)  # (B, T - 1)
    return F.pad(grid, (0, 1))


def _row_terms(tap, hidden, weight, bias, labels, kl_reference, chunk_tokens, transform, kl_ratio=None) -> None:
    """`nll` (and `kl`) (B, T) from the hidden state (B, T, H) at the positions that predict a label."""
    targets = labels[:, 1:].to(hidden.device)
    mask = targets != -100  # (B, T - 1)
    picked = hidden[:, :-1][mask].to(weight.device)  # (N, H)
    ref = None
    if kl_reference is not None:
        ref = tuple(x[:, :-1][mask.to(x.device)].to(weight.device) for x in kl_reference)  # (N, k), (N, k), (N,)
    ratio = None if kl_ratio is None else kl_ratio[:, :-1][mask.to(kl_ratio.device)].to(weight.device)  # (N,)
    nll, kl = chunked_row_terms(
        picked, weight, bias, targets[mask].to(weight.device), ref, chunk_tokens, transform, kl_ratio=ratio
    )
    tap["nll"] = _to_grid(mask, nll).to(labels.device)
    tap["ce_sum"] = tap["nll"].sum()
    tap["ce_tokens"] = mask.sum().to(labels.device)
    if kl is not None:
        tap["kl"] = _to_grid(mask, kl).to(labels.device)


def _row_terms_full(tap, logits, labels, kl_reference) -> None:
    """`_row_terms` from full logits (B, T, V) in fp32 (the model's own, after its transform)."""
    targets = labels[:, 1:].to(logits.device)
    mask = targets != -100  # (B, T - 1)
    logp = torch.log_softmax(logits[:, :-1], dim=-1)  # (B, T - 1, V)
    nll = -logp.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)  # (B, T - 1)
    tap["nll"] = F.pad(torch.where(mask, nll, 0.0), (0, 1)).to(labels.device)
    tap["ce_sum"] = tap["nll"].sum()
    tap["ce_tokens"] = mask.sum().to(labels.device)
    if kl_reference is not None:
        ids, ref_logp, ref_tail = (x[:, :-1].to(logits.device) for x in kl_reference)
        lse = torch.logsumexp(logits[:, :-1], dim=-1)  # (B, T - 1)
        top = logits[:, :-1].gather(-1, ids)  # (B, T - 1, k)
        one = lambda x: x.flatten(0, 1)[:, None]  # noqa: E731  (B * (T - 1), 1, ...): one position per row
        kl = topk_kl_per_sequence(one(top), one(lse), one(ref_logp), one(ref_tail), one(mask.float()))
        tap["kl"] = F.pad(kl.view(mask.shape), (0, 1)).to(labels.device)


def chunked_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk: int | None,
    transform: LogitTransform = IDENTITY,
) -> torch.Tensor:
    """Sum over N positions of -log softmax(transform(hidden @ weight.T + bias))[target], in fp32, without (N, V)
    logits.

    hidden (N, H) and weight (V, H) on one device, targets (N,). The logits exist one chunk of positions at a time;
    the gradients with respect to the hidden state (and the weight and bias when they are trained) are computed
    chunk by chunk in the forward and kept in fp32, so backward neither recomputes the logits nor needs the head's
    weight again (which FSDP and ZeRO-3 have released by then). The matmuls run in autocast's dtype where autocast
    is on (else the hidden state's), with the weight cast once.
    """
    chunk = chunk or max(1, CHUNK_LOGITS // weight.shape[0])
    need = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    return _ChunkedNLL.apply(hidden, weight, bias, targets, chunk, need, transform)


def _add_grad_weight(grad_w: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """grad_w (V, H) fp32 += g.T (V, n) @ h (n, H): the GEMM in bf16 when h is bf16 (tensor cores; its (V, H)
    result is accumulated into fp32 over the chunks), else in fp32 (fp16 would flush small probabilities)."""
    if h.dtype == torch.bfloat16:
        grad_w.add_(g.T.to(h.dtype) @ h)
    else:
        grad_w.addmm_(g.T, h.float())


class _ChunkedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, need_grad, transform):
        device = hidden.device
        dtype = compute_dtype(hidden)
        total = torch.zeros((), dtype=torch.float32, device=device)
        want_h = need_grad and hidden.requires_grad
        want_w = need_grad and weight.requires_grad
        want_b = need_grad and bias is not None and bias.requires_grad
        f32 = dict(dtype=torch.float32, device=device)
        grad_h = torch.empty(hidden.shape, **f32) if want_h else None  # fp32: an fp16 one would underflow
        grad_w = torch.zeros(weight.shape, **f32) if want_w else None
        grad_b = torch.zeros(bias.shape, **f32) if want_b else None
        # Cast once, and keep autocast from casting again in every chunk (an fp32 frozen head after k-bit
        # preparation is ~1 GB per cast on Llama-3-8B).
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        grads = want_h or want_w or want_b
        with autocast_off(device):
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start : start + chunk].to(dtype)  # (n, H)
                t = targets[start : start + chunk]  # (n,)
                # the model's own logits (n, V) fp32, and d logits / d head output where gradients are needed
                logits, slope = transform.apply_(F.linear(h, w, b).float(), slope=grads)
                lse = torch.logsumexp(logits, dim=-1)  # (n,)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if not grads:
                    continue
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place: (n, V)
                g[torch.arange(len(t), device=g.device), t] -= 1.0  # d NLL / d logits
                g = g.mul_(slope) if not transform.identity else g  # d NLL / d head output
                if want_h:
                    grad_h[start : start + chunk] = grad_hidden(g, w)
                if want_w:
                    _add_grad_weight(grad_w, g, h)
                if want_b:
                    grad_b += g.sum(dim=0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        # Scaled in fp32 first: grad_out carries fp16's loss scale, which brings small gradients into range.
        return (
            None if grad_h is None else (grad_h * grad_out).to(h_dtype),
            None if grad_w is None else (grad_w * grad_out).to(w_dtype),
            None if grad_b is None else (grad_b * grad_out).to(b_dtype),
            None,
            None,
            None,
            None,
        )


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode for a pass that does not train (a reference, a generation, a measurement), restored after.

    bitsandbytes' 4-bit layers, in eval mode on a CPU, repack their weights for a fast inference kernel and keep
    them so; backward through them is then lost for good (a QLoRA run on a CPU trained nothing). They have no
    dropout, so their training flag only selects that path: it stays on. Only bitsandbytes' own class: PEFT's
    LoRA wrapper around it has the same name, and left in training mode a DoRA wrapper recomputes the base output.
    """
    was_training = model.training
    model.eval()
    for module in model.modules():
        kind = type(module)
        if kind.__name__ == "Linear4bit" and kind.__module__.startswith("bitsandbytes."):
            module.training = True
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def frozen_safety_logits(model: nn.Module, input_ids, attention_mask, ids: torch.Tensor, full: bool = False):
    """K safety logits (B, T, K) of the model with any adapter disabled, computed in eval mode, fp32.

    The model's own forward runs (so wrappers such as FSDP gather what they must) with `head_tap` taking the K
    logits from the head's input; full=True computes the whole vocabulary and gathers K columns (the paper's
    formulation).
    """
    ids = ids.to(input_ids.device)
    with eval_mode(model), adapter_disabled(model), head_tap(model, ids, full_logits=full) as tap:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return tap["safety"].float()


def next_token_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) the token each position predicts: input_ids shifted left by one, 0 at the last position."""
    return F.pad(input_ids[:, 1:], (0, 1))


@torch.no_grad()
def frozen_stats(
    model: nn.Module, input_ids, attention_mask, ids: torch.Tensor | None, label_logp: bool = False, topk: int = 0
) -> dict[str, torch.Tensor]:
    """What a reference beyond K logits needs, from one forward of the model with any adapter disabled (eval mode,
    fp32): `safety` (B, T, K) when `ids` are given, `label_logp` (B, T) the log-prob of each position's next token
    (0 at each row's last position), `topk_ids`, `topk_logp` (B, T, k) and `tail_logmass` (B, T) when topk > 0."""
    ids = None if ids is None else ids.to(input_ids.device)
    stats = {"next_ids": next_token_ids(input_ids) if label_logp else None, "topk": topk}
    with eval_mode(model), adapter_disabled(model), head_tap(model, ids, stats=stats) as tap:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    out = {k: v.to(input_ids.device) for k, v in tap.items()}
    if "label_logp" in out:  # a row's last position predicts nothing (padding, or past the end)
        predicts = F.pad(attention_mask[:, 1:], (0, 1)).to(out["label_logp"].device).bool()  # (B, T)
        out["label_logp"] = torch.where(predicts, out["label_logp"], 0.0)
    return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}


class OnlineReference:
    """Reference logits from a no-grad forward of the adapter-disabled model every step."""

    policy_from_full_logits = False

    def __init__(self, token_ids: list[int], method: str = "lora"):
        why = adapters.get(method).online_reference_error
        if why is not None:
            raise ReferenceError(
                f"reference 'online' takes the aligned model by disabling the adapter, which is wrong here: "
                f"{why}; use reference 'cache', which is built before the adapter is attached"
            )
        self.ids = torch.as_tensor(token_ids, dtype=torch.long)

    def ids_on(self, device: torch.device) -> torch.Tensor:
        if self.ids.device != device:
            self.ids = self.ids.to(device)  # once: a copy per step from pageable memory waits for the device
        return self.ids

    def __call__(self, model: nn.Module, batch: dict) -> torch.Tensor:
        ids = self.ids_on(batch["input_ids"].device)
        return frozen_safety_logits(model, batch["input_ids"], batch["attention_mask"], ids)


class OnlineStatsReference(OnlineReference):
    """Per-token references (label log-probs, top-k) from a no-grad forward of the adapter-disabled model every
    step: `kind` "label_logp" returns (B, T), "topk" returns (ids (B, T, k), logp (B, T, k), tail_logmass (B, T))."""

    def __init__(self, token_ids: list[int], method: str = "lora", kind: str = "label_logp", topk: int = 0):
        super().__init__(token_ids, method)
        if kind not in ("label_logp", "topk"):
            raise ValueError(f"kind must be label_logp or topk, got {kind!r}")
        self.kind, self.topk = kind, topk

    def __call__(self, model: nn.Module, batch: dict):
        stats = frozen_stats(model, batch["input_ids"], batch["attention_mask"], None, self.kind == "label_logp",
                             self.topk if self.kind == "topk" else 0)  # fmt: skip
        if self.kind == "label_logp":
            return stats["label_logp"]
        return stats["topk_ids"], stats["topk_logp"], stats["tail_logmass"]


class PaperReference(OnlineReference):
    """The paper's formulation: full-vocabulary forward for the reference, gather for the trained side."""

    policy_from_full_logits = True

    def __call__(self, model: nn.Module, batch: dict) -> torch.Tensor:
        ids = self.ids_on(batch["input_ids"].device)
        return frozen_safety_logits(model, batch["input_ids"], batch["attention_mask"], ids, full=True)
