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

from .errors import LogitguardError

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
    """Whether logits = head(hidden) is a plain linear map, so K logits can come from K head rows.

    Not so when the head itself carries an adapter, or the model rescales / soft-caps its logits.
    """
    lm = unwrap(model)
    head = lm.get_output_embeddings()
    config = getattr(lm, "config", None)
    rescaled = getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None)
    return isinstance(head, nn.Linear) and not hasattr(head, "base_layer") and not rescaled


def logits_from_hidden(hidden: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(B, T, H) @ (K, H).T -> (B, T, K) in the hidden state's dtype."""
    out = hidden @ rows.to(hidden.dtype).T
    return out + bias.to(out.dtype) if bias is not None else out


class HeadTap(dict):
    """What one forward of the model yields for the loss, computed inside the output head's own forward.

    Keys after the forward: `safety` (B, T, K) logits of the safety ids (differentiable), and when labels were
    given `ce_sum` (fp32 sum of next-token NLL over labels != -100) and `ce_tokens` (their count).
    """


@contextlib.contextmanager
def head_tap(
    model: nn.Module,
    ids: torch.Tensor | None,
    labels: torch.Tensor | None = None,
    full_logits: bool = False,
    chunk_tokens: int | None = None,
):
    """Within the context, a forward of `model` fills a `HeadTap` from the output head's input and weight.

    When the head is a plain linear map (and `full_logits` is False), the head's pre-hook keeps the final hidden
    state and lets the head itself run on zero positions, so the B x T x V logits never exist; the forward hook
    then computes the K safety logits from K head rows and the cross-entropy in chunks of positions
    (`chunked_nll`). Both run while the head's forward is in progress, which is when FSDP and DeepSpeed ZeRO-3
    hold its full weight (outside it the weight is a shard), and the forward hook is prepended so it runs before
    ZeRO-3's hook releases the weight. Otherwise (soft-capped or scaled logits, an adapter on the head, the
    paper's formulation) the head runs as usual and both values come from its (B, T, V) output.

    `labels` (B, T) are the unshifted labels: logits at position t predict labels[t + 1].
    """
    tap = HeadTap()
    head = unwrap(model).get_output_embeddings()
    from_rows = not full_logits and head_supports_rows(model)
    box: dict[str, torch.Tensor] = {}

    def pre_hook(_module, args):
        box["hidden"] = args[0]
        return (args[0][..., :0, :],) + tuple(args[1:])  # the head's own output: (B, 0, V)

    def forward_hook(module, _args, output):
        if from_rows:
            hidden = box.pop("hidden")  # (B, T, H)
            if ids is not None:
                bias = module.bias[ids] if module.bias is not None else None
                tap["safety"] = logits_from_hidden(hidden, module.weight[ids], bias)  # (B, T, K)
            if labels is not None:
                targets = labels[:, 1:].to(hidden.device)
                mask = targets != -100
                hidden = hidden[:, :-1][mask]  # (N, H): only positions that predict a label
                tap["ce_sum"] = chunked_nll(hidden, module.weight, module.bias, targets[mask], chunk_tokens)
                tap["ce_tokens"] = mask.sum()
            return output
        if ids is not None:
            tap["safety"] = output[..., ids.to(output.device)]  # backward materialises a (B, T, V) gradient
        if labels is not None:
            targets = labels[:, 1:].to(output.device)
            tap["ce_sum"] = F.cross_entropy(
                output[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
            )
            tap["ce_tokens"] = (targets != -100).sum()
        return output

    handles = [head.register_forward_hook(forward_hook, prepend=True)]
    if from_rows:
        handles.append(head.register_forward_pre_hook(pre_hook))
    try:
        yield tap
    finally:
        for handle in handles:
            handle.remove()


# Positions per chunk of the chunked cross-entropy: about 2^25 logits (128 MiB in fp32) at a time.
CHUNK_LOGITS = 2**25


def chunked_nll(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, chunk: int | None
) -> torch.Tensor:
    """Sum over N positions of -log softmax(hidden @ weight.T + bias)[target], in fp32, without (N, V) logits.

    hidden (N, H), weight (V, H), targets (N,). The logits exist one chunk of positions at a time; the gradients
    with respect to the hidden state (and the weight and bias when they are trained) are computed chunk by chunk
    in the forward and kept, so backward neither recomputes the logits nor needs the head's weight again (which
    FSDP and ZeRO-3 have released by then).
    """
    chunk = chunk or max(1, CHUNK_LOGITS // weight.shape[0])
    need = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    return _ChunkedNLL.apply(hidden, weight, bias, targets, chunk, need)


class _ChunkedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, need_grad):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        want_h = need_grad and hidden.requires_grad
        want_w = need_grad and weight.requires_grad
        want_b = need_grad and bias is not None and bias.requires_grad
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]  # (n, H)
            t = targets[start : start + chunk]  # (n,)
            logits = F.linear(h, weight.to(h.dtype), None if bias is None else bias.to(h.dtype)).float()  # (n, V)
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not (want_h or want_w or want_b):
                continue
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place: (n, V)
            g[torch.arange(len(t), device=g.device), t] -= 1.0  # d NLL / d logits
            if want_h:
                grad_h[start : start + chunk] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if want_w:
                grad_w.addmm_(g.T, h.float())
            if want_b:
                grad_b += g.sum(dim=0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (
            None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
            None if grad_w is None else (grad_w * grad_out).to(w_dtype),
            None if grad_b is None else (grad_b * grad_out).to(b_dtype),
            None,
            None,
            None,
        )


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode for a pass that does not train (a reference, a generation, a measurement), restored after.

    bitsandbytes' 4-bit layers, in eval mode on a CPU, repack their weights for a fast inference kernel and keep
    them so; backward through them is then lost for good (a QLoRA run on a CPU trained nothing). They have no
    dropout, so their training flag only selects that path: it stays on.
    """
    was_training = model.training
    model.eval()
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
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


class OnlineReference:
    """Reference logits from a no-grad forward of the adapter-disabled model every step."""

    policy_from_full_logits = False

    def __init__(self, token_ids: list[int], method: str = "lora"):
        if method in ("pissa", "full"):
            why = "PiSSA rewrites the base weights" if method == "pissa" else "full fine-tuning has no adapter"
            raise ReferenceError(
                f"reference 'online' takes the aligned model by disabling the adapter, which is wrong for "
                f"method {method!r} ({why}); use reference 'cache', which is built before the adapter is attached"
            )
        self.ids = torch.as_tensor(token_ids, dtype=torch.long)

    def ids_on(self, device: torch.device) -> torch.Tensor:
        if self.ids.device != device:
            self.ids = self.ids.to(device)  # once: a copy per step from pageable memory waits for the device
        return self.ids

    def __call__(self, model: nn.Module, batch: dict) -> torch.Tensor:
        ids = self.ids_on(batch["input_ids"].device)
        return frozen_safety_logits(model, batch["input_ids"], batch["attention_mask"], ids)


class PaperReference(OnlineReference):
    """The paper's formulation: full-vocabulary forward for the reference, gather for the trained side."""

    policy_from_full_logits = True

    def __call__(self, model: nn.Module, batch: dict) -> torch.Tensor:
        ids = self.ids_on(batch["input_ids"].device)
        return frozen_safety_logits(model, batch["input_ids"], batch["attention_mask"], ids, full=True)
