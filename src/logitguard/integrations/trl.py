"""Safety token regularization inside TRL's SFTTrainer: a drop-in for an existing TRL script.

    from logitguard.integrations.trl import SafetySFTConfig as SFTConfig, SafetySFTTrainer as SFTTrainer

and the script gains STR (keys: safety_words, reg_weight, regularizer, positions, reference, ...), keeping TRL's
dataset formats, `assistant_only_loss` / `completion_only_loss`, `peft_config`, loss types and logging.

How it fits TRL 1.16:
- TRL computes the cross-entropy (its chunked "fused LM head": `outputs.logits` is None, for every loss type);
  the K safety logits come from the backbone's final hidden state and the K head rows, taken in a forward hook
  on the backbone while the model's forward runs (ZeRO-3: gathered as TRL gathers the head for its own loss).
- The reference cache is built once TRL has tokenized the dataset, from the model with its adapter disabled
  (the aligned model for LoRA; for full fine-tuning, before the first step). Batches from TRL's collator carry
  no example index, so rows are matched to cached examples by their token ids (`KeyedReference`).
- Packing and padding-free batches are refused when the regularizer is on: the cache matches whole examples
  and STR's positions and per-sequence mean need one example per row. Use packing=False.
- Every registered regularizer works here (logitguard.regularizers; the entry says what the head must yield and
  what reference to build): `constrained_sft` replaces TRL's loss with its own, computed from the per-token
  log-probs of TRL's fused head; `kl` computes its top-k KL from the backbone's final hidden state in chunks of
  positions (no B x T x V logits); PACT's response-only reference uses the `labels` TRL builds. Anchored
  regularization (anchor_prompts) adds its term as in `logitguard train`.
- Normalisation: TRL divides the summed NLL by the step's token count; the regularizer is divided by the step's
  sequence count, so gradient accumulation and padding leave both unchanged (tested).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import trl
from packaging.version import Version
from trl import SFTConfig, SFTTrainer

from ..cache import build_reference_cache
from ..config import (
    AnchorSettings,
    ControllerSettings,
    MonitorSettings,
    SafetySettings,
    check_anchor_settings,
    check_controller_settings,
    check_monitor_settings,
    check_safety_settings,
)
from ..controllers import steer
from ..deprecated import renamed_keys, warn
from ..errors import ConfigError, LogitguardError
from ..keyed import KeyedReference
from ..logit_transform import logit_transform
from ..models import whole_model
from ..reference import head_supports_rows, logits_from_hidden, unwrap
from ..regularizers import RegularizerSettings
from ..regularizers import get as get_regularizer
from ..trainer import SafetyRegularization

# This module reaches into TRL's internals (its fused LM head, `maybe_gather_lm_head_ctx`, how SFTTrainer scales its
# loss), which change between releases: under another TRL a run would fail at its first step, after the cache build.
SUPPORTED_TRL = "1.16"


class TRLVersionError(LogitguardError, ImportError):
    """The installed TRL is not the release this integration is written against."""


if Version(trl.__version__).release[:2] != Version(SUPPORTED_TRL).release:
    raise TRLVersionError(
        f"logitguard.integrations.trl supports TRL {SUPPORTED_TRL} (it relies on TRL's internals), but trl "
        f"{trl.__version__} is installed; pip install 'trl=={SUPPORTED_TRL}.*'"
    )

# PEFT initialisations that rewrite the base weights (peft/tuners/lora/layer.py: PiSSA's and CorDA's residual, OLoRA's
# QR, LoftQ's quantised residual, LoRA-GA's W - s BA): "adapter disabled" is then not the aligned model. EVA, MiCA and
# orthogonal inits only set the adapter's own matrices.
_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _rewriting_init(model, peft_config) -> str | None:
    """The base-rewriting init_lora_weights of the adapter to be attached (peft_config) or already attached (a
    PeftModel passed in), or None."""
    configs = [peft_config] + list(getattr(model, "peft_config", {}).values())
    for config in configs:
        init = getattr(config, "init_lora_weights", True)
        if isinstance(init, str) and any(
            init.lower() == name or init.lower().startswith(name + "_niter_") for name in _REWRITING_INITS
        ):
            return init
    return None


@dataclass
class SafetySFTConfig(SFTConfig, ControllerSettings, MonitorSettings, RegularizerSettings, AnchorSettings,
                      SafetySettings):  # fmt: skip
    """TRL's SFTConfig plus logitguard's safety keys (every SFTConfig / TrainingArguments field still works); each
    regularizer's own keys (pact_*, csft_*, kl_topk), the anchors', the safety monitor's (monitor_*), the lambda
    controllers' (str_budget, safety_target*) and the safety keys come from the dataclasses TrainConfig uses: each
    declared once, with one help text."""

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.safety_words, str):
            self.safety_words = [w.strip() for w in self.safety_words.split(",") if w.strip()]
        check_safety_settings(self, references=("cache", "online"))
        check_anchor_settings(self)
        check_monitor_settings(self)
        check_controller_settings(self)
        entry = get_regularizer(self.regularizer)
        if self.reg_weight > 0 and entry.replaces_ce and self.loss_type != "nll":
            raise ConfigError(f"regularizer {self.regularizer} replaces the SFT loss; loss_type {self.loss_type!r} "
                              "would be dropped: use loss_type nll")  # fmt: skip
        if self.reg_weight > 0 and entry.reads == "label_logp" and self.label_smoothing_factor > 0:
            # TRL's loss then comes from another forward, whose log-probs carry no gradient to this objective
            raise ConfigError(f"regularizer {self.regularizer} reads the per-token log-probs of TRL's fused LM head, "
                              "which label smoothing bypasses: set label_smoothing_factor 0")  # fmt: skip
        if (self.reg_weight > 0 or self.anchor_prompts) and (self.packing or self.padding_free):
            raise ConfigError(
                "packing / padding_free: logitguard's regularizer needs one example per row (its reference cache "
                "matches whole examples, and STR averages per sequence); set packing=False and padding_free=False"
            )


class SafetySFTTrainer(SafetyRegularization, SFTTrainer):
    """TRL's SFTTrainer with CE + lambda * regularizer(safety-token logits)."""

    def __init__(self, model, args: SafetySFTConfig | None = None, *rest, **kwargs):
        if not isinstance(args, SafetySFTConfig):  # SFTTrainer would make a plain SFTConfig, without the safety keys
            raise ConfigError("SafetySFTTrainer needs args=SafetySFTConfig(...) (logitguard.integrations.trl)")
        uses_reference = args.reg_weight > 0 or bool(args.anchor_prompts)
        given = inspect.signature(SFTTrainer.__init__).bind_partial(self, model, args, *rest, **kwargs).arguments
        if uses_reference and (init := _rewriting_init(model, given.get("peft_config"))) is not None:
            raise ConfigError(
                f"init_lora_weights={init!r} rewrites the base weights, so the adapter-disabled model is not the "
                "aligned one; build the reference first with `logitguard train` (method pissa), or use a plain init"
            )
        super().__init__(model, args, *rest, **kwargs)
        from ..train import resolve_tokens

        if self.args.reg_weight > 0 and not head_supports_rows(self.model):
            raise ConfigError("the output head is not a plain linear map (an adapter on lm_head); "
                              "use logitguard's own trainer, which falls back to full logits")  # fmt: skip
        self.safety_tokens = resolve_tokens(self.args, self.processing_class)
        entry = get_regularizer(self.args.regularizer)
        if self.args.reg_weight > 0:
            _check_head_paths(self.model, entry, getattr(self, "compute_loss_func", None))
            self._check_response_labels(entry)
        if self.args.reg_weight > 0 and len(self.safety_tokens) < entry.min_tokens:
            raise ConfigError(f"the {entry.name} regularizer compares distributions over the safety tokens: it "
                              "needs >= 2")  # fmt: skip
        reference = self._make_reference(entry) if self.args.reg_weight > 0 else None
        self.setup_safety(
            list(self.safety_tokens.ids), reference, self.args.reg_weight, self.args.regularizer,
            self.args.temperature, self.args.positions, self.args.first_response_tokens,
            self.args.first_response_weight, entry.kwargs(self.args, self.safety_tokens) or None,
        )  # fmt: skip
        self.anchors = self._make_anchors() if self.args.anchor_prompts else None
        # the safety monitor (monitor_harmful) and a lambda controller (str_budget, safety_target), as in `logitguard
        # train`: lambda is then the controller's (reg_weight() below)
        self.safety_monitor, _ = steer(self.args, self.processing_class, self)

    def _check_response_labels(self, entry) -> None:
        """A term on the answer's tokens (PACT, constrained SFT, kl; positions "response", first_response_tokens) finds
        them through the labels (-100 off the answer). Decided from a batch of the first rows as the collator builds
        it for training, not from the flags: TRL labels every token of conversational data unless assistant_only_loss
        is set, pre-tokenized data brings its own labels, and vision or unprepared data is labelled by the collator;
        with none masked, the template's tokens would count as the answer's (constrained SFT's first-token betas
        among them). Padding does not count."""
        on_answer = (entry.positions or self.args.positions) == "response" or self.args.first_response_tokens > 0
        rows = list(itertools.islice(iter(self.train_dataset), 8)) if on_answer else []
        if not rows:
            return
        # copies (a collator may pop keys from the rows it is given), through the same column filter as training
        collate = self._get_collator_with_removed_columns(self.data_collator, description="training")
        batch = collate([dict(row) if isinstance(row, Mapping) else row for row in rows])
        if "labels" not in batch:
            raise ConfigError(
                f"regularizer {entry.name} scores the answer's tokens, found through the labels, but the data "
                "collator's batches carry none: use TRL's collator, or one that returns labels (-100 off the answer)"
            )
        labels = batch["labels"]
        real = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(labels).bool()
        if not ((labels == -100) & real).any():
            raise ConfigError(
                f"regularizer {entry.name} scores the answer's tokens, but the first {len(rows)} training rows label "
                "every token (prompt and chat template too): set assistant_only_loss=True for conversational data, "
                "train on prompt-completion data (completion_only_loss), or give labels with -100 off the answer"
            )

    def _make_anchors(self):
        """The anchored regularizer's anchors, from the aligned model (the adapter disabled while they are made)."""
        from ..train import make_anchors

        peft = hasattr(self.model, "peft_config")
        self._place_for_cache()
        with self.model.disable_adapter() if peft else contextlib.nullcontext(), whole_model():
            return make_anchors(self.args, self.model, self.processing_class, self.safety_tokens)

    def _make_reference(self, entry):
        ids = list(self.safety_tokens.ids)
        peft = hasattr(self.model, "peft_config")
        if self.args.reference == "online":
            return entry.online(ids, self.processing_class, "lora" if peft else "full", self.args)
        if not hasattr(self.train_dataset, "__len__"):  # a streamed (iterable) dataset would be read to its end here
            raise ConfigError(
                "the reference cache is built from the whole training set, which a streamed dataset does not hold: "
                "set reference='online', or load the dataset without streaming"
            )
        examples = [
            {
                "input_ids": list(row["input_ids"]),
                "attention_mask": [1] * len(row["input_ids"]),
                "labels": list(row["labels"]) if "labels" in row else list(row["input_ids"]),
            }
            for row in self.train_dataset
        ]  # fmt: skip  (TRL's labels: -100 off the completion / assistant turns; PACT's response spans)
        self._place_for_cache()
        aligned = self.model.get_base_model() if peft else self.model
        adapter_off = self.model.disable_adapter() if peft else contextlib.nullcontext()
        with adapter_off, whole_model():
            reference = entry.cached(
                aligned,
                self.processing_class,
                examples,
                ids,
                self.args,
                builder=build_reference_cache,
                cache_root=Path(self.args.cache_dir) / "reference",
                max_length=self.args.max_length or 0,
                dtype=self.args.reference_dtype,
                batch_size=self.args.per_device_train_batch_size,
                folder=self.args.reference_cache,
                progress=not self.args.disable_tqdm,
                aligned_adapter_disabled=peft,
            )
        return KeyedReference(reference, examples)

    def _place_for_cache(self) -> None:
        """The cache's forward runs on the device this process trains on. The Trainer has put the model there
        already, except under FSDP and DeepSpeed, whose wrappers move it when they are prepared: the model is still
        where it was loaded (the CPU: hours for an 8B model), so it goes to args.device now, where they would take
        it anyway. A bitsandbytes model was placed while it loaded, and one spread over GPUs stays spread."""
        if self.place_model_on_device or self.is_model_parallel or getattr(self.model, "is_quantized", False):
            return
        self.model.to(self.args.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        step_wide = num_items_in_batch is not None  # TRL's CE is then a step-wide sum / token count
        if mode == "eval" or self.configured_weight == 0:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return self._with_anchors(model, loss, mode, step_wide, return_outputs)
        reads = self.entry.reads  # what the forward must yield for the term (registry entry)
        batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels")}
        reference = self.reference(model, batch) if reads == "topk_kl" else None  # read before the forward
        ids = self.safety_ids_on(inputs["input_ids"].device) if reads == "safety" else None
        with _backbone_terms(model, ids, inputs["labels"], reference, label_logp=reads == "label_logp") as box:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        scale = self.accelerator.num_processes if step_wide else 1  # DDP averages gradients across processes
        # TRL's loss: its CE times (processes // tensor-parallel size) where it averages tokens across devices, plus a
        # MoE model's weighted router loss over the accumulation steps (an objective that replaces CE keeps that one)
        trl_factor = self.accelerator.num_processes // self.get_tp_size() if step_wide and (
            self.args.average_tokens_across_devices) else 1  # fmt: skip
        aux = 0.0
        if getattr(self, "aux_loss_enabled", False) and box.get("aux_loss") is not None:
            steps = self.current_gradient_accumulation_steps if step_wide else 1
            aux = self.router_aux_loss_coef * box["aux_loss"] / steps
        if reads == "label_logp" and "label_logp" not in box:
            raise ConfigError(f"regularizer {self.entry.name} reads the per-token log-probs of TRL's fused LM head, "
                              "which label smoothing and compute_loss_func bypass; use neither")  # fmt: skip
        policy = box["safety"] if reads == "safety" else box["kl"] if reads == "topk_kl" else box["label_logp"]
        reg = self.regularize(model, policy, batch, mode, step_wide=step_wide, reference=reference)
        local_tokens = (inputs["labels"][:, 1:] != -100).sum().clamp_min(1)
        ce = (loss - aux).detach() / trl_factor * (num_items_in_batch / local_tokens if step_wide else 1)
        self._safety_metrics[mode]["ce"].append(ce)
        # lambda weighs the term; an objective that replaces cross-entropy is the loss itself (lambda > 0: on). A
        # controller is shown the term as a share of the step's mean: a micro-batch mean is one of the accumulation
        # steps' (and of the processes', whose gradients DDP averages)
        parts = max(1, self.current_gradient_accumulation_steps) * self.accelerator.num_processes
        shown = reg if step_wide else reg / parts
        loss = reg * scale + aux if self.entry.replaces_ce else loss + self.reg_weight(shown) * reg * scale
        return self._with_anchors(model, (loss, outputs) if return_outputs else loss, mode, step_wide, return_outputs)

    def _with_anchors(self, model, result, mode: str, step_wide: bool, return_outputs: bool):
        """The anchored term added in training (anchor_term divides by the accumulation steps, which the Trainer
        does itself when TRL's loss is a micro-batch mean)."""
        if mode != "train" or self.anchors is None:
            return result
        loss, outputs = result if return_outputs else (result, None)
        anchored = self.anchor_term(model, loss.device)
        loss = loss + anchored * (1 if step_wide else max(1, self.current_gradient_accumulation_steps))
        return (loss, outputs) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            self.safety_tokens.save(Path(output_dir or self.args.output_dir) / "safety_tokens.json")


