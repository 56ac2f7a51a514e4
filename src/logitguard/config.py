"""Typed training configuration: YAML first, command-line overrides second, validated once.

Unknown keys and bad values are errors that name the key. Extra `transformers.TrainingArguments` go
under `trainer:` and are checked against that class's fields.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import adapters
from .anchors import ANCHOR_TERMS
from .deprecated import renamed_keys
from .errors import ConfigError
from .errors import suggest as _suggest  # the name the modules that import it from here use
from .files import write_text_atomic
from .losses import POSITIONS
from .models import DTYPES, METHODS, PRECISIONS, QUANTIZE
from .reference import MODES
from .regularizers import REGISTRY, RegularizerSettings
from .regularizers import get as get_regularizer
from .regularizers import names as regularizer_names
from .tokens import STRATEGIES

# the fields a `columns` mapping may fill (logitguard.data's row schemas)
SCHEMA_FIELDS = ("messages", "instruction", "input", "output", "prompt", "completion")


def default_cache_dir() -> str:
    return str(Path(os.environ.get("LOGITGUARD_CACHE", "~/.cache/logitguard")).expanduser())


@dataclass
class AnchorSettings:
    """The anchored regularizer's keys (anchors.py), shared by TrainConfig and the TRL config."""

    anchor_prompts: str | None = field(
        default=None, metadata={"help": "anchored regularization: harmful prompts the aligned model refuses"}
    )
    anchor_count: int = field(default=64, metadata={"help": "anchors: at most this many prompts"})
    anchors_per_step: int = field(default=2, metadata={"help": "anchors: sequences added to each micro-batch"})
    anchor_weight: float = field(default=1.0, metadata={"help": "anchors: weight of the anchored term"})
    anchor_regularizer: str = field(default="str", metadata={"help": "anchors: str | restricted_kl | kl"})
    anchor_kl_tokens: int = field(default=4, metadata={"help": "anchors: first response positions for kl"})


def check_anchor_settings(cfg) -> None:
    if cfg.anchor_regularizer not in ANCHOR_TERMS:
        raise ConfigError(f"anchor_regularizer: {cfg.anchor_regularizer!r} is not one of {', '.join(ANCHOR_TERMS)}")
    for key in ("anchor_count", "anchors_per_step", "anchor_kl_tokens"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key}: must be >= 1, got {getattr(cfg, key)}")
    if cfg.anchor_weight < 0:
        raise ConfigError(f"anchor_weight: must be >= 0, got {cfg.anchor_weight}")


@dataclass
class SafetySettings:
    """The safety keys `logitguard train` (TrainConfig) and the TRL integration (SafetySFTConfig) share, declared once:
    the safety tokens, the regularizer and its weight, the positions, the reference."""

    safety_words: list[str] = field(default_factory=lambda: ["I"], metadata={"help": "safety words, e.g. I,cannot"})
    token_strategy: str = field(default="first", metadata={"help": f"word -> ids strategy, one of {STRATEGIES}"})
    allow_punctuation: bool = field(
        default=False, metadata={"help": "let whitespace- or punctuation-only pieces be safety tokens"}
    )
    token_file: str | None = field(default=None, metadata={"help": "token set JSON (overrides safety_words)"})
    random_tokens: bool = field(
        default=False, metadata={"help": "control: as many random tokens as the resolved safety set"}
    )
    regularizer: str = field(default="str", metadata={"help": f"one of {sorted(regularizer_names())}"})
    reg_weight: float | None = field(
        default=None,
        metadata={"help": "lambda, the regularizer's weight (was str_weight); 0: the plain method; default: the "
                  "regularizer's own (" + ", ".join(f"{n} {e.default_weight:g}" for n, e in sorted(REGISTRY.items()))
                  + ")"},
    )  # fmt: skip
    positions: str = field(default="all", metadata={"help": f"regularized positions, one of {POSITIONS}"})
    first_response_tokens: int = field(default=0, metadata={"help": "extra weight on the first N response tokens"})
    first_response_weight: float = field(default=1.0, metadata={"help": "weight of those first response tokens"})
    temperature: float = field(default=2.0, metadata={"help": "temperature of pact and restricted_kl"})
    reference: str = field(
        default="cache", metadata={"help": f"reference logits, one of {MODES} (TRL: cache, online)"}
    )
    reference_dtype: str = field(default="float32", metadata={"help": "cache storage: float32|float16|bfloat16"})
    reference_cache: str | None = field(default=None, metadata={"help": "explicit cache folder"})
    cache_dir: str = field(default_factory=default_cache_dir, metadata={"help": "root of logitguard's caches"})


