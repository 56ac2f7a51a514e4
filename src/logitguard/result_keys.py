"""What a results row is keyed on, so that a clone anywhere finds its committed rows done.

A row's `settings` hold paths as the experiment file writes them (`{assets}/x.jsonl`, `{here}/y.json`,
`{toy}/corpus/z.jsonl`, `{toy_demo}/mined_tokens.json`, `{toy_commonsense}`, `{holdout}`, `{run:NAME}`, the model
as `toy` or its GGUF file, or a path as given), never where this machine put them; cache and output folders are
left out. `settings["inputs"]` maps each such path to the identity of what it named when the row ran:

    sha256:<hex>   a file's bytes              tree:<hex>     a folder's files (paths and bytes)
    set:<hex>      a named eval set's files    toy:<folder>   the toy model and corpus (its recipe hash)
    toy:<folder>/demo-<hex>   the demo's files mined from the toy ({toy_demo}; toy/demo_inputs.py)
    holdout:<hex>  rows held out of the data   run:<key>      another run's settings (Safe LoRA's model)
    null           nothing here (a hub name, a file not fetched)

The key is a hash of all of it. A row is done when its settings match and every input that is here has the
recorded identity; an input that is not here (a fresh clone without the fetched real-model assets) is taken
on the record, so finding rows done never needs the assets, and a changed file runs its rows again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from .config import TrainConfig, build_config
from .deprecated import RENAMED_KEYS, spelled_now
from .experiment import EvalSpec

# TrainConfig and EvalSpec fields that name files, folders or models (comma lists in the eval ones).
TRAIN_PATHS = ("model", "gguf_file", "data", "token_file", "reference_model", "anchor_prompts", "monitor_harmful",
               "monitor_benign", "safety_mix", "safety_mix_prompts", "salora_safety_data")  # fmt: skip
EVAL_PATHS = ("harmful", "benign", "borderline", "loss_data", "exact_match", "commonsense", "utility", "judge")
NOT_PATHS = {"self"}  # safety_mix: self (the model's own refusals)
TOY_MODELS = ("toy", "toy-quick")

# Settings that change how a run is logged or checkpointed, not what it computes: left out of the key.
NOT_RESULTS = {"save_steps", "logging_steps", "resume"}
TRAINER_NOT_RESULTS = {"save_strategy", "save_total_limit", "disable_tqdm", "logging_strategy", "logging_dir",
                       "report_to", "run_name", "project", "trackio_space_id", "push_to_hub", "hub_model_id",
                       "hub_strategy", "hub_private_repo", "hub_token"}  # fmt: skip
# A renamed setting is hashed under its old name (logitguard.deprecated): the rows computed before the rename keep
# their keys, so a clone finds them done.
KEY_SPELLING = {new: old for old, new in RENAMED_KEYS.items()}
# Defaults as the keys know them: a default changed later keeps its old value here, so that the rows computed at the
# old default keep their keys, and a row at the new default is never taken for one at the old (both would otherwise
# hash without the setting). reg_weight was 1.0 for every regularizer until STR's became 0.3 (regularizers/).
KEY_DEFAULTS = {TrainConfig: {"reg_weight": 1.0}}
# Where, not what: never in a row's settings.
WHERE = ("output_dir", "cache_dir", "reference_cache", "resume")


def _non_default(values: dict, cls) -> dict:
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory() for f in
                dataclasses.fields(cls)}  # fmt: skip
    defaults.update(KEY_DEFAULTS.get(cls, {}))
    return {k: v for k, v in values.items() if k not in defaults or defaults[k] != v}


def result_key(settings: dict) -> str:
    """Hash of the settings, with fields at their default left out: a field added to TrainConfig or EvalSpec
    later (with a default) does not invalidate the rows already computed."""
    settings = dict(settings)
    for name, cls in (("train", TrainConfig), ("of", TrainConfig), ("eval", EvalSpec)):
        if isinstance(settings.get(name), dict):
            settings[name] = _normal(settings[name], cls)
    if isinstance(settings.get("stages"), list):  # continual learning: each stage is a training config too
        settings["stages"] = [_normal(s, TrainConfig) if isinstance(s, dict) else s for s in settings["stages"]]
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _normal(values: dict, cls) -> dict:
    values = spelled_now({k: v for k, v in values.items() if k not in NOT_RESULTS})  # a row's old names
    if isinstance(values.get("trainer"), dict):
        values["trainer"] = {k: v for k, v in values["trainer"].items() if k not in TRAINER_NOT_RESULTS}
    return {KEY_SPELLING.get(k, k): v for k, v in _non_default(values, cls).items()}


def setting(values: dict, name: str, default=None):
    """A row's setting by its name now, in rows written before it was renamed too (`str_weight` for reg_weight)."""
    if name in values:
        return values[name]
    return values.get(KEY_SPELLING.get(name, name), default)


