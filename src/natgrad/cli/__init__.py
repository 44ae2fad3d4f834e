"""The ``natgrad`` command."""

from natgrad.cli.main import main

__all__ = ["main"]
