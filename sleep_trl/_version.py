"""The package version (read by the model cards and reports)."""

__version__ = "0.1.0.dev0"
