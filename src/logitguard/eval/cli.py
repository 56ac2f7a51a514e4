"""Deprecated: `logitguard eval` lives in logitguard.cli.eval and prompt reading in logitguard.eval.prompts; this
module keeps the old import path for one release."""

import warnings

from ..cli.eval import register, run  # noqa: F401
from .prompts import PROMPT_KEYS, is_set_spec, read_prompt_sets, read_prompts, set_label  # noqa: F401

warnings.warn(
    "logitguard.eval.cli is deprecated: import from logitguard.eval.prompts (reading prompts) or logitguard.cli.eval",
    DeprecationWarning,
    stacklevel=2,
)
