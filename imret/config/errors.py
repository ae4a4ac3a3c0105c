"""The one exception type of the config package."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user error in experiments.yaml or in a --set override: the message names the fix."""
