"""Serving layer for Context-PEFT adapters: registry, scheduler, engine, HTTP API, CLI.

Imports the method package `adapters`; the method package never imports this one.
"""

__version__ = "0.1.0"
