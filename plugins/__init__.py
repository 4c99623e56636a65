"""Integrations of kvtier with inference engines and observability tools.

Each module here is optional and imports the engine it integrates lazily, so
``kvtier.plugins`` imports with only kvtier's core dependencies installed.
"""