def shape_key(settings: dict) -> str:
    """The key of the settings without their inputs' identities: rows that may match, before the files are checked."""
    return result_key({k: v for k, v in settings.items() if k != "inputs"})


def train_settings(cfg: TrainConfig) -> dict:
    values = dataclasses.asdict(cfg)
    for key in WHERE:
        values.pop(key)
    return values


def input_paths(settings: dict) -> list[str]:
    """Every path a row's settings name (as written), once each, sorted."""
    found = [settings["model"]] if isinstance(settings.get("model"), str) else []
    for values in (settings.get("train"), settings.get("of"), *(settings.get("stages") or [])):
        if isinstance(values, dict):
            found += [values[k] for k in TRAIN_PATHS if isinstance(values.get(k), str)]
    spec = settings.get("eval")
    if isinstance(spec, dict):
        for name in EVAL_PATHS:
            value = spec.get(name)
            if not isinstance(value, str):
                continue
            if name == "judge":  # llama-guard:PATH names a model; endpoint:URL names no file
                found += [value.split(":", 1)[1]] if value.startswith("llama-guard:") else []
            else:
                found += [p.strip() for p in value.split(",")]
    if isinstance(settings.get("safelora"), dict) and isinstance(settings["safelora"].get("unaligned"), str):
        found.append(settings["safelora"]["unaligned"])
    return sorted({p for p in found if p and p not in NOT_PATHS})


def holdout_identity(train: dict, identity) -> str | None:
    """The held-out rows are drawn from the training data with a fixed seed: the data's identity and how many."""
    from .train import HOLDOUT_SEED

    cfg = build_config({"model": "m", **train})
    data = identity(cfg.data)
    if data is None:
        return None
    what = {"data": data, "split": cfg.data_split, "columns": cfg.columns, "n": cfg.holdout, "seed": HOLDOUT_SEED}
    return "holdout:" + hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def set_identity(spec: str, assets: str | Path, hashes) -> str | None:
    """A named eval set (`advbench:20`, read from the assets folder): the paths and bytes of its files."""
    from .data import DataError
    from .eval.datasets import parse_spec, set_files

    try:
        files = set_files(parse_spec(spec)[0], assets)
    except DataError:
        return None  # not fetched here
    lines = "".join(f"{f.relative_to(assets).as_posix()}\0{hashes(f)}\n" for f in files)
    return "set:" + hashlib.sha256(lines.encode()).hexdigest()


def run_identity(train: dict, identity) -> str:
    """Another run's output (Safe LoRA's unaligned model) stands for what produced it: its training settings and
    their inputs' identities."""
    inputs = {path: identity(path) for path in input_paths({"train": train})}
    return "run:" + result_key({"train": train, "inputs": inputs})


def matches(recorded: dict, current: dict) -> bool:
    """Recorded inputs against this machine's: the same paths, and every identity known here equal."""
    recorded = recorded.get("inputs")
    if not isinstance(recorded, dict) or set(recorded) != set(current):
        return False
    return all(value is None or recorded[path] == value for path, value in current.items())