@dataclass
class MonitorSettings:
    """The safety monitor's keys (callbacks.SafetyMonitor: refusal measured on probe prompts while training), shared
    by TrainConfig and the TRL config."""

    monitor_harmful: str | None = field(
        default=None,
        metadata={"help": "safety monitor: held-out harmful prompts file"},
    )
    monitor_benign: str | None = field(
        default=None, metadata={"help": "safety monitor: benign prompts (over-refusal)"}
    )
    monitor_every: int = field(default=50, metadata={"help": "safety monitor: check every N optimizer steps"})
    monitor_keywords: str = field(default="qi2023", metadata={"help": "safety monitor: refusal keyword list"})
    monitor_stop_below: float | None = field(
        default=None, metadata={"help": "safety monitor: stop training when refusal falls below this rate"}
    )
    monitor_save_best: bool = field(
        default=False, metadata={"help": "safety monitor: checkpoint at each new best refusal rate (kept)"}
    )


def check_monitor_settings(cfg) -> None:
    if cfg.monitor_every < 1:
        raise ConfigError(f"monitor_every: must be >= 1, got {cfg.monitor_every}")
    if cfg.monitor_stop_below is not None and not 0 <= cfg.monitor_stop_below <= 1:
        raise ConfigError(f"monitor_stop_below: a refusal rate in [0, 1], got {cfg.monitor_stop_below}")
    if (cfg.monitor_benign or cfg.monitor_stop_below is not None or cfg.monitor_save_best) and not cfg.monitor_harmful:
        raise ConfigError("monitor_*: the safety monitor needs monitor_harmful (a prompts file)")


@dataclass
class ControllerSettings:
    """The lambda controllers' keys (logitguard.controllers), shared by TrainConfig and the TRL config."""

    # docs/controllers.md: lambda starts at reg_weight and moves; off by default, so runs that do not set them keep
    # their meaning (and their results key)
    str_budget: float | None = field(
        default=None, metadata={"help": "constrained training: hold the regularizer (each optimizer step's mean) <= "
                                "this budget (reg's unit) by dual ascent on lambda each optimizer step"},
    )  # fmt: skip
    str_budget_lr: float | None = field(
        default=None, metadata={"help": "str_budget: dual-ascent step size eta (default 0.1 / str_budget)"}
    )
    safety_target: float | None = field(
        default=None, metadata={"help": "closed loop: keep the safety monitor's refusal rate >= this (0..1) by "
                                "scaling lambda at each check (needs monitor_harmful: the probe prompts)"},
    )  # fmt: skip
    safety_target_drop: float | None = field(
        default=None, metadata={"help": "closed loop relative to the aligned model: keep refusal >= the monitor's "
                                "rate before training minus this (e.g. 0.03); instead of safety_target"},
    )  # fmt: skip
    safety_target_up: float = field(default=2.0, metadata={"help": "safety_target: lambda factor below the target"})
    safety_target_down: float = field(
        default=0.9, metadata={"help": "safety_target: lambda factor at or above the target"}
    )
    safety_target_rewind: bool = field(
        default=False, metadata={"help": "safety_target: below it, also return to the last state that met it"}
    )