@dataclass
class STRSFTConfig(SafetySFTConfig):
    """The old name of SafetySFTConfig, kept for one release; it takes the old `str_weight` key too (also as a TRL
    script flag). See logitguard.deprecated."""

    str_weight: float | None = field(default=None, metadata={"help": "deprecated: use reg_weight"})

    def __post_init__(self):
        warn("STRSFTConfig", "SafetySFTConfig")
        if self.str_weight is not None:
            default = next(f.default for f in dataclasses.fields(SafetySFTConfig) if f.name == "reg_weight")
            given = {"reg_weight": self.reg_weight} if self.reg_weight != default else {}
            self.reg_weight = renamed_keys({"str_weight": self.str_weight, **given}, "STRSFTConfig")["reg_weight"]
            self.str_weight = None  # one value, under its name now: replace() and to_dict() carry reg_weight alone
        super().__post_init__()


class STRSFTTrainer(SafetySFTTrainer):
    """The old name of SafetySFTTrainer, kept for one release. See logitguard.deprecated."""

    def __init__(self, *args, **kwargs):
        warn("STRSFTTrainer", "SafetySFTTrainer")
        super().__init__(*args, **kwargs)


def _check_head_paths(model, entry, compute_loss_func) -> None:
    """What the TRL path computes from the hidden state must carry the term's gradient. The top-k KL is projected
    onto the hidden state only (head_terms.chunked_row_terms): a trained output head (full fine-tuning) would get
    cross-entropy's gradient and none of the KL's. A compute_loss_func (given by keyword or position) takes the loss
    past TRL's fused head, whose log-probs constrained SFT reads."""
    head = unwrap(model).get_output_embeddings()
    trained = any(getattr(p, "requires_grad", False) for p in (head.weight, getattr(head, "bias", None)))
    if entry.reads == "topk_kl" and trained:
        raise ConfigError(f"regularizer {entry.name} under TRL gives a trained output head no gradient (the KL "
                          "is taken from the hidden state); freeze lm_head (train LoRA on the body) or use "
                          "`logitguard train`, which computes it from full logits when the head trains")  # fmt: skip
    if entry.reads == "label_logp" and compute_loss_func is not None:
        raise ConfigError(f"regularizer {entry.name} reads the per-token log-probs of TRL's fused LM head, which "
                          "compute_loss_func bypasses: leave compute_loss_func unset")  # fmt: skip


