"""`logitguard demo`: the whole method on the embedded toy aligned model."""

from __future__ import annotations

import argparse

from ..demo import run_demo
from ..errors import ConfigError
from ..experiment import PACKAGED


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the whole method on the embedded toy aligned model (CPU, minutes)")
    p.add_argument("--out", default="runs/demo", help="output folder: the results file, results.md, the plots")
    p.add_argument("--quick", action="store_true", help="smaller toy model, shorter runs (CI, ~2 minutes)")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # see _run
    p.add_argument("--cache-dir", help="where the toy model and reference caches live")
    p.set_defaults(func=_run)


def _run(args) -> int:
    if args.seed != 0:  # the demo is an experiment file now; its toy is the seed-0 build every result was made on
        raise ConfigError(f"logitguard demo: --seed is gone (the demo runs the seed-0 toy); for several training "
                          f"seeds, copy the demo's file ({PACKAGED['demo']}) under another name, add `seeds: "
                          "[0, 1, 2]` to a run and `logitguard experiment run` it")  # fmt: skip
    run_demo(args.out, args.quick, args.cache_dir)
    return 0