@dataclass
class TrainConfig(ControllerSettings, MonitorSettings, RegularizerSettings, AnchorSettings, SafetySettings):
    """Every key of `logitguard train`. Each regularizer's own settings (pact_*, csft_*, kl_topk) come from its
    module's settings dataclass (logitguard.regularizers), declared there once; the anchors', the monitor's, the
    lambda controllers' and the safety keys, which the TRL integration shares, from their own dataclasses."""

    model: str = field(default="", metadata={"help": "aligned model: local folder or hub name"})
    gguf_file: str | None = field(
        default=None, metadata={"help": "GGUF model file, converted once to safetensors (then model is unused)"}
    )
    data: str = field(default="", metadata={"help": "training data: .jsonl/.json/.parquet file or hub name"})
    output_dir: str = field(default="runs/train", metadata={"help": "where the adapter, tokens, config go"})
    data_split: str = field(default="train", metadata={"help": "split to use for hub datasets"})
    columns: dict = field(
        default_factory=dict, metadata={"help": "rename columns to the schema, e.g. {prompt: question}"}
    )
    holdout: int = field(default=0, metadata={"help": "rows held out of training (saved to holdout.jsonl)"})
    max_length: int = field(default=512, metadata={"help": "truncate conversations to this many tokens"})
    method: str = field(default="lora", metadata={"help": f"one of {METHODS}"})
    rank: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], metadata={"help": "modules to adapt"}
    )
    reference_model: str | None = field(
        default=None, metadata={"help": "cache the reference from this model instead (continual learning)"}
    )
    epochs: float = field(default=1.0, metadata={"help": "training epochs"})
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    batch_size: int = field(default=4, metadata={"help": "per-device batch size"})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    dtype: str = field(
        default="auto",
        metadata={"help": f"dtype of the frozen weights, one of {list(DTYPES)}; auto: the precision's dtype"},
    )
    precision: str = field(
        default="auto",
        metadata={"help": f"compute precision, one of {PRECISIONS}; bf16/fp16 are mixed (fp16 with a loss scaler); "
                  "auto: bf16 on a GPU that has it, fp16 on other accelerators, fp32 on the CPU"},
    )  # fmt: skip
    quantize: str = field(default="none", metadata={"help": f"QLoRA: load the frozen model in {QUANTIZE}"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    chunked_ce: bool = field(
        default=True, metadata={"help": "cross-entropy in chunks of positions, never the full B x T x V logits"}
    )
    logging_steps: int = field(default=10, metadata={"help": "log every N optimizer steps"})
    save_steps: int = field(default=200, metadata={"help": "checkpoint every N optimizer steps"})
    resume: bool = field(default=True, metadata={"help": "resume from the last checkpoint in output_dir"})
    safety_mix: str | None = field(
        default=None,
        metadata={"help": "safety-data mixing: a file of harmful prompts with refusals, or 'self' (the model's own "
                  "greedy refusals to safety_mix_prompts)"},
    )  # fmt: skip
    safety_mix_prompts: str | None = field(default=None, metadata={"help": "safety_mix self: the prompts file"})
    safety_mix_count: int = field(default=0, metadata={"help": "safety rows to mix (0: see safety_mix_fraction)"})
    safety_mix_fraction: float = field(
        default=0.0, metadata={"help": "share of the mixed training set that is safety rows (neither: all rows)"}
    )
    safety_mix_max_new_tokens: int = field(default=128, metadata={"help": "safety_mix self: tokens per refusal"})
    safety_mix_keywords: str = field(
        default="qi2023", metadata={"help": "safety_mix self: keyword list a kept response must match"}
    )
    salora_safety_data: str | None = field(
        default=None, metadata={"help": "method salora: safety samples (harmful prompts with refusals)"}
    )
    salora_safety_samples: int = field(default=128, metadata={"help": "method salora: safety samples used"})
    salora_safety_rank: int = field(default=32, metadata={"help": "method salora: safety directions r_s"})
    salora_task_samples: int = field(
        default=128, metadata={"help": "method salora: training rows for the task subspace"}
    )
    salora_task_rank: int = field(default=32, metadata={"help": "method salora: task directions"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the hub"})
    trainer: dict = field(default_factory=dict, metadata={"help": "extra transformers.TrainingArguments"})

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        check_safety_settings(self)
        choices = {"method": METHODS, "dtype": tuple(DTYPES), "precision": PRECISIONS, "quantize": QUANTIZE}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}: {getattr(self, key)!r} is not one of {list(allowed)}")
        positive = ("max_length", "rank", "alpha", "batch_size", "grad_accum", "logging_steps", "save_steps")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        for f in dataclasses.fields(self):  # NaN passes every comparison below, and inf is never meant
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name}: must be a finite number, got {value}")
        for key in ("epochs", "learning_rate"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key}: must be > 0, got {getattr(self, key)}")
        if self.reference_model and self.reference != "cache":
            raise ConfigError("reference_model: needs reference: cache (online references come from the model itself)")
        if self.holdout < 0:
            raise ConfigError(f"holdout: must be >= 0, got {self.holdout}")
        for target, source in self.columns.items():
            if target not in SCHEMA_FIELDS or not isinstance(source, str):
                raise ConfigError(f"columns: {target!r}: {source!r} must map one of {SCHEMA_FIELDS} to a column name")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.first_response_tokens < 0 or self.first_response_weight < 0:
            raise ConfigError("first_response_tokens and first_response_weight must be >= 0")
        if self.dtype in ("float16", "bfloat16") and self.precision == "fp32":
            raise ConfigError(
                f"dtype {self.dtype} with precision fp32 would train in pure half precision without autocast or a "
                f"loss scaler; set precision {'fp16' if self.dtype == 'float16' else 'bf16'}, or dtype float32"
            )
        kind = adapters.get(self.method)
        if self.quantize != "none" and not kind.quantizable:
            able = ", ".join(k.name for k in adapters.REGISTRY.values() if k.quantizable)
            raise ConfigError(f"quantize: {self.quantize} trains an adapter on a frozen quantized model; "
                              f"use method {able}, not {self.method}")  # fmt: skip
        check_anchor_settings(self)
        check_monitor_settings(self)
        check_method_settings(self)
        check_controller_settings(self)
        if self.trainer:
            known = trainer_fields()
            for key in self.trainer:
                if key not in known:
                    raise ConfigError(
                        f"trainer.{key}: not a transformers.TrainingArguments field{_suggest(key, known)}"
                    )
                if key in OWN_TRAINER_KEYS:
                    raise ConfigError(f"trainer.{key}: set it as {OWN_TRAINER_KEYS[key]!r} (logitguard's own key)")


def check_method_settings(cfg) -> None:
    """The keys of the baselines in logitguard.methods: safety-data mixing and SaLoRA."""
    if cfg.safety_mix is None:
        for key in ("safety_mix_prompts", "safety_mix_count", "safety_mix_fraction"):
            if getattr(cfg, key):
                raise ConfigError(f"{key}: needs safety_mix (a file of prompts with refusals, or self)")
    elif (cfg.safety_mix == "self") != bool(cfg.safety_mix_prompts):
        raise ConfigError("safety_mix_prompts: give it with safety_mix: self (and only then), to generate refusals to")
    if cfg.safety_mix_count < 0:
        raise ConfigError(f"safety_mix_count: must be >= 0, got {cfg.safety_mix_count}")
    if not 0 <= cfg.safety_mix_fraction < 1:
        raise ConfigError(f"safety_mix_fraction: must be in [0, 1), got {cfg.safety_mix_fraction}")
    if cfg.safety_mix_count and cfg.safety_mix_fraction:
        raise ConfigError("safety_mix_count and safety_mix_fraction: give one, not both")
    if cfg.safety_mix_max_new_tokens < 1:
        raise ConfigError(f"safety_mix_max_new_tokens: must be >= 1, got {cfg.safety_mix_max_new_tokens}")
    from .eval.keyword import REFUSAL_LISTS

    if cfg.safety_mix_keywords not in REFUSAL_LISTS:
        raise ConfigError(f"safety_mix_keywords: {cfg.safety_mix_keywords!r} is not one of {sorted(REFUSAL_LISTS)}")
    for key in ("salora_safety_samples", "salora_safety_rank", "salora_task_samples", "salora_task_rank"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key}: must be >= 1, got {getattr(cfg, key)}")
    adapters.check_settings(cfg)
    why = adapters.get(cfg.method).online_reference_error
    if why and cfg.reg_weight > 0 and cfg.reference != "cache":
        raise ConfigError(
            f"reference {cfg.reference!r} takes the aligned model by disabling the adapter, which is wrong here: "
            f"{why}; use reference cache"
        )


def check_controller_settings(cfg) -> None:
    """The lambda controllers' keys (logitguard.controllers): one controller at most, each with what it needs."""
    if cfg.safety_target is not None and cfg.safety_target_drop is not None:
        raise ConfigError("safety_target and safety_target_drop both set the target: give one, not both")
    target = cfg.safety_target if cfg.safety_target is not None else cfg.safety_target_drop
    if cfg.str_budget is not None and target is not None:
        raise ConfigError("str_budget and safety_target both steer lambda: give one, not both")
    if cfg.str_budget is None and cfg.str_budget_lr is not None:
        raise ConfigError("str_budget_lr: needs str_budget (the dual-ascent step size of the budget's lambda)")
    if cfg.str_budget is not None:
        if not cfg.str_budget > 0:
            raise ConfigError(f"str_budget: must be > 0 (a mean squared logit drift), got {cfg.str_budget}")
        if cfg.str_budget_lr is not None and not cfg.str_budget_lr > 0:
            raise ConfigError(f"str_budget_lr: must be > 0, got {cfg.str_budget_lr}")
    if target is not None:
        if not 0 <= target <= 1:
            name = "safety_target" if cfg.safety_target is not None else "safety_target_drop"
            raise ConfigError(f"{name}: a refusal rate in [0, 1], got {target}")
        if not cfg.monitor_harmful:
            raise ConfigError("safety_target: needs monitor_harmful (the probe prompts it measures refusal on)")
    elif cfg.safety_target_rewind:
        raise ConfigError("safety_target_rewind: needs safety_target (the refusal rate a kept state must meet)")
    if not cfg.safety_target_up > 1:
        raise ConfigError(f"safety_target_up: must be > 1, got {cfg.safety_target_up}")
    if not 0 < cfg.safety_target_down <= 1:
        raise ConfigError(f"safety_target_down: must be in (0, 1], got {cfg.safety_target_down}")
    if (cfg.str_budget is not None or target is not None) and not cfg.reg_weight > 0:
        raise ConfigError("str_budget / safety_target: lambda starts at reg_weight, which must be > 0")
    if (cfg.str_budget is not None or target is not None) and get_regularizer(cfg.regularizer).replaces_ce:
        raise ConfigError(
            f"str_budget / safety_target: regularizer {cfg.regularizer} replaces cross-entropy, so lambda only "
            "switches it on and there is nothing to steer; use a term added to it"
        )


def check_safety_settings(cfg, references: tuple[str, ...] = MODES) -> None:
    """The safety keys shared by logitguard's TrainConfig and the TRL config: choices, signs, a token source."""
    choices = {
        "token_strategy": STRATEGIES,
        "regularizer": regularizer_names(),
        "positions": POSITIONS,
        "reference": references,
        "reference_dtype": ("float32", "float16", "bfloat16"),
    }
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"{key}: {getattr(cfg, key)!r} is not one of {list(allowed)}")
    if not cfg.temperature > 0:
        raise ConfigError(f"temperature: must be > 0, got {cfg.temperature}")
    if cfg.reg_weight is None:  # not given: the term's own default (the config then records the value it ran with)
        cfg.reg_weight = get_regularizer(cfg.regularizer).default_weight
    if not (cfg.reg_weight >= 0 and math.isfinite(cfg.reg_weight)):  # NaN would pass `< 0` and turn the term off
        raise ConfigError(f"reg_weight: must be a finite number >= 0, got {cfg.reg_weight}")
    if not cfg.safety_words and not cfg.token_file:
        raise ConfigError("safety_words: give at least one word, or a token_file")
    for entry in REGISTRY.values():  # every term's own keys
        entry.check_values(cfg)
    get_regularizer(cfg.regularizer).check(cfg)  # the chosen term's settings against the rest


def _coerce(key: str, value, hint):
    """Check / convert one value to the field's type; strings from the command line are parsed."""
    base = hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        if value is None:
            return None
        base = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(base) is list or base is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        return value
    if base is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if base is bool:
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if base in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value) if base is float else int(str(value), 10)
        except ValueError:
            raise ConfigError(
                f"{key}: expected {'a number' if base is float else 'an integer'}, got {value!r}"
            ) from None
        return number
    if not isinstance(value, str | int | float):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return str(value)


