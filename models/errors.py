"""Errors raised on bad input. Each message is one line naming the problem and the fix."""


class CheckpointError(ValueError):
    """A checkpoint that is unreadable or does not match the config."""


class ConfigError(ValueError):
    """A config.json (or config) this project cannot build a model from."""
