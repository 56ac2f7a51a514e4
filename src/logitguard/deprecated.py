"""Old names kept for one release, in one place so that the aliases leave together.

`str_weight` was lambda for every regularizer (PACT, KL, constrained SFT: not only STR); it is `reg_weight` now.
`STRTrainer`, `STRSFTTrainer` and `STRSFTConfig` train any regularizer; they are `SafetyTrainer`,
`SafetySFTTrainer` and `SafetySFTConfig`. `logitguard bench` ran experiment files, not the speed benchmarks under
bench/; it is `logitguard experiment`. Each old name still works and warns (FutureWarning: shown to users, not only
to developers).

RENAMED_KEYS outlives the aliases: saved config.yaml files and committed results rows keep the old spelling, and
`spelled_now` reads them (result keys hash the old spelling, result_keys.KEY_SPELLING, so every committed row stays
done).
"""

from __future__ import annotations

import warnings

from .errors import ConfigError

# a setting's old name -> its name now (YAML keys, flags, TRL config fields, trainer keywords)
RENAMED_KEYS = {"str_weight": "reg_weight"}


def spelled_now(values: dict) -> dict:
    """A stored record's keys as they are named now, silently (it was written, not typed: nothing to warn about)."""
    return {RENAMED_KEYS.get(k, k): v for k, v in values.items()}


def warn(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(f"{old} is deprecated: use {new}", FutureWarning, stacklevel=stacklevel)


def renamed_keys(values: dict, source: str = "config") -> dict:
    """`values` with each old key spelled as now (and a warning); an old and a new key together is an error."""
    out = dict(values)
    for old, new in RENAMED_KEYS.items():
        if old not in out:
            continue
        value = out.pop(old)
        if value is None:  # an unset flag
            continue
        if out.get(new) is not None:
            raise ConfigError(f"{source}: {old!r} and {new!r} are the same setting ({old}, its old name); keep {new}")
        warn(old, new)
        out[new] = value
    return out