# TrainingArguments fields that logitguard spells its own way: a top-level key of either name means one setting.
TRAINER_ALIASES = {
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
}


# TrainingArguments fields that logitguard sets from its own keys; under `trainer:` they would be overridden.
OWN_TRAINER_KEYS = {
    **TRAINER_ALIASES,
    "bf16": "precision",
    "fp16": "precision",
    "gradient_checkpointing": "gradient_checkpointing",
}


def trainer_fields() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


def route_trainer_keys(values: dict, source: str = "config") -> dict:
    """Every transformers.TrainingArguments field is a top-level key too (as in TRL's configs): a key that is not
    logitguard's own goes under `trainer`; `bf16: true` / `fp16: true` set `precision`."""
    own = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {k: v for k, v in values.items() if k in own}
    trainer = dict(out.get("trainer") or {})
    fields = None
    for key, value in values.items():
        if key in own:
            continue
        if key in TRAINER_ALIASES:
            out[TRAINER_ALIASES[key]] = value
            continue
        if key in ("bf16", "fp16"):
            if _coerce(key, value, bool):
                out["precision"] = key
            continue
        fields = fields if fields is not None else trainer_fields()
        if key not in fields:
            raise ConfigError(f"{source}: unknown key {key!r}{_suggest(key, own | fields)}")
        if key in trainer and trainer[key] != value:
            raise ConfigError(f"{source}: {key!r} is set both at the top level and under trainer")
        trainer[key] = value
    if trainer:
        out["trainer"] = trainer
    return out


