"""Safety token regularization inside TRL's SFTTrainer: a drop-in for an existing TRL script.

    from logitguard.integrations.trl import STRSFTConfig as SFTConfig, STRSFTTrainer as SFTTrainer

and the script gains STR (keys: safety_words, str_weight, regularizer, positions, reference, ...), keeping TRL's
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
- Normalisation: TRL divides the summed NLL by the step's token count; the regularizer is divided by the step's
  sequence count, so gradient accumulation and padding leave both unchanged (tested).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import trl
from packaging.version import Version
from trl import SFTConfig, SFTTrainer

from ..cache import CachedReference, build_reference_cache
from ..config import ConfigError, check_safety_settings, default_cache_dir
from ..errors import LogitguardError
from ..keyed import KeyedReference
from ..logit_transform import logit_transform
from ..models import whole_model
from ..reference import OnlineReference, head_supports_rows, logits_from_hidden, unwrap
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

# PEFT initialisations that rewrite the base weights: "adapter disabled" is then not the aligned model.
_REWRITING_INITS = ("pissa", "olora", "corda", "eva", "loftq")


@dataclass
class STRSFTConfig(SFTConfig):
    """TRL's SFTConfig plus logitguard's safety keys (every SFTConfig / TrainingArguments field still works)."""

    safety_words: list[str] = field(default_factory=lambda: ["I"], metadata={"help": "safety words, e.g. I,cannot"})
    token_strategy: str = field(default="first", metadata={"help": "word -> ids: first | all | whole"})
    allow_punctuation: bool = field(default=False, metadata={"help": "allow whitespace/punctuation pieces"})
    token_file: str | None = field(default=None, metadata={"help": "token set JSON (overrides safety_words)"})
    random_tokens: bool = field(default=False, metadata={"help": "control: random tokens of the same count"})
    str_weight: float = field(default=1.0, metadata={"help": "lambda; 0 trains plain SFT"})
    regularizer: str = field(default="str", metadata={"help": "str | restricted_kl (pact: use logitguard train)"})
    temperature: float = field(default=2.0, metadata={"help": "temperature of the restricted_kl regularizer"})
    positions: str = field(default="all", metadata={"help": "all | response"})
    first_response_tokens: int = field(default=0, metadata={"help": "extra weight on the first N response tokens"})
    first_response_weight: float = field(default=1.0, metadata={"help": "weight of those first response tokens"})
    reference: str = field(default="cache", metadata={"help": "cache (built once) | online (a forward per step)"})
    reference_dtype: str = field(default="float32", metadata={"help": "cache storage: float32|float16|bfloat16"})
    reference_cache: str | None = field(default=None, metadata={"help": "explicit cache folder"})
    cache_dir: str = field(default_factory=default_cache_dir, metadata={"help": "root of logitguard's caches"})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.safety_words, str):
            self.safety_words = [w.strip() for w in self.safety_words.split(",") if w.strip()]
        check_safety_settings(self, references=("cache", "online"))
        if self.regularizer == "pact":
            raise ConfigError(
                "regularizer: pact is not wired into the TRL integration yet (its response-only reference needs "
                "the assistant spans, which the reference cache here does not see); use `logitguard train`"
            )
        if self.str_weight > 0 and (self.packing or self.padding_free):
            raise ConfigError(
                "packing / padding_free: logitguard's regularizer needs one example per row (its reference cache "
                "matches whole examples, and STR averages per sequence); set packing=False and padding_free=False"
            )


class STRSFTTrainer(SafetyRegularization, SFTTrainer):
    """TRL's SFTTrainer with CE + lambda * regularizer(safety-token logits)."""

    def __init__(self, model, args: STRSFTConfig | None = None, *rest, **kwargs):
        if args is not None and not isinstance(args, STRSFTConfig):
            raise ConfigError("STRSFTTrainer needs an STRSFTConfig (logitguard.integrations.trl) as args")
        peft_config = kwargs.get("peft_config")
        init = getattr(peft_config, "init_lora_weights", True)
        if isinstance(init, str) and init.split("_")[0].lower() in _REWRITING_INITS:
            raise ConfigError(
                f"init_lora_weights={init!r} rewrites the base weights, so the adapter-disabled model is not the "
                "aligned one; build the reference first with `logitguard train` (method pissa), or use a plain init"
            )
        super().__init__(model, args, *rest, **kwargs)
        from ..train import resolve_tokens

        if self.args.str_weight > 0 and not head_supports_rows(self.model):
            raise ConfigError("the output head is not a plain linear map (an adapter on lm_head); "
                              "use logitguard's own trainer, which falls back to full logits")  # fmt: skip
        self.safety_tokens = resolve_tokens(self.args, self.processing_class)
        reference = self._make_reference() if self.args.str_weight > 0 else None
        self.setup_safety(
            list(self.safety_tokens.ids), reference, self.args.str_weight, self.args.regularizer,
            self.args.temperature, self.args.positions, self.args.first_response_tokens,
            self.args.first_response_weight,
        )  # fmt: skip

    def _make_reference(self):
        ids = list(self.safety_tokens.ids)
        peft = hasattr(self.model, "peft_config")
        if self.args.reference == "online":
            return OnlineReference(ids, "lora" if peft else "full")
        examples = [
            {"input_ids": list(row["input_ids"]), "attention_mask": [1] * len(row["input_ids"])}
            for row in self.train_dataset
        ]
        for ex in examples:
            ex["labels"] = ex["input_ids"]
        self._place_for_cache()
        aligned = self.model.get_base_model() if peft else self.model
        adapter_off = self.model.disable_adapter() if peft else contextlib.nullcontext()
        with adapter_off, whole_model():
            folder = build_reference_cache(
                aligned,
                self.processing_class,
                examples,
                ids,
                cache_root=Path(self.args.cache_dir) / "reference",
                max_length=self.args.max_length or 0,
                dtype=self.args.reference_dtype,
                batch_size=self.args.per_device_train_batch_size,
                folder=self.args.reference_cache,
                progress=not self.args.disable_tqdm,
                aligned_adapter_disabled=peft,
            )
        return KeyedReference(CachedReference(folder, ids), examples)

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
        if mode == "eval" or self.str_weight == 0:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        ids = self.safety_ids_on(inputs["input_ids"].device)
        with _backbone_safety_logits(model, ids) as box:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        step_wide = num_items_in_batch is not None  # TRL's CE is then a step-wide sum / token count
        batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels")}
        scale = self.accelerator.num_processes if step_wide else 1  # DDP averages gradients across processes
        reg = self.regularize(model, box["safety"], batch, mode, step_wide=step_wide)
        local_tokens = (inputs["labels"][:, 1:] != -100).sum().clamp_min(1)
        ce = loss.detach() / scale * (num_items_in_batch / local_tokens if step_wide else 1)
        self._safety_metrics[mode]["ce"].append(ce)
        loss = loss + self.str_weight * reg * scale
        return (loss, outputs) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            self.safety_tokens.save(Path(output_dir or self.args.output_dir) / "safety_tokens.json")


@contextlib.contextmanager
def _backbone_safety_logits(model, ids: torch.Tensor):
    """During a forward of `model`, the (B, T, K) safety logits from the backbone's final hidden state and the K
    head rows, read while the forward runs (TRL's fused head never calls the head module itself)."""
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    lm = unwrap(model)
    head = lm.get_output_embeddings()
    transform = logit_transform(lm, from_backbone=True)  # soft-cap / scales, as the model's forward applies them
    box: dict[str, torch.Tensor] = {}

    def hook(_module, _args, output):
        if "safety" in box and not torch.is_grad_enabled():
            return  # a second, no-grad forward (TRL's metrics pass): keep the one the loss backpropagates through
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]  # (B, T, H)
        weight, bias = head.weight, head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 DTensor
            weight, bias = weight.full_tensor(), bias.full_tensor() if bias is not None else None
        at = ids.to(weight.device)  # device_map="auto" may put the head on another GPU than the batch
        with maybe_gather_lm_head_ctx(weight, bias):
            rows, row_bias = weight[at], bias[at] if bias is not None else None
        box["safety"] = logits_from_hidden(hidden, rows, row_bias, transform).to(ids.device)  # (B, T, K) fp32

    handle = lm.get_decoder().register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()
