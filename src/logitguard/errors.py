"""The base class of the errors logitguard raises for a user to fix.

Every such error (bad config, data, safety words, model path, reference cache, judge, Safe LoRA input) derives
from `LogitguardError`, so a caller catches them all at once and `logitguard` prints each as one line,
`logitguard <command>: error: <message>`, with exit code 2. Each subclass also keeps its standard base
(ValueError, OSError, RuntimeError) so code that caught those before still does. `NonFiniteLossError` lives in
losses.py, which imports nothing but torch, and is caught next to this class.
"""

from __future__ import annotations

import difflib


class LogitguardError(Exception):
    """An error whose message tells the user what is wrong and how to fix it; not a bug in logitguard."""


class ConfigError(LogitguardError, ValueError):
    """A configuration key or value that cannot be used; the message names the key."""


def suggest(key: str, known) -> str:
    """' (did you mean 'x'?)' for the closest of `known` to a mistyped `key`, or ''."""
    close = difflib.get_close_matches(str(key), list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def registered(registry: dict, name: str, what: str):
    """registry[name], or a ConfigError naming the choices (and the closest to a typo)."""
    if name not in registry:
        choices = ", ".join(sorted(registry))
        raise ConfigError(f"unknown {what} {name!r}{suggest(name, registry)}; choose from {choices}")
    return registry[name]