def coerce_trainer_value(key: str, text: str):
    """A command-line string for a TrainingArguments field, typed as the field (unknown keys stay strings and
    are reported by `route_trainer_keys`)."""
    from transformers import TrainingArguments

    fields = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    if key not in fields:
        return text
    kind = fields[key].type if not isinstance(fields[key].type, str) else None
    if kind is None:
        kind = typing.get_type_hints(TrainingArguments).get(key, str)
    args = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
    for base in args:
        if base is bool:
            return _coerce(key, text, bool)
        if base in (int, float):
            return _coerce(key, text, base)
        if base is dict or typing.get_origin(base) is dict:
            try:
                import json

                return json.loads(text)
            except ValueError:
                raise ConfigError(f"{key}: expected JSON, got {text!r}") from None
        if base is list or typing.get_origin(base) is list:
            return [v.strip() for v in text.split(",") if v.strip()]
    return text


def build_config(values: dict, source: str = "config") -> TrainConfig:
    """TrainConfig from a mapping, rejecting unknown keys with a suggestion."""
    hints = typing.get_type_hints(TrainConfig)
    clean = {}
    for key, value in route_trainer_keys(renamed_keys(values, source), source).items():
        clean[key] = _coerce(key, value, hints[key])
    if clean.get("gguf_file") and not clean.get("model"):
        clean["model"] = clean["gguf_file"]
    for key in ("model", "data"):
        if not clean.get(key):
            raise ConfigError(f"{key}: required (set it in the YAML file or with --{key.replace('_', '-')})")
    for key in ("cache_dir", "output_dir"):  # "~/..." as a shell reads it, not a folder named "~" in the working one
        if isinstance(clean.get(key), str):
            clean[key] = str(Path(clean[key]).expanduser())
    return TrainConfig(**clean)


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """YAML file (optional) merged with overrides (later wins), validated once."""
    values: dict = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        values.update(renamed_keys(loaded or {}, str(path)))  # old names first: a flag of the new name wins
    values.update(renamed_keys({k: v for k, v in (overrides or {}).items() if v is not None}, "command line"))
    return build_config(values, source=str(path) if path else "config")


def ordered_fields(cls=None) -> list[dataclasses.Field]:
    """TrainConfig's fields in reading order: its own first (model, data, ...), then the composed settings
    (safety, anchors, each regularizer's), which dataclass inheritance would otherwise put first."""
    cls = cls or TrainConfig
    own = set(cls.__dict__.get("__annotations__", {}))
    fields = dataclasses.fields(cls)
    return [f for f in fields if f.name in own] + [f for f in fields if f.name not in own]


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    values = dataclasses.asdict(cfg)
    values = {f.name: values[f.name] for f in ordered_fields(type(cfg))}
    write_text_atomic(path, yaml.safe_dump(values, sort_keys=False))
