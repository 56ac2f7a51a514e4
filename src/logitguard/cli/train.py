"""`logitguard train`: every TrainConfig key as a flag, YAML underneath, TrainingArguments fields passed through."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing

from ..config import TrainConfig, load_config, ordered_fields
from ..deprecated import RENAMED_KEYS
from ..errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune with safety token regularization (YAML + flag overrides)")
    p.add_argument("config", nargs="?", help="YAML config file; flags below override its keys")
    hints = typing.get_type_hints(TrainConfig)
    for f in ordered_fields():  # model, data, ... first; then the safety, anchor and regularizer settings
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if f.name == "trainer":
            p.add_argument(flag, type=json.loads, help="extra TrainingArguments as JSON, e.g. '{\"warmup_steps\": 5}'")
        elif kind is dict:
            p.add_argument(flag, type=json.loads, help=f"{f.metadata.get('help')} (as JSON)")
        elif kind is bool:
            p.add_argument(flag, dest=f.name, default=None, metavar="true|false", help=f.metadata.get("help"))
        else:
            p.add_argument(flag, dest=f.name, default=None, help=f.metadata.get("help"))
    for old in RENAMED_KEYS:  # old flags still work for one release (and warn); not listed in --help
        p.add_argument("--" + old.replace("_", "-"), dest=old, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from ..losses import NonFiniteLossError
    from ..train import train

    cfg = config_from_args(args)
    try:
        result = train(cfg)
    except NonFiniteLossError as e:  # say what of the run is still usable
        from ..files import last_complete_checkpoint

        last = last_complete_checkpoint(cfg.output_dir)
        kept = f"Checkpoints saved before it are intact; the last is {last}." if last else "No checkpoint was saved."
        raise NonFiniteLossError(f"{e} {kept}") from e
    if result.pop("trainer").is_world_process_zero():
        print(json.dumps(result))
        print(f"adapter, safety_tokens.json, config.yaml and metrics.jsonl are in {result['output_dir']}")
    return 0


def config_from_args(args) -> TrainConfig:
    """The YAML file under the flags: logitguard's keys, the old names of renamed ones, TrainingArguments fields."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    overrides.update({old: getattr(args, old) for old in RENAMED_KEYS})
    overrides.update(trainer_flags(getattr(args, "extra", [])))
    return load_config(args.config, overrides)


def _split_trainer_flags(parser, argv: list[str]) -> tuple[list[str], list[str]]:
    """For `train`, take the flags it does not define (TrainingArguments fields) and their values out of argv,
    before argparse would mistake a value for the positional config file."""
    if not argv or argv[0] != "train":
        return argv, []
    sub = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices["train"]
    known = set(sub._option_string_actions)
    keep, extra, i = [argv[0]], [], 1
    while i < len(argv):
        flag = argv[i]
        if flag.startswith("--") and flag.split("=")[0] not in known:
            extra.append(flag)
            if "=" not in flag and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                extra.append(argv[i + 1])
                i += 1
        else:
            keep.append(flag)
        i += 1
    return keep, extra


def trainer_flags(extra: list[str]) -> dict:
    """`--max-steps 2 --bf16` and the like: any transformers.TrainingArguments field, typed as that field."""
    from ..config import coerce_trainer_value

    out, i = {}, 0
    while i < len(extra):
        flag = extra[i]
        if not flag.startswith("--"):
            raise ConfigError(f"unexpected argument {flag!r} (flags look like --max-steps 10)")
        name, _, value = flag[2:].partition("=")
        if not value:
            has_value = i + 1 < len(extra) and not extra[i + 1].startswith("--")
            value = extra[i + 1] if has_value else "true"
            i += has_value
        key = name.replace("-", "_")
        out[key] = coerce_trainer_value(key, value)
        i += 1
    return out
