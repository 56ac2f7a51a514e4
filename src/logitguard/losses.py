"""Regularizers as pure tensor functions. This module imports nothing but torch.

Shapes: B sequences, T positions, K safety tokens.
  policy    (B, T, K)  logits of the safety tokens under the model being trained
  reference (B, T, K)  the same logits under the frozen aligned model (PACT: (B, T, 2K), two references)
  weights   (B, T)     position weights: 1/0 for a mask, or a schedule (see `position_weights`)

STR, Eq. 2 of "Guardrails in Logit Space: Safety Token Regularization for LLM Alignment Preservation":
  L_F^(n) = (1/T_n) sum_t sum_k (l_base[t,k] - l_peft[t,k])^2
and the dataset loss is the mean over sequences (Eq. 3).
"""

from __future__ import annotations

import torch

POSITIONS = ("all", "response")


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf. Raised instead of silently skipping the step."""


def position_weights(
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
    positions: str = "all",
    first_response_tokens: int = 0,
    first_response_weight: float = 1.0,
) -> torch.Tensor:
    """Weights (B, T) saying which positions' logits the regularizer looks at.

    `all` (the paper's Eq. 2): every non-padding position. `response`: positions whose logits predict an
    assistant token, i.e. position t where labels[t + 1] != -100 (logits at t predict token t + 1).
    Optionally the first `first_response_tokens` response positions of each sequence get weight
    `first_response_weight` instead of 1: the first response token decides whether the model refuses,
    yet under a plain mean over all positions it carries ~1/T of the weight.
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    attn = attention_mask.to(torch.bool)
    if labels is None:
        if positions == "response" or first_response_tokens:
            raise ValueError("positions='response' and first-response weighting need labels")
        return attn.float()
    predicts_response = torch.zeros_like(attn)
    predicts_response[:, :-1] = labels[:, 1:] != -100  # (B, T)
    weights = (attn if positions == "all" else predicts_response & attn).float()
    if first_response_tokens and first_response_weight != 1.0:
        # rank of each response position within its sequence: 1, 2, ...
        rank = torch.cumsum(predicts_response.long(), dim=1) * predicts_response
        early = (rank >= 1) & (rank <= first_response_tokens)
        weights = torch.where(early, torch.full_like(weights, first_response_weight), weights)
    return weights


def str_per_sequence(policy: torch.Tensor, reference: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sequence STR (B,): weighted mean over positions of sum_k (reference - policy)^2, in fp32.

    A sequence whose weights are all zero contributes 0 (and should not be counted by the caller).
    """
    if policy.shape != reference.shape:
        raise ValueError(f"policy {tuple(policy.shape)} and reference {tuple(reference.shape)} differ")
    if weights.shape != policy.shape[:2]:
        raise ValueError(f"weights {tuple(weights.shape)} do not match logits {tuple(policy.shape[:2])}")
    diff = reference.float() - policy.float()  # (B, T, K)
    per_position = diff.pow(2).sum(dim=-1)  # (B, T)
    w = weights.float()
    total = w.sum(dim=1)  # (B,)
    return (per_position * w).sum(dim=1) / total.clamp_min(torch.finfo(torch.float32).tiny)


def str_loss(policy: torch.Tensor, reference: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """STR (Eq. 2 averaged over sequences as in Eq. 3): mean of the per-sequence values over the sequences
    that have at least one weighted position; 0 (with a gradient path) when none has."""
    per_seq = str_per_sequence(policy, reference, weights)
    counted = weights.sum(dim=1) > 0
    n = counted.sum()
    return per_seq.sum() / n.clamp_min(1)


def restricted_kl(
    policy: torch.Tensor, reference: torch.Tensor, weights: torch.Tensor, temperature: float = 2.0
) -> torch.Tensor:
    """Per-sequence confidence matching over the K safety tokens (B,): weighted mean over positions of
    T^2 * KL(softmax(reference / T) || softmax(policy / T)), both softmaxes restricted to the K tokens.
    A simplification of PACT (one reference, no token weights, no gate); `pact_per_sequence` is PACT itself."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ref_logp = torch.log_softmax(reference.float() / temperature, dim=-1)
    pol_logp = torch.log_softmax(policy.float() / temperature, dim=-1)
    kl = (ref_logp.exp() * (ref_logp - pol_logp)).sum(dim=-1) * temperature**2  # (B, T)
    w = weights.float()
    return (kl * w).sum(dim=1) / w.sum(dim=1).clamp_min(torch.finfo(torch.float32).tiny)


def top_p_count(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """(..., K) probabilities -> (...,) the smallest k whose k largest probabilities sum to at least `top_p`."""
    ordered = probs.sort(dim=-1, descending=True).values
    return (ordered.cumsum(dim=-1) < top_p).sum(dim=-1) + 1


def pact_per_sequence(
    policy: torch.Tensor,
    reference: torch.Tensor,
    weights: torch.Tensor,
    token_weights: torch.Tensor | list[float] | None = None,
    temperature: float = 2.0,
    top_p: float = 0.9,
    alpha: float = 2.0,
    bias: float = 0.0,
    prefix: int | None = 8,
    tau: float = 8.0,
    gate_temperature: float = 1.0,
) -> torch.Tensor:
    """PACT ("Few Tokens, Big Leverage", Wang et al. 2026; its authors' code, Glresearch1/PACT) per sequence (B,):
    the sum over positions of weights * T^2 * KL(q || p), to be divided by the step's total weight (a token mean
    over answer positions, see NORMALIZATION).

    reference (B, T, 2K) = [ref_full | ref_post]: the frozen aligned model's K logits on the whole sequence, and on
    the response alone (assistant header + response, no user prompt) placed at the same positions.
    token_weights (K,) v: PACT's weights of the safety tokens (None: all 1).
      c_t   = sigmoid(alpha * (I_policy - I_post - bias)) * exp(-max(t - prefix, 0) / tau)   (no gradient)
              I_x: top_p_count(softmax(x / gate_temperature)) / K; t: 0 at the first weighted position of a
              sequence; tau <= 0: a hard cut after `prefix` positions; prefix None: no decay
      mix   = (1 - c_t) * ref_full + c_t * ref_post              (logit space)
      q     = softmax(mix / T) * max(v, 0), renormalised        (negative-weight tokens get no target mass)
      p     = softmax(policy / T)                               (over all K tokens)
    """
    k = policy.shape[-1]
    if reference.shape != (*policy.shape[:-1], 2 * k):
        raise ValueError(
            f"pact needs a reference of 2K = {2 * k} logits per position (full context | response only), got "
            f"{tuple(reference.shape)} for policy {tuple(policy.shape)}; use a PACT reference (logitguard.pact)"
        )
    if weights.shape != policy.shape[:2]:
        raise ValueError(f"weights {tuple(weights.shape)} do not match logits {tuple(policy.shape[:2])}")
    if temperature <= 0 or gate_temperature <= 0:
        raise ValueError(f"temperatures must be > 0, got {temperature} and {gate_temperature}")
    pol = policy.float()  # (B, T, K)
    ref_full, ref_post = reference.float().split(k, dim=-1)  # (B, T, K) each
    w = weights.float()  # (B, T)
    with torch.no_grad():  # the gate is a count: no gradient flows through it
        i_policy = top_p_count(torch.softmax(pol / gate_temperature, dim=-1), top_p).float() / k  # (B, T)
        i_post = top_p_count(torch.softmax(ref_post / gate_temperature, dim=-1), top_p).float() / k
        gate = torch.sigmoid(alpha * (i_policy - i_post - bias))  # (B, T)
        if prefix is not None:
            first = (w > 0).float().argmax(dim=1, keepdim=True)  # (B, 1): the first answer position
            t = (torch.arange(w.shape[1], device=w.device)[None, :] - first).clamp_min(0).float()  # (B, T)
            if tau > 0:
                gate = gate * torch.exp(-(t - prefix).clamp_min(0) / tau)
            else:
                gate = gate * (t < prefix).float()
        gate = gate.unsqueeze(-1)  # (B, T, 1)
    mix = (1 - gate) * ref_full + gate * ref_post  # (B, T, K)
    v = torch.ones(k) if token_weights is None else torch.as_tensor(token_weights, dtype=torch.float32)
    if v.shape != (k,):
        raise ValueError(f"token_weights has shape {tuple(v.shape)}, expected ({k},)")
    target = torch.softmax(mix / temperature, dim=-1) * v.to(pol.device).clamp_min(0)
    q = target / target.sum(dim=-1, keepdim=True).clamp_min(1e-12)  # (B, T, K)
    log_p = torch.log_softmax(pol / temperature, dim=-1)
    kl = (q * (q.clamp_min(1e-12).log() - log_p)).sum(dim=-1) * temperature**2  # (B, T)
    return (kl * w).sum(dim=1)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16/fp16 -> fp32, fp64 stays fp64 so that tests can check identities exactly)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def constrained_sft_betas(
    mask: torch.Tensor,
    beta: float = 0.1,
    first_token_bias_factor: float = 5.0,
    bias_factor: float = 20.0,
    bias_length: int = 5,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """beta_t (B, T) of token-wise constrained SFT, by each token's rank among its row's counted tokens (mask (B, T)
    of 1/0; rank 0 is the row's first counted position, wherever it is along T):
      rank 0                      beta * first_token_bias_factor
      ranks 1 .. bias_length - 1  beta * bias_factor
      later ranks                 beta
    As in the authors' get_beta_list, bias_length 0 switches the first-token factor off too (every token gets beta).
    Positions outside the mask get beta (they are never counted)."""
    counted = mask.to(torch.bool)
    rank = torch.cumsum(counted.long(), dim=1) - 1  # (B, T): 0 at the first counted position of each row
    betas = torch.full(mask.shape, float(beta), dtype=dtype, device=mask.device)
    betas = torch.where(counted & (rank >= 1) & (rank < bias_length), beta * bias_factor, betas)
    if bias_length > 0:
        betas = torch.where(counted & (rank == 0), beta * first_token_bias_factor, betas)
    return betas


def constrained_sft_weights(
    policy_logp: torch.Tensor,
    reference_logp: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.1,
    first_token_bias_factor: float = 5.0,
    bias_factor: float = 20.0,
    bias_length: int = 5,
) -> torch.Tensor:
    """Per-token weights (B, T), detached: w_t = max(1e-3, 2 (1 - sigmoid(beta_t (log pi(y_t) - log pi_ref(y_t)))))
    on counted positions, 0 elsewhere. w_t = 1 where the policy equals the reference; it falls towards 1e-3 as the
    policy's log-prob rises above the reference's (the constraint), and rises towards 2 as it falls below."""
    with torch.no_grad():
        delta = _upcast(policy_logp) - _upcast(reference_logp)  # (B, T)
        betas = constrained_sft_betas(mask, beta, first_token_bias_factor, bias_factor, bias_length, delta.dtype)
        # 2 (1 - sigmoid(x)) = 2 sigmoid(-x), without the cancellation for large x
        w = (2 * torch.sigmoid(-betas * delta)).clamp_min(1e-3)  # (B, T)
        return torch.where(mask.to(torch.bool), w, torch.zeros_like(w))


def constrained_sft_per_sequence(
    policy_logp: torch.Tensor,
    reference_logp: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.1,
    first_token_bias_factor: float = 5.0,
    bias_factor: float = 20.0,
    bias_length: int = 5,
) -> torch.Tensor:
    """Token-wise constrained SFT (Qi et al., "Safety Alignment Should Be Made More Than Just a Few Tokens Deep",
    ICLR 2025, https://arxiv.org/abs/2406.05946; its authors' code, Unispac/shallow-vs-deep-alignment,
    finetuning_buckets/trainer/trainer.py), per sequence (B,): the sum over counted positions of -w_t log pi(y_t),
    w_t from `constrained_sft_weights` held constant. To be divided by the step's number of counted tokens
    (mask.sum() over every micro-batch of the step: NORMALIZATION "positions"), as the authors take the mean over
    the response tokens of a batch.

    policy_logp    (B, T)  log pi_theta(y_t): the trained model's log-prob of the label at each position
    reference_logp (B, T)  log pi_ref(y_t): the frozen aligned model's, precomputed once (no gradient)
    mask           (B, T)  1 on the positions that count (the response tokens), 0 elsewhere (padding, prompt)

    This is the authors' gradient surrogate of the paper's Eq. 3, -(2/beta_t) log sigmoid(beta_t D_t) with
    D_t = log pi_theta(y_t) - log pi_ref(y_t): both have the gradient -w_t d log pi_theta(y_t) (while w_t > 1e-3),
    but their values differ (the surrogate's value is a weighted NLL; at policy == reference it is the NLL). No
    cross-entropy term is added: this replaces the SFT loss."""
    if policy_logp.shape != reference_logp.shape or policy_logp.shape != mask.shape or policy_logp.dim() != 2:
        raise ValueError(
            f"policy_logp {tuple(policy_logp.shape)}, reference_logp {tuple(reference_logp.shape)} and mask "
            f"{tuple(mask.shape)} must all be (B, T)"
        )
    w = constrained_sft_weights(
        policy_logp, reference_logp, mask, beta, first_token_bias_factor, bias_factor, bias_length
    )  # (B, T), 0 off the mask
    logp = _upcast(policy_logp)
    # where(), not a product: a -inf log-prob at an uncounted position must not turn the sum into NaN
    per_token = torch.where(mask.to(torch.bool), -w.to(logp.dtype) * logp, torch.zeros_like(logp))  # (B, T)
    return per_token.sum(dim=1)


def constrained_sft_loss(
    policy_logp: torch.Tensor,
    reference_logp: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.1,
    first_token_bias_factor: float = 5.0,
    bias_factor: float = 20.0,
    bias_length: int = 5,
) -> torch.Tensor:
    """Token-wise constrained SFT over one batch: the mean over all counted tokens of -w_t log pi(y_t) (see
    `constrained_sft_per_sequence`); 0 (with a gradient path) when no token is counted."""
    per_seq = constrained_sft_per_sequence(
        policy_logp, reference_logp, mask, beta, first_token_bias_factor, bias_factor, bias_length
    )
    return per_seq.sum() / mask.to(torch.bool).sum().clamp_min(1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012): log(-expm1(x)) near 0, log1p(-exp(x))
    below -log 2."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def reference_topk(logits: torch.Tensor, k: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference side of `topk_kl_per_sequence` from full logits (..., V) (small tensors: the cache builder,
    chunk by chunk): ids (..., k) int64 of the k most probable tokens, most probable first; their log-probs
    logp (..., k); tail_logmass (...,) = log of the probability of every other token, taken as a logsumexp over
    those tokens' logits (exact however small the tail; -inf when k = V)."""
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k must be in 1..{logits.shape[-1]} (the vocabulary), got {k}")
    x = _upcast(logits)  # (..., V)
    lse = torch.logsumexp(x, dim=-1)  # (...,)
    values, ids = torch.topk(x, k, dim=-1)  # (..., k)
    rest = x.scatter(-1, ids, float("-inf"))  # (..., V): the top-k removed
    return ids, values - lse.unsqueeze(-1), torch.logsumexp(rest, dim=-1) - lse


def topk_kl_per_sequence(
    policy_topk_logits: torch.Tensor,
    policy_logsumexp: torch.Tensor,
    ref_topk_logp: torch.Tensor,
    ref_tail_logmass: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """KL(reference || policy) over the reference's top-k tokens plus one tail bucket, per sequence (B,): the
    weighted sum over positions, to be divided by the step's total weight (NORMALIZATION "positions": a mean over
    counted positions). The reference is the frozen aligned model, cached as its top-k (`reference_topk`); the
    "KL to the aligned model" term of anchored SFT, without a B x T x V reference.

    policy_topk_logits (B, T, k)  the trained model's logits at the reference's k ids of each position
    policy_logsumexp   (B, T)     the trained model's logsumexp over the whole vocabulary (its log-partition);
                                  the chunked head path yields both without a B x T x V tensor
    ref_topk_logp      (B, T, k)  the reference's log-probs of its k ids
    ref_tail_logmass   (B, T)     log of the reference's probability of every other token (-inf: none)
    weights            (B, T)     1/0 mask (or position weights) of the positions that count

    Per position, with p = reference and q = policy over the buckets {k ids, tail}:
      KL_k = sum_i p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail),  q_tail = 1 - sum_i q_i
    KL_k <= KL_full (the full-vocabulary KL): grouping tokens into one bucket never increases a KL. The gap is
      KL_full - KL_k = p_tail * KL(p restricted to the tail, renormalised || q restricted to the tail, renormalised)
    so it vanishes with the reference's tail mass, and is at most p_tail * max over tail tokens j of
    log((p_j / p_tail) / (q_j / q_tail)); KL_k = KL_full at k = V.
    Precision: q_tail = 1 - exp(logsumexp_i(log q_i)) is computed with log1mexp, and clamped to at least fp32's
    eps (~1.2e-7; rounding can put the k ids' mass at or above 1), so policy tails below ~1e-7 are not resolved."""
    if ref_topk_logp.shape != policy_topk_logits.shape or policy_topk_logits.dim() != 3:
        raise ValueError(
            f"policy_topk_logits {tuple(policy_topk_logits.shape)} and ref_topk_logp {tuple(ref_topk_logp.shape)} "
            "must both be (B, T, k)"
        )
    bt = policy_topk_logits.shape[:2]
    named = {"policy_logsumexp": policy_logsumexp, "ref_tail_logmass": ref_tail_logmass, "weights": weights}
    for name, x in named.items():
        if x.shape != bt:
            raise ValueError(f"{name} {tuple(x.shape)} does not match the (B, T) = {tuple(bt)} of the top-k logits")
    pol_logp = _upcast(policy_topk_logits) - _upcast(policy_logsumexp).unsqueeze(-1)  # (B, T, k)
    ref_logp = _upcast(ref_topk_logp)  # (B, T, k)
    eps = torch.finfo(torch.float32).eps
    pol_head = torch.logsumexp(pol_logp, dim=-1).clamp_max(-eps)  # (B, T): log of the k ids' policy mass, < 0
    pol_tail = log1mexp(pol_head)  # (B, T), >= log(eps)
    ref_p = ref_logp.exp()  # (B, T, k)
    # p log(p / q) with 0 log 0 = 0: where() keeps -inf (and its NaN gradient) out of the kept branch
    head = torch.where(ref_p > 0, ref_p * (torch.where(ref_p > 0, ref_logp, 0.0) - pol_logp), 0.0).sum(-1)
    ref_tail = _upcast(ref_tail_logmass)  # (B, T)
    ref_tail_p = ref_tail.exp()
    tail = torch.where(ref_tail_p > 0, ref_tail_p * (torch.where(ref_tail_p > 0, ref_tail, 0.0) - pol_tail), 0.0)
    kl = head + tail  # (B, T)
    w = _upcast(weights).to(kl.dtype)
    # where(): a position outside the mask may hold anything (padding), even inf, and still count 0
    return torch.where(w != 0, kl * w, 0.0).sum(dim=1)


def topk_kl_loss(
    policy_topk_logits: torch.Tensor,
    policy_logsumexp: torch.Tensor,
    ref_topk_logp: torch.Tensor,
    ref_tail_logmass: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """The top-k KL of `topk_kl_per_sequence` averaged over the batch's counted positions (weighted mean); 0 (with
    a gradient path) when none is counted."""
    per_seq = topk_kl_per_sequence(policy_topk_logits, policy_logsumexp, ref_topk_logp, ref_tail_logmass, weights)
    return per_seq.sum() / _upcast(weights).sum().clamp_min(torch.finfo(torch.float32).tiny)


def __getattr__(name: str):
    """`REGULARIZERS` (name -> the term's pure tensor function) and `NORMALIZATION` (name -> "sequences" | "positions":
    how the trainer turns a step's per-sequence values into the term), kept for the public API: aliases of
    logitguard.regularizers' registry, read when asked for (this module imports nothing but torch)."""
    if name in ("REGULARIZERS", "NORMALIZATION"):
        from .regularizers import REGISTRY

        if name == "REGULARIZERS":
            return {k: e.loss for k, e in REGISTRY.items()}
        return {k: e.normalization for k, e in REGISTRY.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_finite(value: torch.Tensor, name: str, step: int | None = None) -> None:
    """Raise NonFiniteLossError naming the term and the step when `value` holds NaN or inf."""
    if not torch.isfinite(value).all():
        where = f" at step {step}" if step is not None else ""
        raise NonFiniteLossError(
            f"{name} is not finite{where} (value {value.detach().float().cpu().tolist()}). "
            "Lower the learning rate or the regularizer weight, or train in fp32/bf16 instead of fp16."
        )
