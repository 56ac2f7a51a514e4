"""Deprecated: `logitguard bench` lives in logitguard.cli.bench; this module keeps the old import path for one
release."""

import warnings

from .cli.bench import register  # noqa: F401

warnings.warn("logitguard.bench_cli is deprecated: import from logitguard.cli.bench", DeprecationWarning, stacklevel=2)
