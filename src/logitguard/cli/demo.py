"""`logitguard demo`: the whole method on the embedded toy aligned model."""

from __future__ import annotations

from ..demo import run_demo


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the whole method on the embedded toy aligned model (CPU, minutes)")
    p.add_argument("--out", default="runs/demo", help="output folder for results.json / .md / .png")
    p.add_argument("--quick", action="store_true", help="smaller toy model, shorter runs (CI, ~2 minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", help="where the toy model and reference caches live")
    p.set_defaults(func=lambda args: run_demo(args.out, args.quick, args.seed, args.cache_dir) and 0)
