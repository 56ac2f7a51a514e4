"""Deprecated: `logitguard bench` is `logitguard experiment` now, in logitguard.cli.experiment; this module keeps
the old import path for one release."""

import warnings

from .experiment import register  # noqa: F401

warnings.warn("logitguard.cli.bench is deprecated: import from logitguard.cli.experiment", DeprecationWarning,
              stacklevel=2)  # fmt: skip
