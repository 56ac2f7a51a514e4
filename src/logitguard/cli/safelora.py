"""`logitguard safelora`: project a trained LoRA adapter onto the safety subspace (Safe LoRA)."""

from __future__ import annotations

from ..safelora import safe_lora


def register(subparsers) -> None:
    p = subparsers.add_parser("safelora", help="Safe LoRA: project a LoRA adapter onto the safety subspace")
    p.add_argument("--aligned", required=True, help="aligned (chat) model folder or hub name")
    p.add_argument(
        "--unaligned", required=True, help="unaligned base model (folder or hub name) of the same architecture"
    )
    p.add_argument("--adapter", required=True, help="LoRA adapter folder trained on the aligned model")
    p.add_argument("--out", required=True, help="folder for the projected adapter")
    p.add_argument("--num-layers", type=int, default=10, help="project the N modules with lowest similarity")
    p.add_argument("--threshold", type=float, help="instead: project every module with similarity below this")
    p.set_defaults(func=_run)


def _run(args) -> int:
    report = safe_lora(args.aligned, args.unaligned, args.adapter, args.out, args.num_layers, args.threshold)
    n = sum(m["projected"] for m in report["modules"])
    print(f"projected {n} of {len(report['modules'])} modules ({report['rule']}); adapter and report in {args.out}")
    return 0
