"""SafetyTrainer: a transformers.Trainer whose loss is CE + lambda * a regularizer (STR, PACT, KL, ...).

Normalisation (why it is written out here): both terms are normalised over the whole optimizer step,
i.e. all gradient-accumulation micro-batches on all processes, so gradients do not depend on how a batch
is split or padded:
  CE   = sum of token NLLs on assistant tokens / number of such tokens in the step  (Trainer's token mean)
  reg  = sum of per-sequence regularizer values / number of sequences with a weighted position in the step
         (Eq. 2: mean over a sequence's positions, then mean over sequences); for PACT, whose per-sequence values
         are sums over positions, / the total weight of the step's positions (its mean over answer positions)
The counts come from `get_batch_samples`, which sees every micro-batch of the step before the first
forward. The loss is therefore already scaled for accumulation (`loss_is_scaled_for_ga = True`) and is
multiplied by the number of processes because DDP averages gradients across them.
Evaluation reports cross-entropy only (`eval_loss`): the utility measure of the paper's Table 5.

Which term, what it reads and how it is normalised come from its registry entry (logitguard.regularizers), never
from its name: `reads` says what the head's forward yields for it (K safety logits; per-token label log-probs for
constrained_sft, which replaces CE; the per-position top-k KL for kl, whose reference is read before the forward).

Memory: the forward never builds the (B, T, V) logits. `head_tap` takes the final hidden state inside the output
head's forward and computes the K safety logits from K head rows and the cross-entropy in chunks of positions
(V is 128k for Llama-3 and 152k for Qwen: B x T x V fp32 logits are gigabytes).
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict

import torch
from transformers import Trainer

from .deprecated import renamed_keys, warn
from .errors import ConfigError
from .guards import FiniteGradients, NonFiniteWatch
from .losses import check_finite, position_weights
from .reference import head_tap
from .regularizers import get as get_regularizer


class SafetyRegularization:
    """The safety-token regularizer as a mixin for any transformers.Trainer subclass (logitguard's own trainer,
    TRL's SFTTrainer): settings, the step-wide sequence count, the regularizer term and its logging. The host
    computes the cross-entropy its own way and adds `self.reg_weight() * self.regularize(...)`."""

    def setup_safety(
        self,
        safety_ids: list[int],
        reference,
        reg_weight: float | None = None,
        regularizer: str = "str",
        temperature: float = 2.0,
        positions: str = "all",
        first_response_tokens: int = 0,
        first_response_weight: float = 1.0,
        regularizer_kwargs: dict | None = None,
    ) -> None:
        if self.args.n_gpu > 1:
            # nn.DataParallel replicas would each fire the hooks that take the safety logits into one shared box
            raise ConfigError(
                f"{self.args.n_gpu} GPUs are visible to one process, where the Trainer would use nn.DataParallel; "
                "launch with `accelerate launch` (one process per GPU), or make one GPU visible with "
                "CUDA_VISIBLE_DEVICES"
            )
        entry = get_regularizer(regularizer)  # the registry entry: what the term reads, needs and how it normalises
        if reg_weight is None:  # the term's own default, as TrainConfig and SafetySFTConfig resolve it
            reg_weight = entry.default_weight
        if not (reg_weight >= 0 and math.isfinite(reg_weight)):  # NaN would pass `< 0` and turn the term off
            raise ConfigError(f"reg_weight: must be a finite number >= 0, got {reg_weight}")
        if reg_weight > 0 and reference is None:
            raise ConfigError("reg_weight > 0 needs a reference (cache, online or paper)")
        if len(safety_ids) < entry.min_tokens:
            raise ConfigError(
                f"the {regularizer} regularizer compares distributions over the safety tokens: it needs >= 2"
            )
        self.entry = entry
        self.safety_ids = torch.as_tensor(list(safety_ids), dtype=torch.long)
        self._ids_on: dict[torch.device, torch.Tensor] = {}  # safety_ids moved once per device (see safety_ids_on)
        self.reference = reference
        self.configured_weight = float(reg_weight)
        self.regularizer = entry.per_sequence
        kwargs = dict(regularizer_kwargs or {})
        if kwargs.get("token_weights") is not None and len(kwargs["token_weights"]) != len(safety_ids):
            raise ConfigError(f"{len(kwargs['token_weights'])} token weights for {len(safety_ids)} safety tokens")
        if entry.temperature:
            kwargs.setdefault("temperature", temperature)
        if kwargs:  # settings and token weights (pact's v), bound once
            self.regularizer = functools.partial(self.regularizer, **kwargs)
        self.normalization = entry.normalization
        # PACT, constrained_sft and kl look at answer positions only (PACT's gate counts from the first one)
        positions = entry.positions or positions
        self.position_kwargs = dict(
            positions=positions,
            first_response_tokens=first_response_tokens,
            first_response_weight=first_response_weight,
        )
        self._step_counts: torch.Tensor | None = None  # (tokens, sequences, weight) in the current optimizer step
        # Loss terms flag NaN / inf on the device; the flags and the gradients are read once per optimizer step,
        # before it: a diverging step never reaches the weights or a checkpoint, no micro-batch waits for the device
        self._nonfinite = NonFiniteWatch()
        self.add_callback(FiniteGradients(self._nonfinite))
        self._safety_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    @property
    def str_weight(self) -> float:
        """The old name of configured_weight, for one release (logitguard.deprecated)."""
        warn("trainer.str_weight", "trainer.configured_weight (lambda now: trainer.reg_weight())")
        return self.configured_weight

    def safety_ids_on(self, device: torch.device) -> torch.Tensor:
        """The safety ids on `device`, copied there once: a copy per micro-batch from pageable host memory makes
        the host wait for the device each time."""
        ids = self._ids_on.get(device)
        if ids is None:
            ids = self._ids_on[device] = self.safety_ids.to(device)
        return ids

    def check_term(self, value: torch.Tensor, name: str, mode: str) -> None:
        """NaN / inf in a loss term: in training, flagged on the device and raised before the optimizer step (by
        FiniteGradients, naming the term and the step); in evaluation, raised at once."""
        if mode == "train":
            self._nonfinite.note(value, name)
        else:
            check_finite(value, name, self.state.global_step)

    def _weights(self, batch: dict) -> torch.Tensor:
        return position_weights(batch["attention_mask"], batch["labels"], **self.position_kwargs)

    def _counts(self, batch: dict) -> torch.Tensor:
        tokens = (batch["labels"][:, 1:] != -100).sum()
        weights = self._weights(batch)
        sequences = (weights.sum(dim=1) > 0).sum()
        return torch.stack([tokens.float(), sequences.float(), weights.sum()])

    def needs_step_counts(self) -> bool:
        """Whether this step's (tokens, sequences, weight) counts are used: the regularizer normalises by them (and
        logitguard's own trainer its cross-entropy, see SafetyTrainer)."""
        return self.configured_weight > 0

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._micro = 0  # micro-batches of this step seen by compute_loss (anchor sampling)
        if not self.needs_step_counts():  # a plain run: TRL's padding-free batches have no attention_mask to count
            return batch_samples, num_items
        counts = torch.stack([self._counts(b).to(device) for b in batch_samples]).sum(dim=0)  # (3,) on `device`
        if self.args.world_size > 1:
            counts = self.accelerator.gather(counts.unsqueeze(0)).sum(dim=0)
        self._step_counts = counts
        prepare = getattr(self.reference, "prepare", None)
        if prepare is not None and self.configured_weight > 0:
            prepare(batch_samples)  # the step's cached references: one wait for the device, not two per micro-batch
        return batch_samples, num_items

    def anchor_term(self, model, device) -> torch.Tensor | None:
        """The anchored term of this micro-batch (see anchors.py), pre-divided by the step's micro-batch count
        (the loss is scaled for accumulation here); each process averages its own anchors and DDP averages
        the processes."""
        anchors = getattr(self, "anchors", None)
        if anchors is None:
            return None
        micro = getattr(self, "_micro", 0)
        self._micro = micro + 1
        chosen = anchors.sample(self.state.global_step, micro, self.args.process_index)
        term = anchors.term(model, chosen, device)
        self.check_term(term, "anchored regularizer", "train")
        self._safety_metrics["train"]["anchor"].append(term.detach())
        return anchors.weight * term / max(1, getattr(self, "current_gradient_accumulation_steps", 1))

    def _kl_ratio(self, batch: dict, training: bool) -> torch.Tensor:
        """(B, T) d loss / d kl_t over d loss / d nll_t, as compute_loss combines them: CE = NLL sum / tokens,
        reg = weighted KL sum / total weight (the step's counts in training), loss = CE + lambda * reg. The head
        then projects both gradients onto the hidden state in one product; its backward checks this ratio."""
        weights = self._weights(batch)  # (B, T)
        if training and self._step_counts is not None:
            tokens, total = self._step_counts[0], self._step_counts[2]
        else:
            tokens, total = (batch["labels"][:, 1:] != -100).sum(), weights.sum()
        # lambda now: a controller moves it between optimizer steps only, so the backward sees the same value
        return self.reg_weight() * weights * tokens.clamp_min(1) / total.clamp_min(torch.finfo(torch.float32).tiny)

    def regularize(
        self, model, policy: torch.Tensor, batch: dict, mode: str, step_wide: bool = True, reference=None
    ) -> torch.Tensor:
        """The regularizer term of this micro-batch, normalised over the optimizer step's sequences (the sum of
        the terms of a step is the mean over its sequences; for PACT, over its weighted positions), or over this
        micro-batch's when `step_wide` is False
        (for a host whose cross-entropy is a micro-batch mean that the Trainer divides by the accumulation steps).
        `policy` (B, T, K); `batch` with attention_mask, labels and what the reference reads (example_idx or the
        input ids). `reference`: the batch's reference when the caller read it already (a term the head computes)."""
        weights = self._weights(batch)  # (B, T)
        if reference is None:
            reference = self.reference(model, batch)  # (B, T, K); pact: (B, T, 2K); see the entry's `reference`
        per_seq = self.regularizer(policy, reference, weights)  # (B,)
        if self.normalization == "positions":
            which, local = 2, weights.sum().clamp_min(torch.finfo(torch.float32).tiny)
        else:
            which, local = 1, (weights.sum(dim=1) > 0).sum().clamp_min(1)
        step = step_wide and mode == "train" and self._step_counts is not None
        total = self._step_counts[which].clamp_min(torch.finfo(torch.float32).tiny) if step else local
        reg = per_seq.sum() / total
        self.check_term(reg, "safety-token regularizer" if self.entry.reads == "safety" else self.entry.name, mode)
        self._safety_metrics[mode]["reg"].append((per_seq.sum() / local).detach())
        return reg

    def reg_weight(self, term: torch.Tensor | None = None) -> float:
        """lambda now: the configured reg_weight, or a controller's (logitguard.controllers: str_budget,
        safety_target) when one steers it; `term`, this micro-batch's regularizer, is shown to the controller."""
        controller = getattr(self, "lambda_controller", None)
        if controller is None:
            return self.configured_weight
        if term is not None:
            controller.observe(term)
        return controller.weight

    def log(self, logs: dict, start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        keys = sorted(k for k, values in self._safety_metrics[mode].items() if values)  # the same on every process
        if keys:
            means = torch.stack([torch.stack(self._safety_metrics[mode][k]).float().mean() for k in keys])
            # every process logs (the Trainer calls log on all of them): the mean over processes, as the Trainer's
            # own loss is, and as the budget controller sees reg, not the main process's share alone
            means = self.accelerator.reduce(means, reduction="mean")
            logs.update({prefix + k: v for k, v in zip(keys, means.tolist())})
        if mode == "train":
            logs["lambda"] = self.reg_weight()
            controller = getattr(self, "lambda_controller", None)
            logs.update(controller.logs() if controller is not None else {})  # e.g. the budget's running reg
        self._safety_metrics[mode].clear()
        super().log(logs, start_time)


class SafetyTrainer(SafetyRegularization, Trainer):
    loss_is_scaled_for_ga = True  # see module docstring: we normalise over the whole step ourselves

    def needs_step_counts(self) -> bool:
        return True  # its cross-entropy is the step's token sum over the step's token count, regularizer or not

    def __init__(
        self,
        *args,
        safety_ids: list[int],
        reference,
        reg_weight: float | None = None,
        regularizer: str = "str",
        temperature: float = 2.0,
        positions: str = "all",
        first_response_tokens: int = 0,
        first_response_weight: float = 1.0,
        chunked_ce: bool = True,
        anchors=None,
        regularizer_kwargs: dict | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.anchors = anchors  # anchors.Anchors: the anchored regularizer, or None
        # example_idx must reach compute_loss: Trainer would drop it as an unused model input
        self.args.remove_unused_columns = False
        self.chunked_ce = chunked_ce
        self.setup_safety(
            safety_ids, reference, reg_weight, regularizer, temperature, positions, first_response_tokens,
            first_response_weight, regularizer_kwargs,
        )  # fmt: skip

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        example_idx = inputs.pop("example_idx", None)
        training = model.training
        need_reg = training and self.configured_weight > 0
        reads = self.entry.reads if need_reg else None  # what the head's forward must yield for the term
        ids = self.safety_ids_on(labels.device) if reads == "safety" else None
        batch = {**inputs, "labels": labels}
        if example_idx is not None:
            batch["example_idx"] = example_idx
        # the top-k KL is computed inside the head's forward, so its reference is read before it
        reference = self.reference(model, batch) if reads == "topk_kl" else None
        # Full (B, T, V) logits only where something needs them: the paper's gather, metrics on eval predictions
        full = (
            not self.chunked_ce
            or (need_reg and self.reference.policy_from_full_logits)
            or (not training and self.compute_metrics is not None)
        )
        ratio = self._kl_ratio(batch, training) if reads == "topk_kl" else None
        with head_tap(model, ids, labels, full_logits=full, per_token=reads == "label_logp",
                      kl_reference=reference, kl_ratio=ratio) as tap:  # fmt: skip
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        ce_sum, local_tokens = tap["ce_sum"], tap["ce_tokens"]
        mode = "train" if training else "eval"
        if training and self._step_counts is not None:
            tokens, scale = self._step_counts[0], self.accelerator.num_processes
        else:
            tokens, scale = local_tokens, 1
        ce = ce_sum / tokens.clamp_min(1)
        self.check_term(ce, "cross-entropy", mode)
        loss = ce
        self._safety_metrics[mode]["ce"].append((ce_sum / local_tokens.clamp_min(1)).detach())
        if need_reg:
            # (B, T, K) safety logits | (B, T) label log-probs | (B, T) per-position top-k KL
            policy = tap["safety"] if reads == "safety" else tap["kl"] if reads == "topk_kl" else -tap["nll"]
            reg = self.regularize(model, policy, batch, mode, reference=reference)
            # the one place lambda meets the regularizer (a controller's, when one steers it); an objective that
            # replaces cross-entropy is the loss itself (lambda > 0: on)
            loss = reg if self.entry.replaces_ce else loss + self.reg_weight(reg) * reg
        loss = loss * scale
        if training:
            anchored = self.anchor_term(model, labels.device)
            loss = loss + anchored if anchored is not None else loss
        return (loss, outputs) if return_outputs else loss


class STRTrainer(SafetyTrainer):
    """The old name of SafetyTrainer (it trains any regularizer, not only STR), kept for one release; it takes the
    old `str_weight` keyword too. See logitguard.deprecated."""

    def __init__(self, *args, **kwargs):
        warn("STRTrainer", "SafetyTrainer")
        super().__init__(*args, **renamed_keys(kwargs, "STRTrainer"))
