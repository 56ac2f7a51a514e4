"""logitguard: keep a chat model safe while it is fine-tuned (safety token regularization, STR)."""

import importlib

# Names are imported when first used: `import logitguard` (and every `logitguard` command, which imports the
# package first) would otherwise import transformers' Trainer, hence PEFT, hence bitsandbytes, whose start-up
# prints a kernel warning on some CPUs, on the way to `logitguard --help`.
_WHERE = {
    "CachedReference": ".cache",
    "build_reference_cache": ".cache",
    "TrainConfig": ".config",
    "load_config": ".config",
    "ChatCollator": ".data",
    "tokenize_conversation": ".data",
    "tokenize_rows": ".data",
    "KeyedReference": ".keyed",
    "REGULARIZERS": ".losses",
    "position_weights": ".losses",
    "str_loss": ".losses",
    "str_per_sequence": ".losses",
    "self_refusal_rows": ".methods.mixing",
    "OnlineReference": ".reference",
    "PaperReference": ".reference",
    "SafetyTokens": ".tokens",
    "SafetyTrainer": ".trainer",
}

__all__ = sorted(_WHERE)
_WHERE["STRTrainer"] = ".trainer"  # the old name of SafetyTrainer, for one release (logitguard.deprecated)
__version__ = "0.2.0"


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value  # imported once
    return value


def __dir__():
    return sorted([*globals(), *_WHERE])