@contextlib.contextmanager
def _backbone_terms(model, ids, labels=None, kl_reference=None, label_logp: bool = False):
    """During a forward of `model` (TRL's fused head never calls the head module itself), from the backbone's final
    hidden state and the head's weight: `safety` (B, T, K) logits of the safety ids when `ids` are given; `kl` (B, T)
    the per-position top-k KL to `kl_reference` at the labelled positions (head_terms.py, chunked, differentiable);
    and `label_logp` (B, T) the per-token log-probs TRL's fused head returns (they carry TRL's gradient path)."""
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    from ..reference import _to_grid

    lm = unwrap(model)
    head = lm.get_output_embeddings()
    transform = logit_transform(lm, from_backbone=True)  # soft-cap / scales, as the model's forward applies them
    box: dict[str, torch.Tensor] = {}

    def hook(_module, _args, output):
        if box.get("hidden_seen") and not torch.is_grad_enabled():
            return  # a second, no-grad forward (TRL's metrics pass): keep the one the loss backpropagates through
        box["hidden_seen"] = True
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]  # (B, T, H)
        weight, bias = head.weight, head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 DTensor
            weight, bias = weight.full_tensor(), bias.full_tensor() if bias is not None else None
        with maybe_gather_lm_head_ctx(weight, bias):
            if ids is not None:
                at = ids.to(weight.device)  # device_map="auto" may put the head on another GPU than the batch
                rows, row_bias = weight[at], bias[at] if bias is not None else None
                box["safety"] = logits_from_hidden(hidden, rows, row_bias, transform).to(ids.device)  # (B, T, K)
            if kl_reference is not None:
                from ..head_terms import chunked_row_terms

                mask = labels[:, 1:].to(hidden.device) != -100  # (B, T - 1)
                picked = hidden[:, :-1][mask].to(weight.device)  # (N, H)
                ref = tuple(x[:, :-1][mask.to(x.device)].to(weight.device) for x in kl_reference)
                targets = labels[:, 1:][mask.to(labels.device)].to(weight.device)
                _, kl = chunked_row_terms(picked, weight, bias, targets, ref, transform=transform, nll_grad=False)
                box["kl"] = _to_grid(mask, kl).to(labels.device)

    def lm_hook(_module, _args, _kwargs, output):
        log_probs = getattr(output, "log_probs", None)  # (B, T - 1): position t scores labels[t + 1]
        # only the forward the loss backpropagates through (TRL's second, no-grad one under label smoothing or a
        # compute_loss_func is not it: the objective then finds no log-probs and says why)
        if log_probs is not None and log_probs.requires_grad and "label_logp" not in box:
            box["label_logp"] = torch.nn.functional.pad(log_probs.float(), (0, 1))  # (B, T)
            box["aux_loss"] = getattr(output, "aux_loss", None)  # a MoE model's router loss (output_router_logits)

    # the hidden-state hook gathers a sharded head (FSDP2, ZeRO-3) each forward: only when a term reads it
    handles = [lm.get_decoder().register_forward_hook(hook)] if ids is not None or kl_reference is not None else []
    if label_logp:
        # on the model TRL calls (PEFT's wrappers call the causal LM's `forward` directly, past its hooks)
        handles.append(model.register_forward_hook(lm_hook, with_kwargs=True))
    try:
        yield box
    finally:
        for handle in handles:
            handle.remove()
