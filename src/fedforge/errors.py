"""Exceptions a user can act on; the CLI prints each as one line."""

from __future__ import annotations

__all__ = ["ConfigError", "DataError", "DivergenceError", "FedforgeError", "OutputError"]


class FedforgeError(Exception):
    """Base class: something the user can fix, described in one line."""


class ConfigError(FedforgeError, ValueError):
    """A setting has a value fedforge cannot use."""


class DataError(FedforgeError):
    """A dataset is missing, corrupt, or could not be downloaded."""


class DivergenceError(FedforgeError, FloatingPointError):
    """Training produced a NaN or infinite loss."""


class OutputError(FedforgeError, OSError):
    """An output file cannot be written (a full disk, a read-only folder)."""
