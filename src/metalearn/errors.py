"""Errors a user can act on: each message names the fix."""


class MetalearnError(Exception):
    """Base class for errors caused by configuration or data, not by bugs."""


class ConfigError(MetalearnError, ValueError):
    """The configuration asks for something impossible (e.g. more ways than classes)."""


class DataError(MetalearnError, FileNotFoundError):
    """Data files are missing, corrupt, or cannot be downloaded."""


class NonFiniteLossError(MetalearnError, FloatingPointError):
    """Training produced a NaN/inf loss; the weights were not updated, checkpoints are kept."""
