"""What `method:` names: how the fine-tune's trained weights are made, one registered entry per kind.

The rest of logitguard asks an entry what it needs to know (does the whole model train? does attaching the adapter
change the base weights? may the frozen model be quantized? which PEFT LoRA options?) instead of comparing names.
Adding a kind is one `register(AdapterKind(...))` here and its test. `salora` is a LoRA adapter whose projection and
initialisation `logitguard.methods.salora` computes from data before training; its own settings are checked there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import ConfigError, registered


@dataclass(frozen=True)
class AdapterKind:
    name: str
    help: str
    # every weight trains and no adapter exists: trained weights stay fp32 under half precision, the run's output
    # folder is the whole model, and disabling "the adapter" does not give back the aligned model
    whole_model: bool = False
    # attaching the adapter rewrites the base weights (PiSSA's residual, SaLoRA's projection): with the adapter
    # disabled the model is no longer the aligned one
    rewrites_base: bool = False
    # may train on a frozen 4-bit / 8-bit model (QLoRA)
    quantizable: bool = False
    # saved as a plain LoRA adapter through PEFT's conversion against the adapter's initial state (PiSSA)
    converts_on_save: bool = False
    # PEFT LoraConfig options beyond rank, alpha and targets (lora_dropout here overrides the configured dropout)
    lora_options: dict = field(default_factory=dict)
    # the kind's own config keys (set under another method, they are a mistake) and their check (cfg -> None, or
    # a ConfigError), run with the rest of a TrainConfig's
    own_keys: tuple[str, ...] = ()
    check_settings: Callable | None = None

    @property
    def online_reference_error(self) -> str | None:
        """Why the aligned model cannot be had by disabling the adapter (reference online / paper), or None."""
        if self.whole_model:
            return f"method {self.name!r} has no adapter to disable"
        if self.rewrites_base:
            return f"method {self.name!r} rewrites the base weights"
        return None


REGISTRY: dict[str, AdapterKind] = {}


def check_settings(cfg) -> None:
    """The method's own keys, and no other kind's keys set: a TrainConfig's part of the adapter kinds."""
    kind = get(cfg.method)
    if kind.check_settings is not None:
        kind.check_settings(cfg)
    for other in REGISTRY.values():
        for key in other.own_keys if other is not kind else ():
            if getattr(cfg, key, None):
                raise ConfigError(f"{key}: only used by method {other.name}, not {cfg.method}")


def register(kind: AdapterKind) -> AdapterKind:
    REGISTRY[kind.name] = kind
    return kind


def get(name: str) -> AdapterKind:
    """The registered kind `name`, or a ConfigError naming the choices."""
    return registered(REGISTRY, name, "method")


register(AdapterKind("lora", "a LoRA adapter (PEFT)", quantizable=True))
register(AdapterKind("dora", "a DoRA adapter (PEFT)", quantizable=True, lora_options={"use_dora": True}))
# the adapter starts as W's principal singular directions and W keeps the residual; dropout would perturb that start
register(
    AdapterKind(
        "pissa", "PiSSA: LoRA initialised from W's principal singular directions", rewrites_base=True,
        converts_on_save=True, lora_options={"init_lora_weights": "pissa", "lora_dropout": 0.0},
    )
)  # fmt: skip
register(AdapterKind("full", "full fine-tuning: every weight trains", whole_model=True))


def _check_salora(cfg) -> None:
    if not cfg.salora_safety_data:
        raise ConfigError("salora_safety_data: method salora needs safety samples (harmful prompts with refusals)")


register(
    AdapterKind(
        "salora", "SaLoRA: LoRA under a fixed safety projection, task-informed init (logitguard.methods.salora)",
        rewrites_base=True, lora_options={"lora_dropout": 0.0}, own_keys=("salora_safety_data",),
        check_settings=_check_salora,
    )
)  # fmt: skip
