"""The `logitguard` command line: tokens | train | eval | demo | safelora | experiment | sweep."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import demo, eval, experiment, safelora, sweep, tokens, train
from .train import _split_trainer_flags, trainer_flags  # noqa: F401  (main splits train's flags; tests use them)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="logitguard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (tokens, train, eval, demo, safelora, experiment, sweep):  # one module per command, in this folder
        module.register(sub)
    return parser


def one_line(message: str) -> str:
    """An error message as one line: wrapped library messages (a hub error, say) are joined with spaces."""
    return " ".join(message.split()) or "(no message)"


def _kernel_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


def quiet_bitsandbytes() -> None:
    """Drop the one warning bitsandbytes logs while it is imported on CPUs with AVX512-BF16: that it could not fetch
    an optional CPU 4-bit kernel from the hub (the `kernels` package is not installed). transformers imports PEFT, and
    PEFT imports bitsandbytes, whenever they are installed, so every training command printed it, quantized or not.
    Only that message of that logger is dropped; bitsandbytes' other warnings still show."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if _kernel_notice not in logger.filters:
        logger.addFilter(_kernel_notice)


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. Every error logitguard raises for the user to fix (LogitguardError, NonFiniteLossError)
    and every OS error (no such file, permission, disk full) ends as one line on stderr with exit code 2;
    set LOGITGUARD_TRACEBACK=1 to see the traceback instead. Anything else is a bug and keeps its traceback."""
    from ..errors import LogitguardError
    from ..losses import NonFiniteLossError

    quiet_bitsandbytes()  # before any command imports transformers' Trainer
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, extra = _split_trainer_flags(parser, argv)
    args = parser.parse_args(argv)
    args.extra = extra
    try:
        return args.func(args)
    except (LogitguardError, NonFiniteLossError, OSError) as e:
        if os.environ.get("LOGITGUARD_TRACEBACK"):
            raise
        message = str(e) if isinstance(e, LogitguardError | NonFiniteLossError) else _os_error(e)
        print(f"logitguard {args.command}: error: {one_line(message)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"logitguard {args.command}: interrupted", file=sys.stderr)
        return 130


def _os_error(e: OSError) -> str:
    if e.strerror and e.filename:
        return f"{e.strerror}: {e.filename}"
    return f"{type(e).__name__}: {e}"


if __name__ == "__main__":
    sys.exit(main())
