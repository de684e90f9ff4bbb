"""modelwatch: one registration event per settled model version."""

__version__ = "0.1.0"
